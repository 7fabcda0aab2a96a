"""The ATAC gate in plain JAX: the reference every other implementation is tested against.

``y = x * sigmoid(BN_up(up(relu(BN_down(down(x))))))`` over the last (channel) axis of input of
any rank >= 2. JAX differentiates it in every mode (reverse, forward, higher order); it keeps the
usual activation-sized intermediates for the backward pass.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from atac_jax.ops import batch_norm, reductions
from atac_jax.ops.types import Affine, GateParams, GateStats, Moments, Projection


def project(x: jax.Array, projection: Projection) -> jax.Array:
  """``x @ kernel + bias`` over the last axis, in the kernel's dtype (``reductions.pointwise``)."""
  y = reductions.pointwise(x.astype(projection.kernel.dtype), projection.kernel)
  return y if projection.bias is None else y + projection.bias


def _norm(h, affine, stats, *, epsilon, axis_name):
  batch = batch_norm.moments(h, axis_name=axis_name, plain=True) if stats is None else stats
  return batch_norm.normalize(h, batch, affine, epsilon=epsilon, dtype=h.dtype), batch


def gate_logits(x: jax.Array, params: GateParams, stats: Optional[GateStats], *, epsilon: float,
                inner_relu: bool, axis_name: Any = None) -> tuple[jax.Array, GateStats]:
  """The gate's pre-sigmoid logits ``z`` and the statistics used (batch moments or ``stats``)."""
  h = project(x, params.down)
  p, down = _norm(h, params.norm_down, None if stats is None else stats.down, epsilon=epsilon,
                  axis_name=axis_name)
  a = jax.nn.relu(p) if inner_relu else p
  u = project(a, params.up)
  z, up = _norm(u, params.norm_up, None if stats is None else stats.up, epsilon=epsilon,
                axis_name=axis_name)
  return z, GateStats(down, up)


def gate(x: jax.Array, params: GateParams, stats: Optional[GateStats] = None, *,
         epsilon: float, inner_relu: bool, axis_name: Any = None):
  """The gated ``x``.

  Args:
    x: ``(..., C)`` input in the compute dtype.
    params: the gate's parameters.
    stats: running statistics (inference), or None to use the batch's (training).
    epsilon: BatchNorm epsilon.
    inner_relu: ReLU between the projections.
    axis_name: a ``shard_map``/``pmap`` axis over which batch statistics are global.

  Returns:
    With ``stats``: ``y``. Without: ``(y, GateStats)``, the batch moments.
  """
  z, batch = gate_logits(x, params, stats, epsilon=epsilon, inner_relu=inner_relu,
                         axis_name=axis_name)
  y = x * jax.nn.sigmoid(z).astype(x.dtype)
  return y if stats is not None else (y, batch)


def norm_gate(x: jax.Array, norm: Affine, params: GateParams, *, norm_epsilon: float,
              epsilon: float, inner_relu: bool, dtype: Any, axis_name: Any = None
              ) -> tuple[jax.Array, Moments, GateStats]:
  """``gate(BN(x))`` in training mode: ``(y, moments of x, gate batch moments)``."""
  moments = batch_norm.moments(x, axis_name=axis_name, plain=True)
  p = batch_norm.normalize(x, moments, norm, epsilon=norm_epsilon, dtype=dtype)
  y, batch = gate(p, params, None, epsilon=epsilon, inner_relu=inner_relu, axis_name=axis_name)
  return y, moments, batch
