"""XLA CPU defaults chosen by measurement (see README, Performance); never override the user's."""

from __future__ import annotations

import os

# Flags measured to help on CPU; appended to XLA_FLAGS only when the user has not set them.
CPU_FLAGS: tuple[str, ...] = ()


def apply() -> None:
  """Adds :data:`CPU_FLAGS` to ``XLA_FLAGS`` (before JAX initialises its backends)."""
  current = os.environ.get("XLA_FLAGS", "")
  extra = [f for f in CPU_FLAGS if f.split("=")[0] not in current]
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()


def quiet_logs() -> None:
  """Shows absl warnings and above (Orbax logs every save at INFO) unless ``-v``/``--verbosity``."""
  from absl import flags, logging  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
