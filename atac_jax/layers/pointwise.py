"""A 1x1 convolution written as a dense contraction over the channel axis."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from atac_jax.layers import initializers


class PointwiseConv(nn.Module):
  """1x1 convolution on channels-last input of any rank, computed as ``x @ kernel[0, 0]``.

  The parameter is stored exactly as ``flax.linen.Conv`` stores a 1x1 kernel (``kernel`` of shape
  ``(1, 1, C_in, features)``, optional ``bias`` of shape ``(features,)``), so checkpoints are
  interchangeable with ``nn.Conv(features, (1, 1))``; the contraction is a plain ``dot_general``,
  which XLA lowers to a GEMM without the convolution machinery.

  A dense contraction rather than ``nn.Conv((1, 1))``: faster on XLA:CPU with its default
  fusions and no slower elsewhere (``docs/ops_decisions.md``).

  Attributes:
    features: number of output channels.
    use_bias: whether to add a bias.
    dtype: computation and output dtype; ``None``: the promotion of input and parameter dtypes.
    param_dtype: parameter dtype.
    kernel_init: kernel initializer (default: LeCun normal, flax's conv default, picklable).
    bias_init: bias initializer.
  """
  features: int
  use_bias: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = initializers.lecun_normal
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features),
                        self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) \
        if self.use_bias else None
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = jnp.einsum("...c,cf->...f", x, kernel[0, 0])
    if bias is not None:
      y = y + bias
    return y
