"""The ATAC gate ops the Flax modules call, dispatching to an implementation.

Implementations (``impl``):

* ``"reference"`` -- plain JAX (:mod:`atac_jax.ops.reference`); JAX differentiates it in every
  mode (reverse, forward: ``jvp``/``jacfwd``/``linearize``, higher order).
* ``"lean"`` -- one op that recomputes the bottleneck in the backward pass
  (:mod:`atac_jax.ops.lean`); every mode too (a custom JVP whose tangent is a linear map with
  the lean backward as its transpose); same values, gradients and statistics.
* ``"pallas"`` -- ``"lean"`` with its training backward pass as two Pallas kernels
  (:mod:`atac_jax.ops.pallas_backward`: two passes over the input instead of XLA's ~17 on TPU)
  where they apply (float32, rank >= 3, ``inner_relu``, channel counts multiples of 8, a tile
  within the on-chip memory budget; else the XLA backward). Compiled by Mosaic on TPU, run in
  Pallas' interpreter on the CPU (slow: for tests), the XLA backward on GPU. A step whose batch
  XLA splits over devices declares it (``pallas_backward.data_parallel``); no ``axis_name``.
* ``"auto"`` -- the per-backend default of :mod:`atac_jax.ops.policy` (``"lean"`` on every
  backend today); ``"reference"`` with an ``axis_name`` (cross-device statistics). (The Flax
  modules choose the backward kernel separately, :func:`module_impl`: ``"pallas"`` on TPU.)

Inference (``stats`` given) uses the reference under ``"auto"``: nothing is kept for a backward
pass in inference, and the reference is differentiable in every mode.
"""

from __future__ import annotations

from typing import Any, Optional

import jax

from atac_jax.ops import lean, pallas_backward, policy, reference
from atac_jax.ops.types import Affine, GateParams, GateStats, Moments

IMPLS = ("auto", "lean", "pallas", "reference")


def resolve_impl(impl: str, *, train: bool, axis_name: Any = None) -> str:
  """The implementation ``impl`` stands for: 'lean', 'pallas' or 'reference'.

  Raises:
    ValueError: for an unknown ``impl``, or ``'lean'``/``'pallas'`` with an ``axis_name``.
  """
  if impl not in IMPLS:
    raise ValueError(f"Unknown gate impl {impl!r}; accepted: {list(IMPLS)}.")
  if impl in ("lean", "pallas") and axis_name is not None:
    raise ValueError(f"impl={impl!r} computes batch statistics on one device; with axis_name="
                     f"{axis_name!r} use impl='reference' or 'auto'.")
  if impl == "pallas" and not train:
    return "reference"  # nothing is kept for a backward pass in inference
  if impl != "auto":
    return impl
  if axis_name is not None or not train:
    return "reference"
  return policy.choice("gate_impl")


def module_impl(*, memory_lean: bool, backward_kernel: str, axis_name: Any = None,
                layer: str = "ATAC") -> str:
  """The ``impl`` a Flax module's ``memory_lean`` and ``backward_kernel`` options stand for.

  ``backward_kernel``: ``"auto"`` (:func:`atac_jax.ops.policy.choice` ``'backward_kernel'``:
  the Pallas kernels on TPU, where the batch's split is known: one device, or a step traced
  under :func:`atac_jax.ops.pallas_backward.data_parallel`), ``"xla"`` or ``"pallas"``. With an
  ``axis_name`` (cross-device statistics) the kernels do not apply and the choice is ``"auto"``
  (the reference op).

  Raises:
    ValueError: for an unknown ``backward_kernel``.
  """
  accepted = ("auto",) + lean.KERNELS
  if backward_kernel not in accepted:
    raise ValueError(f"{layer}: unknown backward_kernel {backward_kernel!r}; accepted: "
                     f"{list(accepted)}.")
  if not memory_lean:
    return "reference"
  if axis_name is not None:
    return "auto"
  if backward_kernel == "auto":
    backward_kernel = policy.choice("backward_kernel")
    if backward_kernel == "pallas" and not pallas_backward.batch_split_known():
      backward_kernel = "xla"
  return "pallas" if backward_kernel == "pallas" else "auto"


def gate(x: jax.Array, params: GateParams, stats: Optional[GateStats] = None, *,
         epsilon: float, inner_relu: bool, impl: str = "auto", axis_name: Any = None):
  """``x * sigmoid(BN(up(relu(BN(down(x))))))`` over the last axis of ``x`` (any rank >= 2).

  Args:
    x: ``(..., C)`` input in the compute dtype.
    params: the gate's parameters.
    stats: running statistics (inference), or None for batch statistics (training).
    epsilon: BatchNorm epsilon.
    inner_relu: ReLU between the projections.
    impl: 'auto', 'lean', 'pallas' or 'reference' (see the module docstring).
    axis_name: ``shard_map``/``pmap`` axis over which batch statistics are global.

  Returns:
    With ``stats``: ``y``. Without: ``(y, GateStats)``, the batch moments (float32).
  """
  chosen = resolve_impl(impl, train=stats is None, axis_name=axis_name)
  if chosen in ("lean", "pallas"):
    return lean.gate(x, params, stats, epsilon=epsilon, inner_relu=inner_relu,
                     kernel="pallas" if chosen == "pallas" else "xla")
  return reference.gate(x, params, stats, epsilon=epsilon, inner_relu=inner_relu,
                        axis_name=axis_name)


def norm_gate(x: jax.Array, norm: Affine, params: GateParams, *, norm_epsilon: float,
              epsilon: float, inner_relu: bool, dtype: Any, impl: str = "auto",
              axis_name: Any = None) -> tuple[jax.Array, Moments, GateStats]:
  """``gate(BN(x))`` with a training-mode BatchNorm of affine ``norm``.

  Returns:
    ``(y, moments of x, gate batch moments)``.
  """
  chosen = resolve_impl(impl, train=True, axis_name=axis_name)
  if chosen == "reference":
    fn, kwargs = reference.norm_gate, {"axis_name": axis_name}
  else:
    fn, kwargs = lean.norm_gate, {"kernel": "pallas" if chosen == "pallas" else "xla"}
  return fn(x, norm, params, norm_epsilon=norm_epsilon, epsilon=epsilon, inner_relu=inner_relu,
            dtype=dtype, **kwargs)
