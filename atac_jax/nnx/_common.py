"""Small helpers shared by the NNX modules: train/eval flag merging and variable containers."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from atac_jax.layers import _checks


def merge_mode(call: Optional[bool], attribute: Optional[bool], *, layer: str) -> bool:
  """``use_running_average`` from the call argument, else the attribute (``nnx.BatchNorm``'s rule).

  Raises:
    ValueError: if both are None.
  """
  value = attribute if call is None else call
  if value is None:
    raise ValueError(
        f"{layer}: no use_running_average given; accepted: a bool as the constructor argument, "
        f"the call argument, or set by model.train() / model.eval().")
  return bool(value)


class Pointwise(nnx.Module):
  """A 1x1 convolution's variables stored densely: ``kernel`` ``(in, out)``, optional ``bias``.

  The linen units store the same kernel as ``(1, 1, in, out)`` (``nn.Conv`` layout); the kernel
  carries that shape as its ``linen_shape`` metadata, which :func:`atac_jax.nnx.to_linen` uses.
  """

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool, param_dtype: Any,
               rngs: nnx.Rngs):
    init = nnx.initializers.lecun_normal()  # fan-in ``in``, as the linen 1x1 conv kernel
    self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), param_dtype),
                            linen_shape=(1, 1, in_features, out_features))
    self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else nnx.data(None)


class BatchNormState(nnx.Module):
  """A BatchNorm's variables over the last axis: ``scale``, ``bias`` (Param); ``mean``, ``var``
  (BatchStat, float32) -- the names and shapes of ``nn.BatchNorm`` / ``nnx.BatchNorm``."""

  def __init__(self, features: int, *, param_dtype: Any):
    _checks.check_positive_int(features, option="features", layer="BatchNormState")
    shape = (features,)
    self.scale = nnx.Param(jnp.ones(shape, param_dtype))
    self.bias = nnx.Param(jnp.zeros(shape, param_dtype))
    self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
    self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))

  def update(self, batch: Any, momentum: float) -> None:
    """Moves the running ``(mean, var)`` towards the batch moments (no gradient flows)."""
    for variable, value in zip((self.mean, self.var), batch):
      moved = momentum * variable.get_value() + (1 - momentum) * value
      variable.set_value(jax.lax.stop_gradient(moved))
