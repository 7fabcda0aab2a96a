"""``BatchNormVariables``: an ``nn.BatchNorm``'s variables for ops that fuse the normalisation."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from atac_jax import ops
from atac_jax.layers import _checks


class BatchNormVariables(nn.Module):
  """The variables of an ``nn.BatchNorm`` (last axis, scale and bias), for :class:`ATAC`'s ``norm``.

  Created under the name the ``nn.BatchNorm`` would have, it holds the very same variables
  (``params``: ``scale``, ``bias``; ``batch_stats``: ``mean``, ``var``; same shapes, initial
  values and creation order), so checkpoints do not change when a host network fuses its
  BatchNorm into the following ATAC unit. ATAC's own ``bn_down`` and ``bn_up`` are these too.

  Attributes:
    features: channels (the input's last axis).
    momentum: running-average momentum (``nn.BatchNorm``'s meaning).
    epsilon: variance epsilon.
    dtype: output dtype of :meth:`normalize` (None: the input's, promoted with the params').
    param_dtype: parameter dtype.
    axis_name: ``shard_map``/``pmap`` axis over which :meth:`normalize`'s statistics are global.
  """
  features: int
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  axis_name: Any = None

  def setup(self):
    _checks.check_positive_int(self.features, option="features", layer="BatchNormVariables")
    _checks.check_momentum(self.momentum, layer="BatchNormVariables")
    _checks.check_positive(self.epsilon, option="epsilon", layer="BatchNormVariables")
    f = (self.features,)
    self.mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(f, jnp.float32))
    self.var = self.variable("batch_stats", "var", lambda: jnp.ones(f, jnp.float32))
    self.scale = self.param("scale", nn.initializers.ones, f, self.param_dtype)
    self.bias = self.param("bias", nn.initializers.zeros, f, self.param_dtype)

  @property
  def affine(self) -> ops.Affine:
    """The learned ``(scale, bias)``."""
    return ops.Affine(self.scale, self.bias)

  @property
  def running(self) -> ops.Moments:
    """The running ``(mean, var)``."""
    return ops.Moments(self.mean.value, self.var.value)

  def update(self, batch: ops.Moments) -> None:
    """Moves the running averages towards the batch's ``(mean, var)`` (not during init)."""
    if self.is_initializing():
      return
    for variable, value in zip((self.mean, self.var), batch):
      variable.value = self.momentum * variable.value + (1 - self.momentum) * value

  def normalize(self, x: jax.Array, *, train: bool) -> jax.Array:
    """``nn.BatchNorm(use_running_average=not train)(x)`` with these variables."""
    dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
    stats = ops.batch_norm.moments(x, axis_name=self.axis_name) if train else self.running
    if train:
      self.update(stats)
    return ops.batch_norm.normalize(x, stats, self.affine, epsilon=self.epsilon, dtype=dtype)
