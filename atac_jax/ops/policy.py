"""Per-backend choices of the gate ops: one documented policy, each choice with its measurement.

The ops ask :func:`platform` which backend they are lowered for. It is ``jax.default_backend()``
unless a caller compiling ahead of time for another platform says otherwise with
:func:`lowering_platform` (``atac-bench compile`` does, for Cloud TPU topologies on a CPU host).

Choices (``choice(name)``). "TPU chain" below is an AOT compile for one Cloud TPU v5e chip
(libtpu 0.0.42.1) of four conv3x3 -> BN -> gate blocks at ResNet-20's first stage with 32 images,
forward and backward (ReLU: 273 MB accessed, 55 MiB peak):

``backward_kernel`` -- the training backward pass of a float32 unit under ``backward_kernel=
  "auto"`` (the Flax modules' default): ``"xla"``, or ``"pallas"``, the two Mosaic kernels of
  :mod:`atac_jax.ops.pallas_backward` (two passes over the input and the cotangent instead of
  XLA's ~17 a unit).
  * ``tpu``: ``"pallas"``. ResNet-20 on v5e:2x2 (batch 128, float32), per chip: 1.96 GB
    accessed and 109 MiB peak, against 3.10 GB and 83 MiB with the XLA backward (ReLU: 1.02 GB,
    101 MiB). Checked against the XLA backward and plain autodiff in Pallas' interpreter on the
    CPU and compiled by Mosaic ahead of time for v5e; not yet run on a TPU (``"xla"`` is the
    escape hatch). The modules take it only where the op knows how the batch is split: one
    device, or a step that declares its data axes (``pallas_backward.data_parallel``, as the
    training CLI does); else the kernels would see the whole batch on every device.
  * others: ``"xla"`` (CPU: the kernels run in Pallas' interpreter, for tests; GPU: no kernels).

``colsum`` -- how a column sum over rows is written.
  * ``cpu``: a matrix-vector product with ones. XLA:CPU rewrites a large ``jnp.sum`` into a tree
    of ``reduce-window`` ops running at a fraction of memory bandwidth: 1.35 ms for an 8 MiB
    ``(128, 32, 32, 16)`` activation on the 2-core dev machine (jaxlib 0.10.2) against 0.55 ms for
    ``ones @ x``. Each product with 1 is exact.
  * others: ``jnp.sum``, the plain reduction (TPU chain: the same bytes and peak either way).
  The same choice writes ``sum(a * b)`` per channel (``reductions.sum_product``): on XLA:CPU the
  diagonal of a small ``a^T b``, elsewhere a reduction XLA fuses into a neighbouring pass (with
  ``sum(dh)`` taken from per-channel sums, ResNet-20 on v5e:2x2 went from 3.25 to 3.15 GB).

``contraction`` -- how the products over the channel axis (the two projections, their
  transposes, and the ``a^T b`` sums over rows) are written, for inputs of rank 3 or more.
  * ``tpu``: as 1x1 convolutions (and their weight gradients). XLA:TPU then lays the bottleneck
    out and fuses around it as around the network's own convolutions instead of relaying it out
    for a matrix product. Whole ResNet-20 step on v5e:2x2 (batch 128, float32), per chip:
    3.54 GB accessed and 91.5 MiB peak, against 3.92 GB and 119.5 MiB as matrix products. With
    convolutions the bottleneck's Gram matrix takes a column of ones for its column sums
    (``reductions.gram``; part of 3.15 -> 3.10 GB).
  * others: matrix products (``jnp.dot``); CPU and GPU not measured with convolutions.

``fold_norm`` -- whether a fused BatchNorm folds into the down-projection's kernel (float32 only).
  * all backends: yes; the normalised activation is never written. CPU: 4% off the ResNet-20
    step. TPU, the whole ResNet-20 step on v5e:2x2 (batch 128, float32): 3.92 GB accessed and
    119.5 MiB peak per chip folded, against 4.52 GB and 132.4 MiB unfolded (the TPU chain
    alone suggested the opposite for the peak: 81 vs 73 MiB).

``materialize_dz`` -- whether, in a half-precision gate, the up BatchNorm's input gradient
  ``dz`` is written once in the compute dtype (behind an optimisation barrier) for the two
  products that read it.
  * ``tpu``: yes. Otherwise XLA:TPU recomputes ``dz`` from three activation-sized operands in
    each product's fusion. ResNet-50 (``act_layers=2``, batch 256, bf16) on v5e:2x2: 38.46 GB
    accessed per chip against 38.74 GB. The MXU reads the operand in bfloat16 anyway.
  * others: no (XLA:CPU drops the barrier; GPU not measured).

``tie`` -- how the backward pass's recomputation is made to wait for the cotangent.
  * ``cpu``: ``"scalar"``, an exact zero from one element of the cotangent added to the
    parameters and the input's batch mean: XLA:CPU drops optimisation barriers before CSE and
    would merge the recomputation into the forward pass (the memory tests in
    ``tests/test_atac_fusion.py``). Where the batch may be split over devices (several devices
    in the runtime and no ``pallas_backward.data_parallel`` declaration of one shard) the
    element would be broadcast by a collective, so there it is ``"zeros"``: exact zeros derived
    element-wise from the cotangent, added to the input (no collective, but an
    activation-sized write per unit). ResNet-20 step (batch 128, float32, one device;
    ``atac-bench baseline`` against the ``"zeros"`` commit, 20 rounds in one process,
    2026-12-02): ``"scalar"`` 1.074x ReLU's time against 1.124x (speed 1.054x, 95% interval
    1.033-1.060), scratch memory 217.4 against 219.6 MB, the same first loss
    (``bench_results/cifar_resnet20_cpu_scalar_tie.jsonl``). Four unfused units alone
    (``(128, 32, 32, 16)``, r = 4): 0.85x the time, 59 against 66 MB.
  * others: an optimisation barrier over the parameters and the cotangent (no extra reads; the
    same bytes as the zeros on the TPU chain).

``gate_impl`` -- the default implementation of a training-mode gate (:mod:`atac_jax.ops.gate`).
  * all backends: ``"lean"``. On the CPU it is 0.60x the plain path's step time with 0.37x its
    scratch memory (ResNet-20, batch 128). TPU chain: 1.32 GB / 73 MiB, against 1.19 GB /
    117 MiB for the reference (plain autodiff), 1.68 GB / 105 MiB for ``jax.checkpoint`` of the
    reference and 1.47 GB / 81 MiB for a custom JVP whose tangent is a checkpointed JVP of the
    reference; on the whole ResNet-20 step the lean op's 3.9x ReLU's bytes compare with 4.5x for
    the reference (README, Performance).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import jax

_local = threading.local()

PLATFORMS = ("cpu", "gpu", "tpu")

_CHOICES = {
    "backward_kernel": {"tpu": "pallas", "default": "xla"},
    "colsum": {"cpu": "ones_matmul", "default": "reduce"},
    "contraction": {"tpu": "conv", "default": "dot"},
    "fold_norm": {"default": True},
    "gate_impl": {"default": "lean"},
    "materialize_dz": {"tpu": True, "default": False},
    "tie": {"cpu": "scalar", "default": "barrier"},
}


def platform() -> str:
  """The platform the ops are being lowered for: 'cpu', 'gpu' or 'tpu'."""
  override = getattr(_local, "platform", None)
  if override is not None:
    return override
  backend = jax.default_backend()
  return "gpu" if backend in ("cuda", "rocm", "gpu") else backend


@contextlib.contextmanager
def lowering_platform(name: str) -> Iterator[None]:
  """Traces the ops inside the block as if lowering for platform ``name`` (AOT compilation).

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
