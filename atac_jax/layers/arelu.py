"""AReLU: attention-based rectified linear unit (Chen et al., arXiv 2006.13858)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from atac_jax.layers import _conventions

ALPHA_RANGE = (0.01, 0.99)
PARAM_SHAPES = {"alpha": (1,), "beta": (1,)}


def slopes(alpha: jax.Array, beta: jax.Array) -> tuple[jax.Array, jax.Array]:
  """AReLU's slopes from its parameters: ``(clip(alpha, 0.01, 0.99), 1 + sigmoid(beta))``."""
  return jnp.clip(alpha, *ALPHA_RANGE), 1 + jax.nn.sigmoid(beta)


def is_arelu_params(tree: Any) -> bool:
  """Whether ``tree`` is one AReLU unit's ``params``: exactly ``alpha`` and ``beta``, shape (1,).

  The parameter contract of :class:`AReLU` (names and shapes are part of the stable API), for
  code that holds only a parameter tree (e.g. the trainer's metrics).
  """
  return (isinstance(tree, dict) or hasattr(tree, "keys")) and set(tree) == set(PARAM_SHAPES) \
      and all(getattr(tree[k], "shape", None) == s for k, s in PARAM_SHAPES.items())


class AReLU(nn.Module):
  """Element-wise sign-based attention with two learnable scalars per instance.

  ``AReLU(x) = clamp(alpha, 0.01, 0.99) * x`` for ``x < 0`` and ``(1 + sigmoid(beta)) * x`` for
  ``x >= 0``, computed as ``relu(x) * (1 + sigmoid(beta)) - relu(-x) * clamp(alpha)`` like the
  reference, so the gradient with respect to ``x`` is 0 at exactly ``x = 0`` and the gradient with
  respect to ``alpha`` is 0 outside the clamp range. Any input rank.

  Introspection: each call sows ``negative_slope`` and ``positive_slope`` (shape ``(1,)``) into
  the ``intermediates`` collection (``apply(..., mutable=["intermediates"])``), and
  :meth:`slopes` returns them (``unit.apply(variables, method="slopes")``).

  Attributes:
    alpha_init: initial ``alpha`` (parameter of shape ``(1,)``), slope for negative inputs.
    beta_init: initial ``beta`` (parameter of shape ``(1,)``); the positive slope is
      ``1 + sigmoid(beta)``.
    dtype: computation and output dtype; ``None``: the promotion of input and parameter dtypes.
    param_dtype: parameter dtype.
    train: accepted for the common convention (the result does not depend on it); give it here
      or at call time, not both.
  """
  alpha_init: float = 0.9
  beta_init: float = 2.0
  dtype: Any = None
  param_dtype: Any = jnp.float32
  train: bool | None = None

  def setup(self) -> None:
    self.alpha = self.param("alpha", nn.initializers.constant(self.alpha_init),
                            PARAM_SHAPES["alpha"], self.param_dtype)
    self.beta = self.param("beta", nn.initializers.constant(self.beta_init),
                           PARAM_SHAPES["beta"], self.param_dtype)

  def slopes(self) -> tuple[jax.Array, jax.Array]:
    """``(negative_slope, positive_slope)``, each of shape ``(1,)``, in ``param_dtype``."""
    return slopes(self.alpha, self.beta)

  def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
    """Applies AReLU element-wise; ``train`` is accepted for the common calling convention."""
    _conventions.merge_train(self.train, train, required=False)
    negative_slope, positive_slope = self.slopes()
    self.sow("intermediates", "negative_slope", negative_slope)
    self.sow("intermediates", "positive_slope", positive_slope)
    x, negative_slope, positive_slope = nn.dtypes.promote_dtype(
        x, negative_slope, positive_slope, dtype=self.dtype)
    return nn.relu(x) * positive_slope - nn.relu(-x) * negative_slope
