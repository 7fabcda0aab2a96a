"""AReLU: attention-based rectified linear unit (Chen et al., arXiv 2006.13858)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

ALPHA_RANGE = (0.01, 0.99)


class AReLU(nn.Module):
  """Element-wise sign-based attention with two learnable scalars per instance.

  ``AReLU(x) = clamp(alpha, 0.01, 0.99) * x`` for ``x < 0`` and ``(1 + sigmoid(beta)) * x`` for
  ``x >= 0``, computed as ``relu(x) * (1 + sigmoid(beta)) - relu(-x) * clamp(alpha)`` like the
  reference, so the gradient with respect to ``x`` is 0 at exactly ``x = 0`` and the gradient with
  respect to ``alpha`` is 0 outside the clamp range.

  Attributes:
    alpha_init: initial ``alpha`` (parameter of shape ``(1,)``), slope for negative inputs.
    beta_init: initial ``beta`` (parameter of shape ``(1,)``); the positive slope is
      ``1 + sigmoid(beta)``.
    dtype: computation dtype; ``None`` infers it from the input.
    param_dtype: parameter dtype.
  """
  alpha_init: float = 0.9
  beta_init: float = 2.0
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    """Applies AReLU element-wise; ``train`` is accepted for the common calling convention."""
    del train
    alpha = self.param("alpha", nn.initializers.constant(self.alpha_init), (1,), self.param_dtype)
    beta = self.param("beta", nn.initializers.constant(self.beta_init), (1,), self.param_dtype)
    x, alpha, beta = nn.dtypes.promote_dtype(x, alpha, beta, dtype=self.dtype)
    negative_slope = jnp.clip(alpha, *ALPHA_RANGE)
    positive_slope = 1 + nn.sigmoid(beta)
    return nn.relu(x) * positive_slope - nn.relu(-x) * negative_slope
