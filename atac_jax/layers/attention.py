"""Attention baselines that replace an activation: squeeze-excitation and xUnit."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from atac_jax.layers import _checks, _conventions


class SE(nn.Module):
  """Squeeze-excitation gate used as an activation: ``x * sigmoid(W2 relu(W1 pool(x)))``.

  One gate value per (sample, channel), from average pooling over every axis between the batch
  and the channels and two fully connected layers with biases (``fc_down``: C -> C // r,
  ``fc_up``: C // r -> C), as in Hu et al. (SENet). Unlike ``ATAC(use_global=True)`` it has no
  BatchNorm. Channels-last input of any rank >= 2: ``(N, C)`` (nothing to pool: a per-sample
  feature gate), ``(N, L, C)``, ``(N, H, W, C)``, ``(N, D, H, W, C)``.

  Introspection: each call sows ``gate`` (shape ``(N, 1, ..., 1, C)``, ``y == x * gate``) into the
  ``intermediates`` collection.

  Attributes:
    reduction: bottleneck reduction ``r`` (SENet uses 16; ``C // r`` is at least 1).
    dtype: computation and output dtype; ``None``: the promotion of input and parameter dtypes.
    param_dtype: parameter dtype.
    train: accepted for the common convention (the result does not depend on it); give it here
      or at call time, not both.
  """
  reduction: int = 16
  dtype: Any = None
  param_dtype: Any = jnp.float32
  train: bool | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
    """Gates ``x`` channel-wise; ``train`` is accepted for the common convention."""
    _conventions.merge_train(self.train, train, required=False)
    _checks.check_min_rank(x, min_rank=2, layer="SE")
    channels = x.shape[-1]
    hidden = _checks.bottleneck_width(channels, self.reduction, layer="SE")
    dtype = _conventions.result_dtype(x, self.param_dtype, self.dtype)
    x = jnp.asarray(x, dtype)
    s = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)), keepdims=True)
    s = nn.Dense(hidden, dtype=dtype, param_dtype=self.param_dtype, name="fc_down")(s)
    s = nn.relu(s)
    s = nn.Dense(channels, dtype=dtype, param_dtype=self.param_dtype, name="fc_up")(s)
    gate = nn.sigmoid(s)
    self.sow("intermediates", "gate", gate)
    return x * gate


class XUnit(nn.Module):
  """xUnit (Kligvasser et al., CVPR 2018): ``x * exp(-BN(DWConv_k(relu(BN(x))))^2)``.

  The ATAC reference advertises xUnit without publishing it; this follows the xUnit paper with a
  ``kernel_size`` x ``kernel_size`` depthwise convolution (3 in the ATAC comparison plot,
  reconstructed) without bias, since a BatchNorm follows it. Submodules: ``bn_in``, ``dwconv``,
  ``bn_out``. Channels-last input with at least one spatial axis (rank >= 3): ``(N, L, C)``,
  ``(N, H, W, C)``, ``(N, D, H, W, C)``; the depthwise kernel spans every spatial axis
  (``(k, k, 1, C)`` for images).

  Introspection: each call sows ``gate`` (the input's shape, ``y == x * gate``) into the
  ``intermediates`` collection.

  Attributes:
    kernel_size: spatial size of the depthwise kernel.
    momentum: BatchNorm running-average momentum.
    epsilon: BatchNorm epsilon.
    dtype: computation and output dtype; ``None``: the promotion of input and parameter dtypes.
    param_dtype: parameter dtype.
    axis_name: the ``shard_map``/``pmap`` axis (or axes) over which the BatchNorm statistics are
      averaged, as ``nn.BatchNorm``'s; ``None``: per-device statistics.
    train: use batch statistics and update ``batch_stats``; give it here or at call time.
  """
  kernel_size: int = 3
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  axis_name: Any = None
  train: bool | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
    """Gates ``x``; ``train=True`` uses batch statistics and updates ``batch_stats``."""
    train = _conventions.merge_train(self.train, train, required=True)
    _checks.check_min_rank(x, min_rank=3, layer="XUnit")
    _checks.check_positive_int(self.kernel_size, option="kernel_size", layer="XUnit")
    _checks.check_momentum(self.momentum, layer="XUnit")
    _checks.check_positive(self.epsilon, option="epsilon", layer="XUnit")
    channels = x.shape[-1]
    dtype = _conventions.result_dtype(x, self.param_dtype, self.dtype)
    x = jnp.asarray(x, dtype)

    def batch_norm(name: str) -> nn.BatchNorm:
      return nn.BatchNorm(use_running_average=not train, momentum=self.momentum,
                          epsilon=self.epsilon, dtype=dtype, param_dtype=self.param_dtype,
                          axis_name=self.axis_name, name=name)

    h = nn.relu(batch_norm("bn_in")(x))
    h = nn.Conv(channels, (self.kernel_size,) * (x.ndim - 2), feature_group_count=channels,
                use_bias=False, padding="SAME", dtype=dtype, param_dtype=self.param_dtype,
                name="dwconv")(h)
    h = batch_norm("bn_out")(h)
    gate = jnp.exp(-jnp.square(h))
    self.sow("intermediates", "gate", gate)
    return x * gate
