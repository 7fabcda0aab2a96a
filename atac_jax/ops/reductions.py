"""Row reductions and matrix products over all but the channel axis (per-backend forms)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from atac_jax.ops import policy


def acc_dtype(dtype: Any) -> Any:
  """The accumulation dtype for ``dtype``: at least float32."""
  return jnp.promote_types(dtype, jnp.float32)


def rows(a: jax.Array) -> jax.Array:
  """``a`` as a matrix ``(rows, channels)``."""
  return a.reshape(-1, a.shape[-1])


def colsum(a: jax.Array) -> jax.Array:
  """Sum over all but the channel axis, accumulated and returned in at least float32.

  Written per :func:`atac_jax.ops.policy.choice` ``'colsum'`` (a product with ones on XLA:CPU).
  """
  a = rows(a)
  if policy.choice("colsum") == "ones_matmul":
    return jnp.dot(jnp.ones((a.shape[0],), a.dtype), a, preferred_element_type=acc_dtype(a.dtype))
  return jnp.sum(a.astype(acc_dtype(a.dtype)), axis=0)


def tdot(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a^T b`` over all but the channel axis, accumulated and returned in at least float32."""
  a, b = rows(a), rows(b)
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                         preferred_element_type=acc_dtype(jnp.result_type(a, b)))


def diagonal(square: jax.Array) -> jax.Array:
  """The diagonal of a small square matrix, as a masked column sum.

  ``jnp.diagonal`` lowers to a gather (inside a ``cond`` on TPU); the matrices here are
  ``(K, K)`` with ``K`` at most a few thousand, so the masked sum costs nothing.
  """
  return jnp.sum(square * jnp.eye(square.shape[0], dtype=square.dtype), axis=0)


def opaque_zero_like(a: jax.Array) -> jax.Array:
  """Zeros shaped like ``a`` that XLA cannot fold away (also where ``a`` is NaN or inf).

  Added element-wise to an operand of the backward pass's recomputation, it ties the
  recomputation to the cotangent ``a``: XLA can then neither merge it with the forward pass (CSE)
  nor schedule it early, either of which would keep the bottleneck alive from the forward to the
  backward pass. An optimisation barrier (``jax.checkpoint``'s way) is dropped by XLA:CPU before
  CSE. The zeros are element-wise, so a batch-sharded cotangent needs no collective.
  """
  a = lax.stop_gradient(a)
  return jnp.where(jnp.isfinite(a), a * 0, 0).astype(a.dtype)
