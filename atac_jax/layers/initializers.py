"""Picklable weight initialisers (flax's factories return closures, which ``pickle`` cannot store).

``VarianceScaling(1.0, "fan_in", "truncated_normal")`` draws exactly what
``flax.linen.initializers.lecun_normal()`` draws for the same key, shape and dtype, so modules that
default to these give the same parameters as before and can be pickled.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class VarianceScaling:
  """``jax.nn.initializers.variance_scaling`` as a frozen (hashable, picklable) dataclass.

  Attributes:
    scale: the variance scale.
    mode: ``'fan_in'``, ``'fan_out'`` or ``'fan_avg'``.
    distribution: ``'truncated_normal'``, ``'normal'`` or ``'uniform'``.
    in_axis: input axis of the weight (for the fan computation).
    out_axis: output axis of the weight.
  """
  scale: float
  mode: str
  distribution: str
  in_axis: int = -2
  out_axis: int = -1

  def __call__(self, key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32
               ) -> jax.Array:
    init = jax.nn.initializers.variance_scaling(self.scale, self.mode, self.distribution,
                                                in_axis=self.in_axis, out_axis=self.out_axis)
    return init(key, shape, dtype)


lecun_normal = VarianceScaling(1.0, "fan_in", "truncated_normal")
"""Flax's default kernel initialiser (``nn.initializers.lecun_normal()``), picklable."""

he_normal = VarianceScaling(2.0, "fan_in", "normal")
"""He (MSRA) normal, fan-in: ``nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')``."""
