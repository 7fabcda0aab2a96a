"""SE, XUnit and AWConv for NNX: :class:`~atac_jax.nnx.LinenModule` wrappers of the linen units.

Not native rewrites (yet): each function builds the linen unit with the given options and wraps
it, so the computation is the linen unit's and the variables are NNX state (``params.<name>``,
``batch_stats.<name>``), converting with :func:`atac_jax.nnx.to_linen` / ``from_linen``.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from atac_jax import layers
from atac_jax.layers import _checks
from atac_jax.nnx.wrapper import LinenModule


def _wrap(linen_unit: Any, in_features: int, *, size: int, rngs: nnx.Rngs,
          use_running_average: Optional[bool], layer: str) -> LinenModule:
  _checks.check_positive_int(in_features, option="in_features", layer=layer)
  sample = jax.ShapeDtypeStruct((1, size, size, in_features), jnp.float32)
  return LinenModule(linen_unit, sample, rngs=rngs, use_running_average=use_running_average)


def SE(in_features: int, *, rngs: nnx.Rngs, use_running_average: Optional[bool] = False,
       **options: Any) -> LinenModule:
  """:class:`atac_jax.layers.SE` (options: ``reduction``, ``dtype``, ``param_dtype``) for NNX."""
  return _wrap(layers.SE(**options), in_features, size=1, rngs=rngs,
               use_running_average=use_running_average, layer="SE")


def XUnit(in_features: int, *, rngs: nnx.Rngs, use_running_average: Optional[bool] = False,
          **options: Any) -> LinenModule:
  """:class:`atac_jax.layers.XUnit` (options: ``kernel_size``, ``momentum``, ``epsilon``,
  ``dtype``, ``param_dtype``) for NNX; ``train()``/``eval()`` switch its BatchNorm."""
  return _wrap(layers.XUnit(**options), in_features, size=1, rngs=rngs,
               use_running_average=use_running_average, layer="XUnit")


def AWConv(in_features: int, features: int, kernel_size: Any, *, rngs: nnx.Rngs,
           **options: Any) -> LinenModule:
  """:class:`atac_jax.layers.AWConv` (``features``, ``kernel_size`` and its other options) for NNX.

  Args:
    in_features: input channels.
    features: output channels.
    kernel_size: int or ``(kh, kw)``.
    rngs: ``nnx.Rngs`` with a ``params`` stream.
    **options: ``strides``, ``padding``, ``reduction``, ``use_bias``, ``impl``, ``dtype``, ...
  """
  unit = layers.AWConv(features=features, kernel_size=kernel_size, **options)
  size = max(kernel_size if isinstance(kernel_size, int) else max(kernel_size), 8)
  return _wrap(unit, in_features, size=size, rngs=rngs, use_running_average=False,
               layer="AWConv")
