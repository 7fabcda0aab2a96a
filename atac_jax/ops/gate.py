"""The ATAC gate ops the Flax modules call, dispatching to an implementation.

Implementations (``impl``; which one runs is :func:`atac_jax.ops.dispatch.choose`'s table):

* ``"reference"`` -- plain JAX (:mod:`atac_jax.ops.reference`); JAX differentiates it in every
  mode (reverse, forward: ``jvp``/``jacfwd``/``linearize``, higher order).
* ``"lean"`` -- one op that recomputes the bottleneck in the backward pass
  (:mod:`atac_jax.ops.lean`); every mode too (a custom JVP whose tangent is a linear map with
  the lean backward as its transpose); same values, gradients and statistics.
* ``"pallas"`` -- ``"lean"`` with its training backward pass as two Pallas kernels
  (:mod:`atac_jax.ops.pallas_backward`: two passes over the input instead of XLA's ~17 on TPU)
  where they apply (float32, rank >= 3, ``inner_relu``, channel counts multiples of 8, a tile
  within the on-chip memory budget), else, on TPU, the three row kernels of
  :mod:`atac_jax.ops.pallas_rows` (bfloat16, wide units: ResNet-50's), else the XLA backward
  (:mod:`atac_jax.ops.pallas_tpu` chooses). Compiled by Mosaic on TPU, run in
  Pallas' interpreter on the CPU (slow: for tests); on NVIDIA GPUs the three Triton kernels of
  :mod:`atac_jax.ops.pallas_gpu` (float32 or bfloat16, channels a power of two >= 16). Where
  the batch lies is read from JAX (:func:`atac_jax.ops.dispatch.where_batch_lies`: one device,
  the mesh context, ``shard_map``; ``pallas_backward.data_parallel`` overrides).
* ``"auto"`` -- the policy's op (``"lean"`` on every backend today) with the XLA backward in
  training (the Flax modules' ``backward_kernel="auto"`` takes the kernels on TPU and GPU); ``"reference"`` in inference. Every implementation takes ``axis_name``
  (cross-device statistics, as ``nn.BatchNorm(axis_name=...)``).

``impl`` may also be a :class:`~atac_jax.ops.dispatch.Request` (what the Flax modules pass: their
``backward_kernel="auto"`` takes the kernels on TPU where the batch's split is known).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import jax

from atac_jax.ops import dispatch, lean, reference
from atac_jax.ops.dispatch import IMPLS, Backward, Request
from atac_jax.ops.types import Affine, GateParams, GateStats, Moments

__all__ = ["IMPLS", "gate", "norm_gate"]


def _request(impl: Union[str, Request]) -> Request:
  return impl if isinstance(impl, Request) else Request.from_impl(impl)


def gate(x: jax.Array, params: GateParams, stats: Optional[GateStats] = None, *,
         epsilon: float, inner_relu: bool, impl: Union[str, Request] = "auto",
         axis_name: Any = None):
  """``x * sigmoid(BN(up(relu(BN(down(x))))))`` over the last axis of ``x`` (any rank >= 2).

  Args:
    x: ``(..., C)`` input in the compute dtype.
    params: the gate's parameters.
    stats: running statistics (inference), or None for batch statistics (training).
    epsilon: BatchNorm epsilon.
    inner_relu: ReLU between the projections.
    impl: 'auto', 'lean', 'pallas', 'reference' or a ``dispatch.Request`` (module docstring).
    axis_name: ``shard_map``/``pmap`` axis over which batch statistics are global.

  Returns:
    With ``stats``: ``y``. Without: ``(y, GateStats)``, the batch moments (float32).
  """
  choice = dispatch.choose(_request(impl), train=stats is None, axis_name=axis_name, x=x,
                           params=params, inner_relu=inner_relu)
  if choice.backward is not Backward.REFERENCE:
    return lean.gate_op(x, params, stats, epsilon=epsilon, inner_relu=inner_relu, choice=choice,
                        axis_name=axis_name)
  return reference.gate(x, params, stats, epsilon=epsilon, inner_relu=inner_relu,
                        axis_name=axis_name)


def norm_gate(x: jax.Array, norm: Affine, params: GateParams, *, norm_epsilon: float,
              epsilon: float, inner_relu: bool, dtype: Any, impl: Union[str, Request] = "auto",
              axis_name: Any = None) -> tuple[jax.Array, Moments, GateStats]:
  """``gate(BN(x))`` with a training-mode BatchNorm of affine ``norm``.

  Returns:
    ``(y, moments of x, gate batch moments)``.
  """
  choice = dispatch.choose(_request(impl), train=True, axis_name=axis_name, x=x, params=params,
                           inner_relu=inner_relu)
  if choice.backward is Backward.REFERENCE:
    fn, kwargs = reference.norm_gate, {"axis_name": axis_name}
  else:
    fn, kwargs = lean.norm_gate_op, {"choice": choice, "axis_name": axis_name}
  return fn(x, norm, params, norm_epsilon=norm_epsilon, epsilon=epsilon, inner_relu=inner_relu,
            dtype=dtype, **kwargs)
