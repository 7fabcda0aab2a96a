"""The lean gate's Pallas backward on TPU: which kernels a unit takes.

Two sets of kernels, the first that applies:

1. the two-pass kernels of :mod:`atac_jax.ops.pallas_backward` (float32; they accumulate the
   ``C x K x K`` three-way products on chip, so they fit narrow units: ResNet-20's widths);
2. the three-pass row kernels of :mod:`atac_jax.ops.pallas_rows` with TPU tiles (bfloat16, any
   width whose tile fits on chip: ResNet-50's units). They read the input and the cotangent
   three times, not twice, but need nothing ``C x K x K``. Each pass recomputes the gate's
   products (five bfloat16 MXU passes over the rows a kernel, against the XLA backward's six in
   all), so at ResNet-50's ``K = C/2`` they are bound by the MXU rather than by memory; in
   float32 at ``HIGHEST`` precision (six passes a product) they would be several times slower,
   so float32 units too wide for the two-pass kernels keep the XLA backward.

The row kernels take each device's activation as XLA:TPU lays out a channels-minor
``(N, H, W, C)`` array, positions major and the batch within them (``(H, W, N, C)``), so
flattening it to rows ``(H W N, C)`` is a bitcast; that needs the channels on the lanes
(``pallas_tiles.batch_minor_layout`` false) and a device's batch a multiple of the sublane
tile (8 rows for float32, 16 for bfloat16).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax

from atac_jax.ops import pallas_backward, pallas_rows
from atac_jax.ops.pallas_backward import DataParallel, shards
from atac_jax.ops.pallas_tiles import (LANES, MiB, SUBLANES, VMEM_BUDGET, VMEM_LIMIT_FLOOR,
                                       VMEM_LIMIT_MARGIN, _round_up, batch_minor_layout, tiling)
from atac_jax.ops.types import GateParams, GateStats, Moments

MAX_ROW_BLOCK = 1024  # rows a grid step takes at most (more only adds on-chip memory)
# Tile-sized float32 temporaries alive at once (the dx pass: x, dy, xc, uc, z, sig, gate_dy, dz,
# du, dx and their products), and bottleneck-sized ones (hc, a, da, dh, du Wu^T, ...); rounded up.
_WORKING_C, _WORKING_K = 12, 8


def _sublanes(dtype) -> int:
  """Rows of a TPU tile of ``dtype``: 8 for 32-bit, 16 for bfloat16 (two rows a sublane)."""
  return SUBLANES * 4 // jnp.dtype(dtype).itemsize


def row_vmem_bytes(row_block: int, c: int, k: int, dtype) -> int:
  """A generous estimate of the on-chip memory a row kernel's grid step needs: the
  double-buffered ``x``, ``dy`` and ``dx`` tiles, the float32 working arrays, the four
  ``C x K`` kernels (double-buffered, the down-projection's in float32) and the resident
  ``C x K`` sums (lanes padded to 128, rows to 8)."""
  item = jnp.dtype(dtype).itemsize
  cl, kl = _round_up(c, LANES), _round_up(k, LANES)
  rows = _round_up(row_block, _sublanes(dtype))
  tiles = 3 * 2 * rows * cl * item
  working = 4 * rows * (_WORKING_C * cl + _WORKING_K * kl)
  c_by_k = _round_up(c, SUBLANES) * kl + _round_up(k, SUBLANES) * cl  # one (C, K) and one (K, C)
  weights = 2 * (c_by_k * 4 + c_by_k * item)
  sums = 2 * 4 * c_by_k
  return tiles + working + weights + sums


def row_geometry(rows: int, c: int, k: int, dtype, *,
                 bf16_products: bool = False) -> Optional[pallas_rows.Geometry]:
  """The row kernels' TPU :class:`~atac_jax.ops.pallas_rows.Geometry` for ``rows`` rows a device
  of ``dtype``, or None where no row block fits :data:`~atac_jax.ops.pallas_tiles.VMEM_BUDGET`:
  the largest divisor of ``rows`` that is a whole number of ``dtype``'s tiles, at most
  :data:`MAX_ROW_BLOCK`, within the budget. ``bf16_products`` (a bfloat16 input and kernels):
  the products take bfloat16 operands, as XLA's backward multiplies them (the down-projection
  in two, for float32's accuracy: ``pallas_rows._project``); else float32 at ``HIGHEST``, the
  two-pass kernels' precision."""
  unit = _sublanes(dtype)
  fits = [b for b in range(unit, min(rows, MAX_ROW_BLOCK) + 1, unit)
          if rows % b == 0 and row_vmem_bytes(b, c, k, dtype) <= VMEM_BUDGET]
  if not fits:
    return None
  block = fits[-1]
  need = row_vmem_bytes(block, c, k, dtype)
  limit = max(VMEM_LIMIT_FLOOR, _round_up(VMEM_LIMIT_MARGIN * need, MiB))
  return pallas_rows.Geometry(
      rows, c, k, block, c, 1, rows // block,
      lax.Precision.DEFAULT if bf16_products else lax.Precision.HIGHEST,
      mxu_dtype=jnp.bfloat16 if bf16_products else None, tiled=True, vmem_limit=limit)


def rows_supported(x: jax.Array, params: GateParams, *, inner_relu: bool,
                   parallel: Optional[DataParallel] = None) -> Optional[str]:
  """None where the row kernels apply to ``x`` on TPU, else the reason."""
  c, k = x.shape[-1], params.down.kernel.shape[-1]
  if x.ndim < 3:
    return f"input of rank {x.ndim}; the kernels take rank >= 3 (batch, spatial..., channels)"
  dtypes = {x.dtype, params.down.kernel.dtype, params.up.kernel.dtype}
  if dtypes != {jnp.dtype(jnp.bfloat16)}:
    return (f"dtype {x.dtype} (kernels {params.down.kernel.dtype}, {params.up.kernel.dtype}); the "
            "row kernels take bfloat16 (in float32 their products at HIGHEST precision, 5 "
            "recomputed per pass, would be bound by the MXU)")
  if not inner_relu:
    return "inner_relu=False"
  n = shards(parallel)
  if x.shape[0] % n:
    return f"batch {x.shape[0]} does not split into {n} shards"
  batch = x.shape[0] // n
  if batch_minor_layout(batch, c):
    return (f"{c} channels lie batch-minor beside a batch of {batch} a device; the row kernels "
            "take the channels on the lanes")
  if batch % _sublanes(x.dtype):
    return (f"batch {batch} a device is not a multiple of {_sublanes(x.dtype)} ({x.dtype} "
            "tiles): the rows would be relaid out")
  rows = batch * math.prod(x.shape[1:-1])
  if row_geometry(rows, c, k, x.dtype) is None:
    return (f"a row block needs ~{row_vmem_bytes(_sublanes(x.dtype), c, k, x.dtype) / MiB:.1f} "
            f"MiB of on-chip memory (C={c}, K={k}); the budget is {VMEM_BUDGET / MiB:.0f} MiB")
  return None


def supported(x: jax.Array, params: GateParams, *, inner_relu: bool,
              parallel: Optional[DataParallel] = None) -> Optional[str]:
  """None where either set of kernels applies to ``x`` (split per ``parallel``), else both
  reasons."""
  two_pass = pallas_backward.supported(x, params, inner_relu=inner_relu, parallel=parallel)
  if two_pass is None:
    return None
  rows = rows_supported(x, params, inner_relu=inner_relu, parallel=parallel)
  if rows is None:
    return None
  return f"{two_pass}; the row kernels: {rows}"


def backward(x: jax.Array, params: GateParams, stats: GateStats, gram, dy: jax.Array,
             dstats: Optional[GateStats], *, epsilon: float, norm=None,
             norm_dstats: Optional[Moments] = None, interpret: bool = False,
             parallel: Optional[DataParallel] = None, axis_name: Any = None):
  """Same contract as :func:`atac_jax.ops.pallas_backward.backward`: the two-pass kernels where
  they apply, else the row kernels (see the module docstring)."""
  kwargs = dict(epsilon=epsilon, norm=norm, norm_dstats=norm_dstats, interpret=interpret,
                parallel=parallel, axis_name=axis_name)
  if pallas_backward.supported(x, params, inner_relu=True, parallel=parallel) is None:
    return pallas_backward.backward(x, params, stats, gram, dy, dstats, **kwargs)
  c, k = x.shape[-1], params.down.kernel.shape[-1]
  layout = tiling(x.shape, shards(parallel))  # channels-minor: (positions, N, C) is a bitcast
  rows = x.size // c // shards(parallel)
  bf16 = x.dtype == params.down.kernel.dtype == params.up.kernel.dtype == jnp.bfloat16
  g = row_geometry(rows, c, k, x.dtype, bf16_products=bf16)
  if g is None or layout.batch_minor:
    reason = rows_supported(x, params, inner_relu=True, parallel=parallel)
    raise ValueError(f"pallas_tpu.backward: {reason}")
  return pallas_rows.backward(x, params, stats, gram, dy, dstats, g=g, to_rows=layout.to_rows,
                              from_rows=layout.from_rows, batch_axis=1, **kwargs)
