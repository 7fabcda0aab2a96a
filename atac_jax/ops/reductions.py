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


def _row_sum_sharding(a: jax.Array) -> Any:
  """``out_sharding`` of a product summing ``a``'s rows: replicated where JAX's mesh context
  types ``a`` as split over explicit axes (explicit sharding asks where such a sum lies), else
  None (XLA decides)."""
  mesh = jax.sharding.get_abstract_mesh()
  row_specs = tuple(jax.typeof(a).sharding.spec)[:a.ndim - 1]
  if mesh.empty or all(spec is None for spec in row_specs):
    return None
  if not any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    return None
  return jax.sharding.PartitionSpec()


def colsum(a: jax.Array) -> jax.Array:
  """Sum over all but the channel axis, accumulated and returned in at least float32.

  Written per :func:`atac_jax.ops.policy.choice` ``'colsum'`` (a product with ones on XLA:CPU).
  """
  a = rows(a)
  if policy.choice("colsum") == "ones_matmul":
    return jnp.dot(jnp.ones((a.shape[0],), a.dtype), a, preferred_element_type=acc_dtype(a.dtype),
                   out_sharding=_row_sum_sharding(a))
  return jnp.sum(a.astype(acc_dtype(a.dtype)), axis=0)


def _as_conv(a: jax.Array) -> bool:
  """Whether products with ``a`` are written as convolutions (policy ``'contraction'``)."""
  return a.ndim >= 3 and policy.choice("contraction") == "conv"


def _promoted(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Both operands in their common dtype (what ``jnp.dot`` does; a convolution requires it)."""
  dtype = jnp.result_type(a, b)
  return a.astype(dtype), b.astype(dtype)


def pointwise(x: jax.Array, kernel: jax.Array, *, preferred_element_type: Any = None
              ) -> jax.Array:
  """``x @ kernel`` on the channel axis of ``x (N, ..., C)`` with ``kernel (C, K)``.

  Accumulated in at least float32 and returned in ``preferred_element_type`` (default: the
  operands' common dtype), as the MXU does; XLA:CPU would otherwise accumulate a bfloat16
  convolution in bfloat16. Per :func:`atac_jax.ops.policy.choice` ``'contraction'``: a matrix
  product, or (an input of rank 3 or more) a 1x1 convolution, which XLA:TPU lays out and fuses
  as the network's own convolutions.
  """
  x, kernel = _promoted(x, kernel)
  out_dtype = preferred_element_type or x.dtype
  acc = jnp.promote_types(acc_dtype(x.dtype), out_dtype)
  if not _as_conv(x):
    return jnp.dot(x, kernel, preferred_element_type=acc).astype(out_dtype)
  r = x.ndim
  spatial = tuple(range(1, r - 1))
  numbers = lax.ConvDimensionNumbers((0, r - 1, *spatial), (r - 1, r - 2, *range(r - 2)),
                                     (0, r - 1, *spatial))
  out = lax.conv_general_dilated(x, kernel.reshape((1,) * (r - 2) + kernel.shape),
                                 (1,) * (r - 2), "VALID", dimension_numbers=numbers,
                                 preferred_element_type=acc)
  return out.astype(out_dtype)


def pointwise_sum(*pairs: tuple[jax.Array, jax.Array]) -> jax.Array:
  """``sum(x_i @ kernel_i)`` (each as :func:`pointwise`; ``x_i`` alike but for channels).

  Per policy ``'contraction'``: separate products, or (convolutions, every operand a whole
  number of 128-lane tiles wide) one convolution over the operands concatenated along the
  channel axis, so no partial sum is written between them. Narrower operands keep separate
  products: there the concatenation cost more bytes than it saved (``docs/ops_decisions.md``).
  """
  xs, kernels = zip(*pairs)
  if not _as_conv(xs[0]) or any(x.shape[-1] % 128 for x in xs):
    return sum(pointwise(x, k) for x, k in pairs)
  dtype = jnp.result_type(*xs)
  return pointwise(jnp.concatenate([x.astype(dtype) for x in xs], axis=-1),
                   jnp.concatenate(kernels, axis=0))


def tdot(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a^T b`` over all but the channel axis, accumulated and returned in at least float32.

  Per policy ``'contraction'``: a matrix product over rows, or (rank 3 or more) the weight
  gradient of a 1x1 convolution (a convolution whose window covers the spatial axes).
  """
  acc = acc_dtype(jnp.result_type(a, b))
  out_sharding = _row_sum_sharding(a)
  if not _as_conv(a) or out_sharding is not None:
    return lax.dot_general(rows(a), rows(b), (((0,), (0,)), ((), ())),
                           preferred_element_type=acc, out_sharding=out_sharding)
  a, b = _promoted(a, b)
  r = a.ndim
  spatial = tuple(range(1, r - 1))
  # Batch <- a's channels, features <- the batch axis, window <- the whole spatial extent.
  numbers = lax.ConvDimensionNumbers((r - 1, 0, *spatial), (r - 1, 0, *spatial),
                                     (0, r - 1, *spatial))
  out = lax.conv_general_dilated(a, b, (1,) * (r - 2), "VALID", dimension_numbers=numbers,
                                 preferred_element_type=acc)
  return out.reshape(a.shape[-1], b.shape[-1])


def gram(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(sum of the rows, a^T a)`` over all but the channel axis, in at least float32.

  Per policy ``'contraction'``: separately, or (convolutions) as one weight-gradient
  convolution of ``a`` with a column of ones appended, so the sums ride along in the same pass.
  """
  if not _as_conv(a) or _row_sum_sharding(a) is not None:
    return colsum(a), tdot(a, a)
  with_ones = jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], axis=-1)
  product = tdot(with_ones, a)  # (K + 1, K); the last row is the column sum
  return product[-1], product[:-1]


def sum_product(a: jax.Array, b: jax.Array) -> jax.Array:
  """``sum(a * b)`` over all but the channel axis, per channel, in at least float32.

  Per :func:`atac_jax.ops.policy.choice` ``'colsum'``: on XLA:CPU the diagonal of ``a^T b`` (a
  small matrix product, faster there than the reduction); elsewhere a reduction of the product,
  which XLA fuses into the pass that produces ``a`` or ``b``.
  """
  if policy.choice("colsum") == "ones_matmul":
    return diagonal(tdot(a, b))
  acc = acc_dtype(jnp.result_type(a, b))
  return colsum(a.astype(acc) * b.astype(acc))


def diagonal(square: jax.Array) -> jax.Array:
  """The diagonal of a small square matrix, as a masked column sum.

  ``jnp.diagonal`` lowers to a gather (inside a ``cond`` on TPU); the matrices here are
  ``(K, K)`` with ``K`` at most a few thousand, so the masked sum costs nothing.
  """
  return jnp.sum(square * jnp.eye(square.shape[0], dtype=square.dtype), axis=0)


def opaque_zero(a: jax.Array) -> jax.Array:
  """A float32 scalar zero that depends on ``a``'s first element (also where it is NaN or inf).

  Added to the (small) operands of the backward pass's recomputation, it ties the recomputation
  to the cotangent ``a`` without a pass over ``a`` (see :func:`opaque_zero_like`). Reading one
  element of a batch-sharded array broadcasts it from one device (a collective), so this serves
  where the batch lies on one device.
  """
  return opaque_zero_like(a.reshape(-1)[0].astype(jnp.float32))


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
