"""ATAC as a Flax NNX module, calling the same pure ops as the linen unit (:mod:`atac_jax.ops`)."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from atac_jax import ops
from atac_jax.layers import _checks
from atac_jax.nnx._common import BatchNormState, Pointwise, merge_mode


class ATAC(nnx.Module):
  """Local channel attention gate ``x * sigmoid(BN(up(relu(BN(down(x))))))`` (last axis).

  The NNX twin of :class:`atac_jax.layers.ATAC`: same options, values, gradients and BatchNorm
  updates, computed by the same ops (memory-lean op in training by default).

  Variables (NNX path -> linen path, see :func:`atac_jax.nnx.to_linen`):

  * ``conv_down.kernel`` ``(C, K)`` (Param) -> ``params/conv_down/kernel`` ``(1, 1, C, K)``;
    ``conv_down.bias`` ``(K,)`` with ``use_bias``; likewise ``conv_up`` ``(K, C)``;
  * ``bn_down.scale``/``bias`` (Param), ``bn_down.mean``/``var`` (BatchStat) ->
    ``params/bn_down/...`` and ``batch_stats/bn_down/...``; likewise ``bn_up``.

  ``K = C // reduction`` (at least 1). Train/eval: ``model.train()`` / ``model.eval()`` set
  ``use_running_average`` (False: batch statistics and running-average updates, as
  ``nnx.BatchNorm``); the call argument overrides it.

  Args:
    in_features: channels ``C`` (the input's last axis).
    reduction: bottleneck reduction ``r``.
    use_global: average-pool over all but batch and channel axes first (SE-like gate).
    inner_relu: ReLU between the two point-wise projections.
    use_bias: give the projections biases.
    momentum: BatchNorm running-average momentum.
    epsilon: BatchNorm epsilon.
    dtype: computation dtype; None: the promotion of input and parameter dtypes.
    param_dtype: parameter dtype.
    memory_lean: in training, run the memory-lean op; False runs the
      reference op.
    backward_kernel: with ``memory_lean``, ``"auto"`` (the per-backend policy), ``"xla"`` or
      ``"pallas"`` (the training backward pass as two Pallas kernels where they apply; see
      ``atac_jax.ops.pallas_backward`` and ``atac_jax.layers.ATAC``); the decision table is
      :func:`atac_jax.ops.dispatch.choose`'s.
    axis_name: ``shard_map``/``pmap`` axis over which batch statistics are global.
    use_running_average: initial mode (False: training, as ``nnx.BatchNorm``).
    rngs: ``nnx.Rngs`` with a ``params`` stream.

  Raises:
    ValueError: for a bad option (listing what is accepted).
  """

  def __init__(self, in_features: int, *, reduction: int = 2, use_global: bool = False,
               inner_relu: bool = True, use_bias: bool = False, momentum: float = 0.9,
               epsilon: float = 1e-5, dtype: Any = None, param_dtype: Any = jnp.float32,
               memory_lean: bool = True, backward_kernel: str = "auto",
               axis_name: Any = None, use_running_average: Optional[bool] = False,
               rngs: nnx.Rngs):
    _checks.check_positive_int(in_features, option="in_features", layer="ATAC")
    _checks.check_momentum(momentum, layer="ATAC")
    _checks.check_positive(epsilon, option="epsilon", layer="ATAC")
    hidden = _checks.bottleneck_width(in_features, reduction, layer="ATAC")
    self.in_features = in_features
    self.reduction = reduction
    self.use_global = use_global
    self.inner_relu = inner_relu
    self.use_bias = use_bias
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.memory_lean = memory_lean
    self.backward_kernel = backward_kernel
    ops.Request.from_module(memory_lean=memory_lean, backward_kernel=backward_kernel)  # validates
    self.axis_name = axis_name
    self.use_running_average = use_running_average
    self.conv_down = Pointwise(in_features, hidden, use_bias=use_bias, param_dtype=param_dtype,
                               rngs=rngs)
    self.bn_down = BatchNormState(hidden, param_dtype=param_dtype)
    self.conv_up = Pointwise(hidden, in_features, use_bias=use_bias, param_dtype=param_dtype,
                             rngs=rngs)
    self.bn_up = BatchNormState(in_features, param_dtype=param_dtype)

  def __call__(self, x: jax.Array, use_running_average: Optional[bool] = None) -> jax.Array:
    """Gates ``x`` (channels last, rank >= 2); in training updates the running statistics.

    Args:
      x: ``(..., in_features)``.
      use_running_average: overrides the attribute for this call.
    """
    train = not merge_mode(use_running_average, self.use_running_average, layer="ATAC")
    _checks.check_min_rank(x, min_rank=2, layer="ATAC")
    if x.shape[-1] != self.in_features:
      raise ValueError(f"ATAC: input has {x.shape[-1]} channels; accepted: in_features="
                       f"{self.in_features} (the last axis).")
    dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
    x = jnp.asarray(x, dtype)
    params = self.gate_params(dtype)
    moments = lambda bn: ops.Moments(bn.mean.get_value(), bn.var.get_value())
    running = ops.GateStats(moments(self.bn_down), moments(self.bn_up))
    kwargs = dict(epsilon=self.epsilon, inner_relu=self.inner_relu, axis_name=self.axis_name)
    if self.use_global:
      pooled = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)), keepdims=True)
      z, stats = ops.reference.gate_logits(pooled, params, None if train else running, **kwargs)
      y = x * jax.nn.sigmoid(z).astype(dtype)
    elif not train:
      y = ops.gate(x, params, running, impl=self._impl(), **kwargs)
    else:
      y, stats = ops.gate(x, params, impl=self._impl(), **kwargs)
    if train:
      self.bn_down.update(stats.down, self.momentum)
      self.bn_up.update(stats.up, self.momentum)
    return y

  def gate(self, x: jax.Array, use_running_average: Optional[bool] = None) -> jax.Array:
    """The gate ``sigmoid(z)`` the unit multiplies ``x`` by (introspection).

    Shaped like ``x`` for the point-wise unit; one value per example and channel,
    ``(N, 1, ..., 1, C)``, for a global one (as SE), so ``unit(x) == x * gate`` either way.

    Computed with the statistics the call would use (batch moments in training, running ones
    in eval mode); nothing is updated. The linen unit sows the same values as
    ``intermediates/gate``.
    """
    train = not merge_mode(use_running_average, self.use_running_average, layer="ATAC")
    _checks.check_min_rank(x, min_rank=2, layer="ATAC")
    dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
    x = jnp.asarray(x, dtype)
    moments = lambda bn: ops.Moments(bn.mean.get_value(), bn.var.get_value())
    running = None if train else ops.GateStats(moments(self.bn_down), moments(self.bn_up))
    source = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)), keepdims=True) \
        if self.use_global else x
    z, _ = ops.reference.gate_logits(source, self.gate_params(dtype), running,
                                     epsilon=self.epsilon, inner_relu=self.inner_relu,
                                     axis_name=self.axis_name)
    return jax.nn.sigmoid(z).astype(x.dtype)

  def gate_params(self, dtype: Any) -> ops.GateParams:
    """The variables as :class:`atac_jax.ops.GateParams` (projections cast to ``dtype``)."""
    cast = lambda v: None if v is None else jnp.asarray(v.get_value(), dtype)
    affine = lambda bn: ops.Affine(bn.scale.get_value(), bn.bias.get_value())
    return ops.GateParams(
        ops.Projection(cast(self.conv_down.kernel), cast(self.conv_down.bias)),
        affine(self.bn_down),
        ops.Projection(cast(self.conv_up.kernel), cast(self.conv_up.bias)),
        affine(self.bn_up))

  def set_view(self, use_running_average: Optional[bool] = None) -> None:
    """Used by ``nnx.view`` (as ``nnx.BatchNorm.set_view``)."""
    if use_running_average is not None:
      self.use_running_average = use_running_average

  def _impl(self) -> ops.Request:
    """The unit's request to :func:`atac_jax.ops.choose` (which backward runs, and why)."""
    return ops.Request.from_module(memory_lean=self.memory_lean,
                                   backward_kernel=self.backward_kernel)
