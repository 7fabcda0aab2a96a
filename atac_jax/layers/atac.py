"""ATAC: attention as activation (Dai et al., ICPR 2020, arXiv 2007.07729).

``ATAC(x) = x * sigmoid(BN(PWConv_up(relu(BN(PWConv_down(x))))))`` -- a local channel-attention gate
computed point-wise at every pixel, used in place of ReLU. With ``use_global=True`` the input is
global-average-pooled first, which turns the unit into an SE-like channel gate that keeps its BNs.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from atac_jax.layers import _checks
from atac_jax.layers.pointwise import PointwiseConv


class ATAC(nn.Module):
  """Local channel attention gate ``x * sigmoid(bottleneck(x))`` on NHWC input.

  Submodules are named like the reference (MXNet) implementation so weights port 1:1:
  ``conv_down`` (kernel ``(1, 1, C, C // r)``), ``bn_down``, ``conv_up`` (kernel
  ``(1, 1, C // r, C)``), ``bn_up``. ``C // r`` is at least 1.

  Trainable parameters per unit: ``2C^2/r + 2C/r + 2C`` (BN scale and bias included; plus
  ``C/r + C`` with ``use_bias``); BN running statistics add ``2C/r + 2C``.

  Attributes:
    reduction: bottleneck reduction ``r`` (the reference README uses 2).
    use_global: global-average-pool before the bottleneck (one gate per channel, SE-like).
    inner_relu: apply ReLU between the two point-wise convs (the reference's ``useReLU``; on in
      the published commands, off by default in its CIFAR script).
    use_bias: give the point-wise convs biases (the Paddle AlexNet reproduction does).
    momentum: BatchNorm running-average momentum (reference: 0.9).
    epsilon: BatchNorm epsilon (reference: 1e-5).
    dtype: computation dtype (e.g. ``jnp.bfloat16``); ``None`` infers it from the input.
    param_dtype: parameter dtype.
  """
  reduction: int = 2
  use_global: bool = False
  inner_relu: bool = True
  use_bias: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    """Gates ``x`` (NHWC). ``train=True`` uses batch statistics and updates ``batch_stats``."""
    _checks.check_rank(x, rank=4, layer="ATAC")
    _checks.check_momentum(self.momentum, layer="ATAC")
    _checks.check_positive(self.epsilon, option="epsilon", layer="ATAC")
    channels = x.shape[-1]
    hidden = _checks.bottleneck_width(channels, self.reduction, layer="ATAC")
    if self.dtype is not None:
      x = jnp.asarray(x, self.dtype)

    def batch_norm(name: str) -> nn.BatchNorm:
      return nn.BatchNorm(use_running_average=not train, momentum=self.momentum,
                          epsilon=self.epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                          name=name)

    h = jnp.mean(x, axis=(1, 2), keepdims=True) if self.use_global else x
    h = PointwiseConv(hidden, use_bias=self.use_bias, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="conv_down")(h)
    h = batch_norm("bn_down")(h)
    if self.inner_relu:
      h = nn.relu(h)
    h = PointwiseConv(channels, use_bias=self.use_bias, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="conv_up")(h)
    h = batch_norm("bn_up")(h)
    return x * nn.sigmoid(h).astype(x.dtype)
