"""Per-backend choices of the gate ops: one table, each entry with its reason.

The ops ask :func:`platform` which backend they are lowered for. The lean op's backward pass
is traced when the program is lowered, once per platform it is lowered for
(:mod:`atac_jax.ops.linear_map`'s per-platform lowering rules), so an AOT compile from a CPU host
for a TPU and a multi-platform ``jax.export`` get each platform's choices with no declaration.
Elsewhere (the forward pass, traced with the program) :func:`platform` is the platform of
JAX's mesh context's devices (``jax.set_mesh``), else ``jax.default_backend()``.
:func:`lowering_platform` overrides both (tests, tools).
Which backward pass runs is decided from this table by :func:`atac_jax.ops.dispatch.choose`.
The measurements behind each entry, with their commands and data, are in
``docs/ops_decisions.md``; ResNet-20 on v5e:2x2 below is the project's train step, batch 128,
float32, per chip.

Choices (``choice(name)``):

``gate_impl`` -- the op of a training-mode gate: ``"lean"`` everywhere, since recomputing the
  bottleneck in the backward pass keeps one activation instead of ~4 (CPU: 0.60x the plain
  path's step time).

``backward_kernel`` -- the lean op's training backward under ``backward_kernel="auto"``:
  ``"pallas"`` on TPU, two passes over the input instead of XLA's ~17 (ResNet-20 on v5e:2x2:
  1.96 GB accessed against 3.10 GB), three in bfloat16 for units too wide for two
  (:mod:`atac_jax.ops.pallas_tpu`; ResNet-50's bfloat16 step: 1.06x ReLU's bytes against
  1.12x); ``"pallas"`` on GPU, the Triton kernels of :mod:`atac_jax.ops.pallas_gpu` (three
  passes; figures in ``docs/performance.md``, GPU);
  ``"xla"`` on the CPU (it runs the kernels only in Pallas' interpreter, for tests).

``colsum`` -- how a column sum over rows is written: on the CPU a product with ones (exact),
  since XLA:CPU turns a large ``jnp.sum`` into ``reduce-window`` ops well below memory bandwidth
  (0.55 against 1.35 ms for an 8 MiB activation); elsewhere ``jnp.sum``, which XLA fuses. The
  same choice writes ``sum(a * b)`` per channel (``reductions.sum_product``).

``contraction`` -- the channel products (projections, their transposes, ``a^T b``), rank >= 3:
  on TPU 1x1 convolutions, which XLA:TPU lays out and fuses as the network's own convolutions
  instead of relaying the bottleneck out for a matrix product (ResNet-20 on v5e:2x2: 3.54
  against 3.92 GB accessed); elsewhere matrix products (CPU and GPU not measured otherwise).

``fold_norm`` -- whether a fused BatchNorm folds into the down-projection's kernel (float32
  only): yes everywhere, so the normalised activation is never written (ResNet-20 on v5e:2x2:
  3.92 against 4.52 GB accessed).

``materialize_dz`` -- whether a half-precision gate writes the up BatchNorm's input gradient
  ``dz`` once in the compute dtype for the two products that read it: on TPU yes, else XLA:TPU
  recomputes it from three activation-sized operands in each product's fusion (ResNet-50
  bfloat16 on v5e:2x2: 38.46 against 38.74 GB); elsewhere no (XLA:CPU drops the barrier).

``tie`` -- how the backward pass's recomputation is made to wait for the cotangent
  (``lean._tie``): on the CPU ``"scalar"``, since XLA:CPU drops optimisation barriers before
  CSE and would merge the recomputation into the forward pass (ResNet-20 step: 1.074x ReLU's
  time against 1.124x for element-wise ``"zeros"``); ``dispatch.choose`` makes it ``"zeros"``
  where the batch may lie on several devices. Elsewhere ``"barrier"``, an optimisation barrier
  (no extra reads).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import jax

_local = threading.local()

PLATFORMS = ("cpu", "gpu", "tpu")

_CHOICES = {
    "backward_kernel": {"tpu": "pallas", "gpu": "pallas", "default": "xla"},
    "colsum": {"cpu": "ones_matmul", "default": "reduce"},
    "contraction": {"tpu": "conv", "default": "dot"},
    "fold_norm": {"default": True},
    "gate_impl": {"default": "lean"},
    "materialize_dz": {"tpu": True, "default": False},
    "tie": {"cpu": "scalar", "default": "barrier"},
}


def _family(backend: str) -> str:
  """'cpu', 'gpu' or 'tpu' for a JAX backend or lowering platform name ('cuda', 'rocm', ...)."""
  return "gpu" if backend in ("cuda", "rocm", "gpu") else backend


def platform() -> str:
  """The platform the ops are being lowered for: 'cpu', 'gpu' or 'tpu'.

  First match: :func:`lowering_platform`; the platform a lowering rule traces for
  (:func:`lowering_for`); the devices of JAX's mesh context (``jax.set_mesh``, ``shard_map``:
  e.g. a Cloud TPU topology's mesh on a CPU host); ``jax.default_backend()``.
  """
  for name in (getattr(_local, "platform", None), getattr(_local, "lowering", None)):
    if name is not None:
      return name
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  if device is not None and getattr(device, "platform", None):
    return _family(device.platform)
  return _family(jax.default_backend())


def overridden() -> bool:
  """Whether a :func:`lowering_platform` block is in force."""
  return getattr(_local, "platform", None) is not None


@contextlib.contextmanager
def lowering_for(backend: str) -> Iterator[None]:
  """Traces the ops inside the block for JAX lowering platform ``backend`` ('cpu', 'cuda',
  'rocm', 'tpu', ...): what a per-platform lowering rule does while it traces an op's body.
  :func:`lowering_platform` still takes precedence."""
  previous = getattr(_local, "lowering", None)
  _local.lowering = _family(backend)
  try:
    yield
  finally:
    _local.lowering = previous


@contextlib.contextmanager
def lowering_platform(name: str) -> Iterator[None]:
  """Traces the ops inside the block as if lowering for platform ``name`` (AOT compilation).

  It applies to what is traced and lowered inside the block; JAX's trace and lowering caches do
  not know it, so use a ``jax.jit`` not yet lowered elsewhere. Not needed for an AOT compile or
  ``jax.export`` for another platform: the lean op's backward follows the lowering platform.

  Raises:
    ValueError: for a name other than 'cpu', 'gpu' or 'tpu'.
  """
  if name not in PLATFORMS:
    raise ValueError(f"lowering_platform: unknown platform {name!r}; accepted: {list(PLATFORMS)}.")
  previous = getattr(_local, "platform", None)
  _local.platform = name
  try:
    yield
  finally:
    _local.platform = previous


def choice(name: str):
  """The policy's value of ``name`` for the current :func:`platform`.

  Raises:
    ValueError: for an unknown choice name.
  """
  if name not in _CHOICES:
    raise ValueError(f"Unknown policy choice {name!r}; accepted: {sorted(_CHOICES)}.")
  table = _CHOICES[name]
  return table.get(platform(), table["default"])
