"""Training-mode BatchNorm over the last axis: statistics, normalisation and its calculus."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from atac_jax.ops import reductions
from atac_jax.ops.types import Affine, Moments


def moments(x: jax.Array, *, axis_name: Any = None, plain: bool = False) -> Moments:
  """``nn.BatchNorm``'s batch statistics over all but the last axis (fast variance).

  ``E[x^2] - E[x]^2`` clipped at 0, accumulated in float32; with ``axis_name`` the sums are
  taken over the named (``shard_map``/``pmap``) axis too, so the statistics are global.
  ``plain`` sums with ``jnp.sum`` (XLA fuses the squares into the reduction) instead of the
  policy's :func:`~atac_jax.ops.reductions.colsum`.
  """
  x32 = reductions.rows(x).astype(reductions.acc_dtype(x.dtype))
  count = jnp.asarray(x32.shape[0], x32.dtype)
  total = (lambda a: jnp.sum(a, axis=0)) if plain else reductions.colsum
  total, total_sq, count = whole_batch((total(x32), total(jnp.square(x32)), count), axis_name)
  mean = total / count
  return Moments(mean, jnp.maximum(0.0, total_sq / count - jnp.square(mean)))


def scale_shift(stats: Moments, affine: Affine, epsilon: float) -> tuple[jax.Array, jax.Array]:
  """``(mul, shift)`` with ``normalize(x) = x * mul + shift``."""
  mul = lax.rsqrt(stats.var + epsilon) * affine.scale
  return mul, affine.bias - stats.mean * mul


def normalize(x: jax.Array, stats: Moments, affine: Affine, *, epsilon: float,
              dtype: Any) -> jax.Array:
  """``(x - mean) * rsqrt(var + eps) * scale + bias`` in ``nn.BatchNorm``'s order of ops."""
  mul = lax.rsqrt(stats.var + epsilon) * affine.scale
  return (((x - stats.mean) * mul) + affine.bias).astype(dtype)


def whole_batch(sums: Any, axis_name: Any = None) -> Any:
  """Sums over this device's rows -> the whole batch's (``psum`` over ``axis_name``, if any)."""
  return sums if axis_name is None else lax.psum(sums, axis_name)


def global_count(count, axis_name: Any = None):
  """The rows of the whole batch: ``count`` rows on each of the devices of ``axis_name``."""
  return count if axis_name is None else count * lax.psum(1, axis_name)


def input_gradient_terms(a: jax.Array, rs: jax.Array, sum_d: jax.Array,
                         sum_d_centered: jax.Array, count, dstats: Moments | None, *,
                         axis_name: Any = None) -> tuple[jax.Array, jax.Array]:
  """``(c0, c1)`` of a training-mode BatchNorm's input gradient ``dx = a * d + c0 + c1 * xc``.

  For ``p = xc * rs * g + b`` (``xc = x - mean``, ``rs = rsqrt(var + eps)``, ``a = rs * g``) with
  output cotangent ``d``: ``sum_d = sum(d)``, ``sum_d_centered = sum(d * xc)`` over the
  ``count`` rows; ``dstats`` are the cotangents of the returned batch statistics (None, or None
  fields, where zero). With ``axis_name`` (statistics over the devices of a ``shard_map``/``pmap``
  axis) the sums and ``count`` are this device's and the terms are the whole batch's: the sums
  are ``psum``-ed here, and only here, so every other sum a backward pass takes (its parameter
  gradients) stays this device's part.
  """
  sum_d, sum_d_centered = whole_batch((sum_d, sum_d_centered), axis_name)
  count = global_count(count, axis_name)
  dmean, dvar = (None, None) if dstats is None else dstats
  c0 = -a * sum_d / count + (0.0 if dmean is None else dmean / count)
  c1 = -a * rs * rs * sum_d_centered / count + (0.0 if dvar is None else 2.0 * dvar / count)
  return c0, c1


def projection_gradients(a_total: jax.Array, a_gram: jax.Array, kernel: jax.Array,
                         shift: jax.Array, mul: jax.Array, rs: jax.Array, sum_d: jax.Array,
                         sum_d_centered: jax.Array, a_d: jax.Array, count, dstats: Moments | None,
                         *, bias: bool, axis_name: Any = None):
  """A training-mode BatchNorm after a projection ``u = a @ kernel + b``, from row sums.

  With ``uc = u - mean = a @ kernel + shift`` and output cotangent ``d``:
  ``(c0, c1, dkernel, dbias or None)`` (``du = mul * d + c0 + c1 * uc``, never written) from
  ``a_total = sum(a)``, ``a_gram = a^T a``, ``a_d = a^T d``, ``sum_d`` and
  ``sum_d_centered = sum(d * uc)``; ``mul``, ``rs``, ``axis_name`` as
  :func:`input_gradient_terms` (the gradients are then this device's parts).
  """
  c0, c1 = input_gradient_terms(mul, rs, sum_d, sum_d_centered, count, dstats,
                                axis_name=axis_name)
  a_uc = a_gram @ kernel + jnp.outer(a_total, shift)  # a^T uc
  dkernel = mul * a_d + jnp.outer(a_total, c0) + c1 * a_uc
  sum_uc = a_total @ kernel + count * shift
  dbias = mul * sum_d + count * c0 + c1 * sum_uc if bias else None
  return c0, c1, dkernel, dbias
