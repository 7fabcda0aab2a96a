"""Attention baselines that replace an activation: squeeze-excitation and xUnit."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from atac_jax.layers import _checks


class SE(nn.Module):
  """Squeeze-excitation gate used as an activation: ``x * sigmoid(W2 relu(W1 GAP(x)))``.

  One gate value per (sample, channel), from global average pooling and two fully connected
  layers with biases (``fc_down``: C -> C // r, ``fc_up``: C // r -> C), as in Hu et al. (SENet).
  Unlike ``ATAC(use_global=True)`` it has no BatchNorm.

  Attributes:
    reduction: bottleneck reduction ``r`` (SENet uses 16; ``C // r`` is at least 1).
    dtype: computation dtype; ``None`` infers it from the input.
    param_dtype: parameter dtype.
  """
  reduction: int = 16
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    """Gates ``x`` (NHWC) channel-wise; ``train`` is accepted for the common convention."""
    del train
    _checks.check_rank(x, rank=4, layer="SE")
    channels = x.shape[-1]
    hidden = _checks.bottleneck_width(channels, self.reduction, layer="SE")
    if self.dtype is not None:
      x = jnp.asarray(x, self.dtype)
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = nn.Dense(hidden, dtype=self.dtype, param_dtype=self.param_dtype, name="fc_down")(s)
    s = nn.relu(s)
    s = nn.Dense(channels, dtype=self.dtype, param_dtype=self.param_dtype, name="fc_up")(s)
    return x * nn.sigmoid(s).astype(x.dtype)


class XUnit(nn.Module):
  """xUnit (Kligvasser et al., CVPR 2018): ``x * exp(-BN(DWConv_k(relu(BN(x))))^2)``.

  The ATAC reference advertises xUnit without publishing it; this follows the xUnit paper with a
  ``kernel_size`` x ``kernel_size`` depthwise convolution (3 in the ATAC comparison plot,
  reconstructed) without bias, since a BatchNorm follows it. Submodules: ``bn_in``, ``dwconv``,
  ``bn_out``.

  Attributes:
    kernel_size: spatial size of the depthwise kernel.
    momentum: BatchNorm running-average momentum.
    epsilon: BatchNorm epsilon.
    dtype: computation dtype; ``None`` infers it from the input.
    param_dtype: parameter dtype.
  """
  kernel_size: int = 3
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    """Gates ``x`` (NHWC); ``train=True`` uses batch statistics and updates ``batch_stats``."""
    _checks.check_rank(x, rank=4, layer="XUnit")
    _checks.check_positive_int(self.kernel_size, option="kernel_size", layer="XUnit")
    _checks.check_momentum(self.momentum, layer="XUnit")
    _checks.check_positive(self.epsilon, option="epsilon", layer="XUnit")
    channels = x.shape[-1]
    if self.dtype is not None:
      x = jnp.asarray(x, self.dtype)

    def batch_norm(name: str) -> nn.BatchNorm:
      return nn.BatchNorm(use_running_average=not train, momentum=self.momentum,
                          epsilon=self.epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                          name=name)

    h = nn.relu(batch_norm("bn_in")(x))
    h = nn.Conv(channels, (self.kernel_size, self.kernel_size), feature_group_count=channels,
                use_bias=False, padding="SAME", dtype=self.dtype, param_dtype=self.param_dtype,
                name="dwconv")(h)
    h = batch_norm("bn_out")(h)
    return x * jnp.exp(-jnp.square(h)).astype(x.dtype)
