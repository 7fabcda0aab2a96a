"""XLA CPU defaults chosen by measurement (see README, Performance); never override the user's.

Measured with ``atac-bench train --model cifar_resnet20 --batch 128`` (float32) on the 2-core
dev machine (jax/jaxlib 0.10.2), alternating processes:

- ``--xla_cpu_experimental_ynn_fusion_type=`` (no YNNPACK library fusions; XLA's default
  offloads dots, convolutions and reductions to YNNPACK): ReLU ResNet-20 train step ~1.3x
  faster and 31% less scratch memory (temp bytes 293 -> 203 MiB), ATAC ResNet-20 ~1.25x faster
  (390 -> 296 MiB). YNNPACK fusions were also reported to miscompile on XLA:CPU (jaxlib 0.11).
  ADOPTED.
- ``--xla_cpu_use_onednn=true``: accepted by jaxlib 0.10.2 but compiles the very same HLO (the
  CPU backend dispatches to YNNPACK/Eigen, not oneDNN) and measures the same: NOT adopted. The
  ~1.5x once reported for it does not reproduce on this jaxlib.
- ``--xla_cpu_experimental_ynn_fusion_type=dot`` (YNNPACK fuses dots with their element-wise
  consumers): ATAC faster than XLA's default but slower than no YNNPACK, and its fusions undo
  the memory-lean ATAC backward pass (582 MiB): NOT adopted.

Only the CLIs (``atac-train``, ``atac-eval``, ``atac-bench``) call :func:`apply`; importing the
library changes nothing.
"""

from __future__ import annotations

import os
import re

# Flags measured to help on CPU; appended to XLA_FLAGS only when the user has not set them.
CPU_FLAGS: tuple[str, ...] = ("--xla_cpu_experimental_ynn_fusion_type=",)
# XLA aborts on flags it does not know, so they are only added for the jaxlib releases they were
# measured on (and later ones).
MIN_JAXLIB: tuple[int, int] = (0, 10)
# Set to 0 to keep XLA's own defaults (e.g. to measure against them).
DISABLE_ENV = "ATAC_JAX_CPU_DEFAULTS"


def jaxlib_version() -> tuple[int, ...]:
  """The installed jaxlib's (major, minor, ...) version, read without importing JAX."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  try:
    text = metadata.version("jaxlib")
  except metadata.PackageNotFoundError:
    return ()
  return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def _flag_name(flag: str) -> str:
  return flag.split("=", 1)[0].strip()


def apply(flags: tuple[str, ...] | None = None) -> list[str]:
  """Adds :data:`CPU_FLAGS` (or ``flags``) to ``XLA_FLAGS`` before JAX initialises its backends.

  A flag whose name already appears in ``XLA_FLAGS`` (with any value) is left as the user set
  it; ``ATAC_JAX_CPU_DEFAULTS=0`` adds none, and neither does a jaxlib older than
  :data:`MIN_JAXLIB` (whose XLA may not know the flags). Has no effect once JAX has created its
  CPU backend.

  Returns:
    The flags that were added.
  """
  if os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
    return []
  if flags is None and jaxlib_version()[:2] < MIN_JAXLIB:
    return []
  current = os.environ.get("XLA_FLAGS", "")
  present = {_flag_name(token) for token in current.split()}
  extra = [f for f in (CPU_FLAGS if flags is None else flags) if _flag_name(f) not in present]
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
  return extra


def quiet_logs() -> None:
  """Shows absl warnings and above (Orbax logs every save at INFO) unless ``-v``/``--verbosity``."""
  from absl import flags, logging  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
