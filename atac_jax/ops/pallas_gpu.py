"""The lean gate's training backward pass as three Pallas kernels for NVIDIA GPUs (Triton).

Same values and contract as :func:`atac_jax.ops.pallas_backward.backward` (the TPU kernels) and
:func:`atac_jax.ops.lean.backward` with batch statistics: ``inner_relu``, rank >= 3, float32 or
bfloat16 input (read and written in its dtype, computed in float32). Checked in Pallas'
interpreter on the CPU against both and against plain autodiff of the reference op
(``tests/test_pallas_gpu.py``); the same tests lower the kernels to Triton IR, and they compile
deviceless for sm_80 and sm_90 with the CUDA plugin.

Why three passes, not the TPU's two. The programs of a GPU grid run in parallel, so nothing is
accumulated across them: each program owns a slot of every summed output and writes its
partial sums there; XLA adds the slots up (``3 K C`` floats a program). The TPU's sums pass
also accumulates the
three-way products ``sum(xc_c a_j mask_k)`` (``C x K x K``) so that the down BatchNorm's sums
need no second look at the input; per program that is far too big for ResNet-50's widths
(``C = 1024, K = 64``: 4M floats). Instead, with the up BatchNorm's constants known, the second
pass forms ``da`` exactly. Each pass reads ``x`` and ``dy`` once from memory (a row block's
sweeps over its channels read it again, from cache):

1. **sums**: the up BatchNorm's and the input's sums (``InputSums``: ``dz``, ``gate_dy``,
   ``gate_dy xc``, ``xc``), ``a^T dz`` (``K x C``) and ``xc^T hc`` (``C x K``);
2. **da** (with ``c0``, ``c1`` of the up BatchNorm: ``da = mask (du Wu^T)``, ``du = up_scale dz
   + c0 + c1 uc`` chunk by chunk): the down BatchNorm's sums (``da``, ``da hc``, ``hc``) and
   ``xc^T da`` (``C x K``);
3. **dx** (writes ``dx``), from the down BatchNorm's ``e0``, ``e1`` and the fused BatchNorm's
   ``c0``, ``c1``.

The host-side math between the passes is the TPU backward's and the XLA backward's
(``pallas_backward._fold``/``_up_gradients``/``_down_from_sums``,
``lean.InputNorm.gradient_terms``), so ``axis_name`` (sums this device's, constants the whole
batch's) and ``parallel`` (per device under ``shard_map``) mean what they mean there.

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

import functools
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from atac_jax.ops.pallas_backward import (DataParallel, _down_from_sums, _fold, _up_gradients,
                                          _varying_like, run_per_device, shards)
from atac_jax.ops.pallas_tiles import BottleneckConsts, InputConsts, InputGradConsts, InputSums
from atac_jax.ops.types import Affine, GateParams, GateStats, Moments, Projection, cast_like
from atac_jax.ops.types import varying_like

PRECISION = lax.Precision.DEFAULT  # TF32 products on Ampere+ (as XLA's); exact on the CPU
MIN_CHANNELS = 16  # Triton's matrix products take operands >= 16 in each dimension
MAX_BOTTLENECK = 512  # padded K: a (16, K) tile within TILE_ELEMENTS (compiled: K = 512 fits)
TILE_ELEMENTS = 8192  # the most elements of a tile a program holds (row_block x chunk or K)
MAX_ROW_BLOCK = 256
ROWS_PER_PARTIAL = 4  # a program takes >= 4 K rows: its partial sums <= ~1/5 of the traffic
MIN_PROGRAMS = 32  # but no more rows than leave this many programs, where the rows allow
NUM_WARPS = 8
NUM_STAGES = 1  # no software pipelining: 2 stages overflow an A100's shared memory (C >= 1024)

_ELEMENTWISE_FLOPS = 12  # per element of a (rows, C) tile: the gate's element-wise ops


def _pow2_at_least(n: int, floor: int) -> int:
  return max(floor, 1 << max(0, (n - 1).bit_length()))


def _pow2_factor(n: int) -> int:
  """The largest power of two dividing ``n`` (> 0)."""
  return n & -n


class Geometry(NamedTuple):
  """How a device's rows are cut: programs x steps x row blocks, channels in chunks."""
  rows: int  # R of one device
  channels: int  # C
  bottleneck: int  # K padded: a power of two >= 16
  row_block: int  # rows a step takes (a power of two >= 16 dividing rows)
  chunk: int  # channels a chunk sweeps (a power of two >= 16 dividing C)
  steps: int  # row blocks a program takes, one after the other
  programs: int  # the grid

  @property
  def chunks(self) -> int:
    return self.channels // self.chunk


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
  return Geometry(rows, channels, kp, row_block, chunk, steps, blocks // steps)


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


# ----- the kernels (row form: a block of rows, channels on columns) -----

def _dot(a, b):
  """``a @ b``."""
  return jnp.dot(a, b, precision=PRECISION, preferred_element_type=a.dtype)


def _dot_tn(a, b):
  """``a^T @ b`` (contracting the rows)."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=PRECISION,
                         preferred_element_type=a.dtype)


def _loop(n: int, body, init):
  """``fori_loop(0, n, body, init)``; a single iteration inline (index 0, static)."""
  return body(0, init) if n == 1 else lax.fori_loop(0, n, body, init)


def _start(index, size: int):
  return index * size if isinstance(index, int) else pl.multiple_of(index * size, size)


def _row(ref, i: int, cols=slice(None)):
  """Row ``i`` of a packed constant, ``(1, cols)`` for broadcasting over the rows."""
  return ref[i, cols][None, :]


def _accumulate(ref, index, value, first):
  """``ref[index] (+)= value``: stored where ``first`` (a program's first row block), else
  added (the slot's previous contents are ignored on the first block)."""
  if first is True:
    ref[index] = value
  else:
    ref[index] = jnp.where(first, value, ref[index] + value)


class _Refs(NamedTuple):
  """The operands every kernel reads: the rows and the constants of the recomputed gate."""
  x: Any  # (R, C)
  dy: Any  # (R, C)
  w_down: Any  # (C, Kp) Wd' = diag(norm_scale) Wd
  w_up: Any  # (Kp, C) Wu
  w_up_t: Any  # (C, Kp) Wu^T: da = du Wu^T
  input_consts: Any  # (6, C) InputConsts, a row each
  bottleneck_consts: Any  # (3, Kp) BottleneckConsts


class _UpGradConsts(NamedTuple):
  """The up BatchNorm's input gradient ``du = up_scale dz + c0 + c1 uc``, packed ``(2, C)``."""
  c0: jax.Array
  c1: jax.Array


class _DownGradConsts(NamedTuple):
  """The down BatchNorm's ``dh = down_scale da + e0 + e1 hc``, packed ``(2, Kp)``."""
  e0: jax.Array
  e1: jax.Array


class _Block:
  """One row block of one program: the gate recomputed chunk by chunk."""

  def __init__(self, g: Geometry, refs: _Refs, row0):
    self.g, self.refs = g, refs
    self.dtype = refs.w_down.dtype  # computed in float32 (float64: tests) whatever x's dtype
    self.rows = pl.ds(row0, g.row_block)
    self._gate = None  # with one chunk, the gate once for every sweep

  def input_consts(self, name: str, cols):
    return _row(self.refs.input_consts, InputConsts._fields.index(name), cols)

  def load(self, ref, cols):
    """A chunk of ``x`` or ``dy`` in the compute dtype."""
    return ref[self.rows, cols].astype(self.dtype)

  def cols(self, j):
    return pl.ds(_start(j, self.g.chunk), self.g.chunk)

  def bottleneck(self):
    """``(hc, a)``, ``(rows, Kp)``: the down-projection centred on its batch mean, and the
    bottleneck activation (``mask = a > 0``)."""
    g, r = self.g, self.refs

    def chunk(j, hc):
      cols = self.cols(j)
      return hc + _dot(self.load(r.x, cols), r.w_down[cols, :])

    hc = _loop(g.chunks, chunk, jnp.zeros((g.row_block, g.bottleneck), self.dtype))
    field = BottleneckConsts._fields.index
    hc = hc + _row(r.bottleneck_consts, field("h_offset"))
    pre = (_row(r.bottleneck_consts, field("down_scale")) * hc
           + _row(r.bottleneck_consts, field("down_bias")))
    return hc, jnp.maximum(pre, 0.0)

  def gate(self, j, a):
    """``(xc, gate_dy, dz, uc)`` of chunk ``j``, ``(rows, chunk)`` each (``uc = u - mean_u``);
    with one chunk computed once a block: the sweeps of a pass share it."""
    if self._gate is not None:
      return self._gate
    r, cols = self.refs, self.cols(j)
    const = functools.partial(self.input_consts, cols=cols)
    x, dy = self.load(r.x, cols), self.load(r.dy, cols)
    uc = _dot(a, r.w_up[:, cols]) + const("up_shift")
    z = const("up_scale") * uc + const("up_bias")
    sig = 1.0 / (1.0 + jnp.exp(-z))
    gate_dy = dy * sig
    dz = gate_dy * (x * const("norm_scale") + const("norm_shift")) * (1.0 - sig)
    gate = (x - const("norm_mean"), gate_dy, dz, uc)
    if self.g.chunks == 1:
      self._gate = gate
    return gate

  def xc(self, j):
    """The input of chunk ``j`` centred on the fused BatchNorm's mean."""
    if self._gate is not None:
      return self._gate[0]
    cols = self.cols(j)
    return self.load(self.refs.x, cols) - self.input_consts("norm_mean", cols)

  def da(self, a, up_grad_ref):
    """``da = mask (du Wu^T)``, ``(rows, Kp)``, the up BatchNorm's input gradient
    ``du = up_scale dz + c0 + c1 uc`` formed chunk by chunk (never a ``(K, K)`` operand: the
    TPU kernels' ``a M`` form would not fit a GPU's shared memory at ``K = 256``)."""
    g, r = self.g, self.refs

    def chunk(j, acc):
      cols = self.cols(j)
      _, _, dz, uc = self.gate(j, a)
      up = lambda name: _row(up_grad_ref, _UpGradConsts._fields.index(name), cols)
      du = self.input_consts("up_scale", cols) * dz + up("c0") + up("c1") * uc
      return acc + _dot(du, r.w_up_t[cols, :])

    du_wu = _loop(g.chunks, chunk, jnp.zeros((g.row_block, g.bottleneck), a.dtype))
    return jnp.where(a > 0, du_wu, 0.0)


def _row_blocks(g: Geometry, step, *, barrier: bool):
  """Runs ``step(block, first)`` over this program's row blocks; with ``barrier`` (compiled,
  partial sums kept in the output slots) the block's stores are made visible to all of the
  program's threads before the next block reads them."""
  program = pl.program_id(0)

  def body(s, carry):
    row0 = pl.multiple_of((program * g.steps + s) * g.row_block, g.row_block)
    step(row0, True if g.steps == 1 else s == 0)
    if barrier and g.steps > 1:
      from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
      plgpu.debug_barrier()
    return carry

  _loop(g.steps, body, 0)


def _sums_kernel(*refs, g: Geometry, barrier: bool):
  """Pass 1: per program, :class:`InputSums` ``(4, C)``, ``a^T dz`` ``(Kp, C)`` and
  ``xc^T hc`` ``(C, Kp)``."""
  operands, (sums_ref, a_dz_ref, xc_hc_ref) = _Refs(*refs[:7]), refs[7:]

  def step(row0, first):
    block = _Block(g, operands, row0)
    hc, a = block.bottleneck()

    def chunk(j, carry):
      cols = block.cols(j)
      xc, gate_dy, dz, _ = block.gate(j, a)
      for i, v in enumerate(InputSums(dz, gate_dy, gate_dy * xc, xc)):
        _accumulate(sums_ref, (i, cols), jnp.sum(v, axis=0), first)
      _accumulate(a_dz_ref, (slice(None), cols), _dot_tn(a, dz), first)
      _accumulate(xc_hc_ref, (cols, slice(None)), _dot_tn(xc, hc), first)
      return carry

    _loop(g.chunks, chunk, 0)

  _row_blocks(g, step, barrier=barrier)


class _DaSums(NamedTuple):
  """Pass 2's sums over the bottleneck, a row each of its ``(3, Kp)`` output."""
  da: jax.Array
  da_hc: jax.Array
  hc: jax.Array


def _da_kernel(*refs, g: Geometry, barrier: bool):
  """Pass 2: per program, :class:`_DaSums` ``(3, Kp)`` and ``xc^T da`` ``(C, Kp)``."""
  operands = _Refs(*refs[:7])
  up_grad_ref, sums_ref, xc_da_ref = refs[7:]

  def step(row0, first):
    block = _Block(g, operands, row0)
    hc, a = block.bottleneck()
    da = block.da(a, up_grad_ref)
    for i, v in enumerate(_DaSums(da, da * hc, hc)):
      _accumulate(sums_ref, (i, slice(None)), jnp.sum(v, axis=0), first)

    def chunk(j, carry):
      cols = block.cols(j)
      _accumulate(xc_da_ref, (cols, slice(None)), _dot_tn(block.xc(j), da), first)
      return carry

    _loop(g.chunks, chunk, 0)

  _row_blocks(g, step, barrier=barrier)


def _dx_kernel(*refs, g: Geometry):
  """Pass 3: ``dx = dh Wd'^T + norm_scale gate_dy + dx_offset + dx_slope xc`` with
  ``dh = down_scale da + dh_offset + dh_slope hc``."""
  operands = _Refs(*refs[:7])
  up_grad_ref, down_grad_ref, w_down_t_ref, input_grad_ref, dx_ref = refs[7:]

  def step(row0, first):
    del first
    block = _Block(g, operands, row0)
    hc, a = block.bottleneck()
    down = lambda name: _row(down_grad_ref, _DownGradConsts._fields.index(name))
    down_scale = _row(operands.bottleneck_consts, BottleneckConsts._fields.index("down_scale"))
    dh = down_scale * block.da(a, up_grad_ref) + down("e0") + down("e1") * hc

    def chunk(j, carry):
      cols = block.cols(j)
      const = lambda name: _row(input_grad_ref, InputGradConsts._fields.index(name), cols)
      xc, gate_dy, _, _ = block.gate(j, a)
      dx = (_dot(dh, w_down_t_ref[:, cols]) + const("norm_scale") * gate_dy
            + const("dx_offset") + const("dx_slope") * xc)
      dx_ref[block.rows, cols] = dx.astype(dx_ref.dtype)
      return carry

    _loop(g.chunks, chunk, 0)

  _row_blocks(g, step, barrier=False)


# ----- the calls -----

def _whole(shape):
  return pl.BlockSpec(shape, lambda p: (0,) * len(shape))


def _slot(shape):
  """A program's own slot ``p`` of a ``(programs, *shape)`` output."""
  return pl.BlockSpec((pl.squeezed, *shape), lambda p: (p,) + (0,) * len(shape))


def _pallas(kernel, rows, consts, *, g: Geometry, partials, dtype, interpret: bool, flops: int,
            transcendentals: int):
  """One pallas_call over ``g.programs`` programs: ``rows`` (x, dy) and ``consts`` whole;
  ``partials``: the shapes of the per-program outputs (one slot each, ``dtype``, the compute
  dtype), or None for ``dx`` (``x``'s dtype)."""
  if partials is None:
    outs = [jax.ShapeDtypeStruct(rows[0].shape, rows[0].dtype)]
    out_specs = [_whole(rows[0].shape)]
  else:
    outs = [jax.ShapeDtypeStruct((g.programs, *s), dtype) for s in partials]
    out_specs = [_slot(s) for s in partials]
  outs = [_varying_like(o, rows[0]) for o in outs]
  consts = varying_like(rows[0], tuple(jnp.asarray(c, dtype) for c in consts))
  nbytes = sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize
               for a in (*rows, *consts, *outs))
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  options = {} if partials is None else {"barrier": not interpret}
  return pl.pallas_call(
      functools.partial(kernel, g=g, **options), out_shape=outs, grid=(g.programs,),
      in_specs=[_whole(a.shape) for a in (*rows, *consts)], out_specs=out_specs,
      compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
      cost_estimate=pl.CostEstimate(flops=int(flops), transcendentals=int(transcendentals),
                                    bytes_accessed=int(nbytes)),
      interpret=interpret)(*rows, *consts)


def _call(kernel, rows, consts, *, g: Geometry, partials, parallel: Optional[DataParallel],
          **options):
  """:func:`_pallas`, per device with ``parallel`` (rows split on axis 0). The partials are
  summed over the programs (and ``psum``-ed over the devices)."""
  pallas = functools.partial(_pallas, kernel, g=g, partials=partials, **options)

  def run(rows, consts):
    results = pallas(rows, consts)
    return results if partials is None else tuple(jnp.sum(r, axis=0) for r in results)

  return run_per_device(run, rows, consts, parallel=parallel, batch_axis=0,
                        summed=partials is not None)


def _pad(a: jax.Array, shape) -> jax.Array:
  """``a`` padded with zeros at the end of each axis to ``shape``."""
  return jnp.pad(a, [(0, s - d) for s, d in zip(shape, a.shape)])


def backward(x: jax.Array, params: GateParams, stats: GateStats, gram, dy: jax.Array,
             dstats: Optional[GateStats], *, epsilon: float, norm=None,
             norm_dstats: Optional[Moments] = None, interpret: bool = False,
             parallel: Optional[DataParallel] = None, axis_name: Any = None):
  """Same contract as :func:`atac_jax.ops.pallas_backward.backward` (and
  :func:`atac_jax.ops.lean.backward` with ``batch_stats=True``).

  Args:
    x: the input ``(N, spatial..., C)`` (with ``norm``: the fused BatchNorm's input).
    params, stats, gram, dy, dstats, norm, norm_dstats: as ``lean.backward``.
    epsilon: the gate BatchNorms' epsilon.
    interpret: run the kernels in Pallas' interpreter (CPU tests).
    parallel: the batch's mesh axes: the kernels then run per device on its shard.
    axis_name: inside ``shard_map``/``pmap``, the axis over which batch statistics are global:
      the kernels take this device's sums, the BatchNorms' constants the whole batch's; the
      parameter gradients are this device's part.

  Returns:
    ``(dx, dparams, daffine)`` with ``norm``, else ``(dx, dparams, None)``.
  """
  dtype = jnp.float64 if x.dtype == jnp.float64 else jnp.float32  # float64: interpreter tests
  ddown, dup = (None, None) if dstats is None else dstats
  c = x.shape[-1]
  k = params.down.kernel.shape[-1]
  count = x.size // c
  g = geometry(count // shards(parallel), c, k)
  if g is None:
    raise ValueError(f"pallas_gpu.backward: {count // shards(parallel)} rows a device are not "
                     f"a multiple of {MIN_CHANNELS}")
  kp, rows_dev = g.bottleneck, g.rows
  kd32, ku32 = params.down.kernel.astype(dtype), params.up.kernel.astype(dtype)
  f = _fold(params, stats, norm, epsilon, jnp.zeros((c,), dtype))

  # Operands of every pass (K padded to Kp with zeros: the padded units are inert).
  gate_consts = (
      _pad(f.w_down, (c, kp)),  # w_down
      _pad(ku32, (kp, c)),  # w_up
      _pad(ku32.T, (c, kp)),  # w_up_t
      jnp.stack(InputConsts(f.up_shift, f.up_scale, params.norm_up.bias.astype(dtype),
                            f.norm_scale, f.norm_shift, f.norm_mean)),  # (6, C)
      _pad(jnp.stack(BottleneckConsts(f.h_bias - stats.down.mean, f.down_scale,
                                      params.norm_down.bias.astype(dtype))), (3, kp)))
  io = x.dtype if x.dtype == jnp.bfloat16 else dtype  # x and dy read (dx written) as given
  rows = (x.reshape(-1, c).astype(io), dy.reshape(-1, c).astype(io))
  call = functools.partial(_call, rows=rows, g=g, parallel=parallel, dtype=dtype,
                           interpret=interpret)
  mm = 2 * rows_dev * c * kp  # the FLOPs of one (rows, C) x (C, Kp) product over the rows
  elementwise = _ELEMENTWISE_FLOPS * rows_dev * c
  sig = rows_dev * c  # one exp per element a gate evaluation

  # Pass 1: the up BatchNorm's sums.
  sums, a_dz, xc_hc = call(_sums_kernel, consts=gate_consts,
                           partials=((len(InputSums._fields), c), (kp, c), (c, kp)),
                           flops=4 * mm + elementwise, transcendentals=sig)
  input_sums = InputSums(*sums)
  up = _up_gradients(f, ku32, gram, input_sums, a_dz[:k], count, dup,
                     bias=params.up.bias is not None, axis_name=axis_name)

  # Pass 2: da, the down BatchNorm's sums.
  up_grad = jnp.stack(_UpGradConsts(up.c0, up.c1))  # (2, C)
  da_flops = 3 * mm + elementwise  # hc, u and du Wu^T
  da_sums, xc_da = call(_da_kernel, consts=gate_consts + (up_grad,),
                        partials=((len(_DaSums._fields), kp), (c, kp)),
                        flops=da_flops + mm, transcendentals=sig)
  da_sums = _DaSums(*(s[:k] for s in da_sums))
  down = _down_from_sums(f, da_sums.da, da_sums.da_hc, da_sums.hc, xc_da[:, :k], xc_hc[:, :k],
                         input_sums.xc, count, ddown, axis_name)
  sum_dh, xc_dh, e0, e1 = down.sum_dh, down.xc_dh, down.dh_offset, down.dh_slope
  dbd = None if params.down.bias is None else sum_dh
  daffine = None
  if norm is not None:  # lean.InputNorm's terms with xc = x - norm_mean
    _, dx_offset, dx_slope, dkd, daffine = norm.gradient_terms(
        kd32, xc_dh, sum_dh, input_sums.gate_dy, input_sums.gate_dy_xc, count, norm_dstats)
  else:  # norm_mean = 0: xc_dh = x^T dh
    dx_offset = dx_slope = jnp.zeros((c,), dtype)
    dkd = xc_dh

  # Pass 3: dx.
  dx_consts = gate_consts + (
      up_grad, _pad(jnp.stack(_DownGradConsts(e0, e1)), (2, kp)), _pad(f.w_down, (c, kp)).T,
      jnp.stack(InputGradConsts(f.norm_scale, dx_offset, dx_slope)))
  (dx_rows,) = call(_dx_kernel, consts=dx_consts, partials=None,
                    flops=da_flops + (1 if g.chunks == 1 else 2) * mm + elementwise,
                    transcendentals=(1 if g.chunks == 1 else 2) * sig)  # z again (chunks)
  dx = dx_rows.reshape(x.shape).astype(x.dtype)
  dparams = cast_like(GateParams(Projection(dkd, dbd), Affine(down.dscale, down.dbias),
                                 Projection(up.dkernel, up.dproj_bias),
                                 Affine(up.dscale, up.dbias)), params)
  return dx, dparams, daffine
