"""The lean gate's training backward pass as three Pallas kernels for NVIDIA GPUs (Triton).

Same values and contract as :func:`atac_jax.ops.pallas_backward.backward` (the TPU kernels) and
:func:`atac_jax.ops.lean.backward` with batch statistics: ``inner_relu``, rank >= 3, float32 or
bfloat16 input (read and written in its dtype, computed in float32). Checked in Pallas'
interpreter on the CPU against both and against plain autodiff of the reference op
(``tests/test_pallas_gpu.py``); the same tests lower the kernels to Triton IR, and they compile
deviceless for sm_80 and sm_90 with the CUDA plugin.

The three kernels are :mod:`atac_jax.ops.pallas_rows`' (its docstring says why three passes
and what each computes); this module cuts the rows for a GPU. The programs of a GPU grid run
in parallel, so nothing is accumulated across them: each program owns a slot of every summed
output and writes its partial sums there; XLA adds the slots up (``3 K C`` floats a program).

Layout (row form): ``x`` is ``(R, C)``, ``R`` = batch x positions, channels minor: the
``(N, ..., C)`` activation as it lies in memory on a GPU, so no transpose. A program takes
``steps`` blocks of ``row_block`` rows; within a block the ``C`` channels are swept in chunks
of ``chunk`` channels (the bottleneck ``hc`` needs all of them before anything else), so a
tile in registers is at most ``row_block x max(chunk, K)`` (8192 floats; a ``K x chunk``
product twice that) for every ``C`` up to ResNet-50's 2048 and ``K`` up to 512. A program's
partial sums stay in its output slot across its row blocks (read, add, write; a barrier
between blocks, since Triton may map an element to different threads in the load and the
store); the number of programs trades the partials' bytes (``3 K C`` floats a program, written
and read back, against ``7 C`` a row for the passes) against filling the GPU
(:func:`geometry`). No software pipelining (``NUM_STAGES = 1``): two stages need more shared
memory than an A100 has at ``C >= 1024``.

Triton constraints: tensor sizes are powers of two and a matrix product's operands at least
16 in each dimension. ``C`` must be a power of two >= 16; the bottleneck ``K`` is padded to a
power of two >= 16 with zero weights and zero constants, so its padded units are inert
(``hc = 0``, ``a = 0``, ``mask = 0``, ``da = 0``, ``dh = 0``) and their sums are dropped. The
rows ``R`` (per device) must be a multiple of 16, since a row block must divide them.

Products run at :data:`PRECISION`: ``DEFAULT`` is TF32 on Ampere and newer, what XLA uses for
the float32 products of the XLA backward on the same GPU (the kernels are then memory-bound;
IEEE float32 products would make the late ResNet-50 stages compute-bound on the CUDA cores).
In the interpreter on the CPU every precision is exact float32 (or float64 under x64: the
kernels compute in float64 for a float64 input, which the tests use; ``supported`` admits
float32 and bfloat16 only). A bfloat16 input's gradients are the float32 computation rounded
once, closer to the float32 backward's than the XLA backward's in bfloat16.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax

from atac_jax.ops import pallas_rows
from atac_jax.ops.pallas_backward import DataParallel, shards
from atac_jax.ops.pallas_rows import Geometry
from atac_jax.ops.types import GateParams, GateStats, Moments

PRECISION = lax.Precision.DEFAULT  # TF32 products on Ampere+ (as XLA's); exact on the CPU
MIN_CHANNELS = 16  # Triton's matrix products take operands >= 16 in each dimension
MAX_BOTTLENECK = 512  # padded K: a (16, K) tile within TILE_ELEMENTS (compiled: K = 512 fits)
TILE_ELEMENTS = 8192  # the most elements of a tile a program holds (row_block x chunk or K)
MAX_ROW_BLOCK = 256
ROWS_PER_PARTIAL = 4  # a program takes >= 4 K rows: its partial sums <= ~1/5 of the traffic
MIN_PROGRAMS = 32  # but no more rows than leave this many programs, where the rows allow


def _pow2_at_least(n: int, floor: int) -> int:
  return max(floor, 1 << max(0, (n - 1).bit_length()))


def _pow2_factor(n: int) -> int:
  """The largest power of two dividing ``n`` (> 0)."""
  return n & -n


def geometry(rows: int, channels: int, bottleneck: int) -> Optional[Geometry]:
  """The :class:`Geometry` for ``rows`` rows of ``channels`` channels and a bottleneck of
  ``bottleneck`` (unpadded), or None where the rows admit no row block (not a multiple of 16).

  The row block is the largest power of two dividing ``rows`` with ``row_block x K`` within
  :data:`TILE_ELEMENTS`. A program's partial sums are ``3 K C`` floats (the three products)
  written and read back once, against ``7 C`` a row for the passes' own traffic (``x`` and
  ``dy`` three times, ``dx``): a program takes ``steps`` row blocks, the fewest that make at
  least :data:`ROWS_PER_PARTIAL` ``K`` rows (the partials then add at most ~20%), but no more
  than leave :data:`MIN_PROGRAMS` programs where the rows allow (the late ResNet-50 stages,
  ``C = 2048, K = 128`` on 12544 rows: 49 programs of 256 rows).
  """
  kp = _pow2_at_least(bottleneck, MIN_CHANNELS)
  row_block = min(_pow2_factor(rows), MAX_ROW_BLOCK, max(MIN_CHANNELS, TILE_ELEMENTS // kp))
  if row_block < MIN_CHANNELS:
    return None
  # (row_block, chunk) tiles within TILE_ELEMENTS, the (K, chunk) products within twice that
  chunk = min(channels, max(MIN_CHANNELS, TILE_ELEMENTS // row_block),
              max(MIN_CHANNELS, 2 * TILE_ELEMENTS // kp))
  blocks = rows // row_block
  divisors = [d for d in range(1, blocks + 1) if blocks % d == 0]
  steps = next((d for d in divisors if d * row_block >= ROWS_PER_PARTIAL * kp), blocks)
  spread = [d for d in divisors if blocks // d >= MIN_PROGRAMS]
  if spread:
    steps = min(steps, spread[-1])
  return Geometry(rows, channels, kp, row_block, chunk, steps, blocks // steps, PRECISION)


def supported(x: jax.Array, params: GateParams, *, inner_relu: bool,
              parallel: Optional[DataParallel] = None) -> Optional[str]:
  """None where the GPU kernels apply to ``x`` (split per ``parallel``), else the reason."""
  c = x.shape[-1]
  k = params.down.kernel.shape[-1]
  if x.ndim < 3:
    return f"input of rank {x.ndim}; the kernels take rank >= 3 (batch, spatial..., channels)"
  io = (jnp.float32, jnp.bfloat16)
  if x.dtype not in io or params.down.kernel.dtype not in io:
    return (f"dtype {x.dtype} (kernel {params.down.kernel.dtype}); the GPU kernels take float32 "
            "or bfloat16")
  if not inner_relu:
    return "inner_relu=False"
  if c < MIN_CHANNELS or c & (c - 1):
    return (f"channels {c}: the GPU kernels take a power of two >= {MIN_CHANNELS} (Triton's "
            "tensor sizes)")
  if _pow2_at_least(k, MIN_CHANNELS) > MAX_BOTTLENECK:
    return f"bottleneck {k}: the GPU kernels take at most {MAX_BOTTLENECK}"
  n = shards(parallel)
  if x.shape[0] % n:
    return f"batch {x.shape[0]} does not split into {n} shards"
  rows = math.prod(x.shape[:-1]) // n
  if geometry(rows, c, k) is None:
    return f"{rows} rows (batch x positions) a device are not a multiple of {MIN_CHANNELS}"
  return None


def backward(x: jax.Array, params: GateParams, stats: GateStats, gram, dy: jax.Array,
             dstats: Optional[GateStats], *, epsilon: float, norm=None,
             norm_dstats: Optional[Moments] = None, interpret: bool = False,
             parallel: Optional[DataParallel] = None, axis_name: Any = None):
  """Same contract as :func:`atac_jax.ops.pallas_backward.backward` (and
  :func:`atac_jax.ops.lean.backward` with ``batch_stats=True``): the three kernels of
  :func:`atac_jax.ops.pallas_rows.backward` on the rows ``(N x positions, C)`` as they lie in
  memory on a GPU (no transpose), cut per :func:`geometry`."""
  c, k = x.shape[-1], params.down.kernel.shape[-1]
  rows = x.size // c // shards(parallel)
  g = geometry(rows, c, k)
  if g is None:
    raise ValueError(f"pallas_gpu.backward: {rows} rows a device are not a multiple of "
                     f"{MIN_CHANNELS}")
  return pallas_rows.backward(
      x, params, stats, gram, dy, dstats, epsilon=epsilon, norm=norm, norm_dstats=norm_dstats,
      interpret=interpret, parallel=parallel, axis_name=axis_name, g=g,
      to_rows=lambda a: a.reshape(-1, c), from_rows=lambda r, shape: r.reshape(shape),
      batch_axis=0)
