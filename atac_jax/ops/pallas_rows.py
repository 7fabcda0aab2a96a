"""The lean gate's training backward pass as three Pallas kernels in row form: the GPU's backward
(Triton) and, on TPU (Mosaic), the backward of units too wide or too low-precision for the
two-pass kernels of :mod:`atac_jax.ops.pallas_backward`.

Same values and contract as :func:`atac_jax.ops.pallas_backward.backward` and
:func:`atac_jax.ops.lean.backward` with batch statistics: ``inner_relu``, rank >= 3, float32 or
bfloat16 input (read and written in its dtype, computed in float32).

Why three passes. Nothing ``C x K x K`` is accumulated (the two-pass kernels' three-way
products ``sum(xc_c a_j mask_k)``, 4M floats at ``C = 1024, K = 64``); instead, with the up
BatchNorm's constants known, the second pass forms ``da`` exactly. Each pass reads ``x`` and
``dy`` once from memory:

1. **sums**: the up BatchNorm's and the input's sums (``InputSums``: ``dz``, ``gate_dy``,
   ``gate_dy xc``, ``xc``), ``a^T dz`` (``K x C``) and ``xc^T hc`` (``C x K``);
2. **da** (with ``c0``, ``c1`` of the up BatchNorm: ``da = mask (du Wu^T)``, ``du = up_scale dz
   + c0 + c1 uc`` chunk by chunk): the down BatchNorm's sums (``da``, ``da hc``, ``hc``) and
   ``xc^T da`` (``C x K``);
3. **dx** (writes ``dx``), from the down BatchNorm's ``e0``, ``e1`` and the fused BatchNorm's
   ``c0``, ``c1``.

The host-side math between the passes is the two-pass kernels' and the XLA backward's
(``pallas_backward._fold``/``_up_gradients``/``_down_from_sums``,
``lean.InputNorm.gradient_terms``), so ``axis_name`` (sums this device's, constants the whole
batch's) and ``parallel`` (per device under ``shard_map``) mean what they mean there.

Row form: ``x`` is ``(R, C)``, ``R`` rows of ``C`` channels, channels minor. A
:class:`Geometry` says how a device's rows are cut, and which of two drivers runs the kernels:

- **GPU** (:mod:`atac_jax.ops.pallas_gpu`, ``tiled=False``): the programs of a grid run in
  parallel, so nothing is accumulated across them: each program owns a slot of every summed
  output, takes ``steps`` row blocks from whole-array operands and sweeps ``C`` in chunks;
  XLA adds the slots up.
- **TPU** (:mod:`atac_jax.ops.pallas_tpu`, ``tiled=True``): the grid steps run one after the
  other on a core, so each takes its row block as a tile (``BlockSpec``: Pallas fetches the
  next while this one computes) and adds to one resident slot; ``C`` in one chunk. The products
  take bfloat16 operands for a bfloat16 input (``mxu_dtype``, as XLA's backward does) and
  float32 ``HIGHEST`` otherwise.
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
                                          _varying_like, run_per_device)
from atac_jax.ops.pallas_tiles import BottleneckConsts, InputConsts, InputGradConsts, InputSums
from atac_jax.ops.types import Affine, GateParams, GateStats, Moments, Projection, cast_like
from atac_jax.ops.types import varying_like

NUM_WARPS = 8  # GPU
NUM_STAGES = 1  # GPU: no software pipelining: 2 stages overflow an A100's shared memory (C >= 1024)

_ELEMENTWISE_FLOPS = 12  # per element of a (rows, C) tile: the gate's element-wise ops


class Geometry(NamedTuple):
  """How a device's rows are cut: programs x steps x row blocks, channels in chunks."""
  rows: int  # R of one device
  channels: int  # C
  bottleneck: int  # K, padded with inert units where the platform needs it (GPU: a power of 2)
  row_block: int  # rows a step takes (dividing rows)
  chunk: int  # channels a chunk sweeps (dividing C)
  steps: int  # row blocks a program takes, one after the other
  programs: int  # the grid
  precision: Any  # of the products
  mxu_dtype: Any = None  # the products' operand dtype (None: the compute dtype)
  tiled: bool = False  # TPU: each grid step gets its row block as a tile; sums accumulate
  vmem_limit: int = 0  # TPU: the scoped on-chip memory limit declared

  @property
  def chunks(self) -> int:
    return self.channels // self.chunk


def _dot(a, b, g: Geometry, out=None):
  """``a @ b`` (in ``out``, default ``a``'s dtype)."""
  return _dot_general(a, b, (((1,), (0,)), ((), ())), g, out)


def _dot_tn(a, b, g: Geometry):
  """``a^T @ b`` (contracting the rows)."""
  return _dot_general(a, b, (((0,), (0,)), ((), ())), g)


def _dot_general(a, b, dims, g: Geometry, out=None):
  out = a.dtype if out is None else out
  if g.mxu_dtype is not None:
    a, b = a.astype(g.mxu_dtype), b.astype(g.mxu_dtype)
  return lax.dot_general(a, b, dims, precision=g.precision, preferred_element_type=out)


def _project(xn, w_down, g: Geometry):
  """``xn @ Wd`` to about float32's accuracy: the bottleneck decides the mask and must match
  the forward pass's statistics (``xn`` rounded to bfloat16 made the down kernel's gradient
  2.5x further from float32's than XLA's bfloat16 backward). With bfloat16 products (``Wd``
  itself bfloat16, exact), ``xn`` is split into its bfloat16 part and the rest: two products."""
  if g.mxu_dtype is None:
    return _dot_general(xn, w_down, (((1,), (0,)), ((), ())), g)
  high = xn.astype(g.mxu_dtype)
  low = xn - high.astype(xn.dtype)
  return _dot(high, w_down, g, out=xn.dtype) + _dot(low, w_down, g)


def _loop(n: int, body, init):
  """``fori_loop(0, n, body, init)``; a single iteration inline (index 0, static)."""
  return body(0, init) if n == 1 else lax.fori_loop(0, n, body, init)


def _start(index, size: int):
  return index * size if isinstance(index, int) else pl.multiple_of(index * size, size)


def _row(ref, i: int, cols=slice(None)):
  """Row ``i`` of a packed constant, ``(1, cols)`` for broadcasting over the rows."""
  return ref[pl.ds(i, 1), cols]


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
  w_down: Any  # (C, Kp) Wd (the fused BatchNorm's norm_scale multiplies the input)
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
    self.dtype = refs.input_consts.dtype  # float32 (float64: tests) whatever x's dtype
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
    bottleneck activation (``mask = a > 0``). Projected as XLA projects it: the normalised
    input ``xc norm_scale`` (centred: a large mean would cancel against the offset) times the
    kernel as it is (``norm_scale`` folded into a low-precision kernel would round it
    differently from the forward pass)."""
    g, r = self.g, self.refs

    def chunk(j, hc):
      cols = self.cols(j)
      xn = self.xc(j) * self.input_consts("norm_scale", cols)
      return hc + _project(xn, r.w_down[cols, :], g)

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
    uc = _dot(a, r.w_up[:, cols], self.g) + const("up_shift")
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
      return acc + _dot(du, r.w_up_t[cols, :], g)

    du_wu = _loop(g.chunks, chunk, jnp.zeros((g.row_block, g.bottleneck), a.dtype))
    return jnp.where(a > 0, du_wu, 0.0)


def _row_blocks(g: Geometry, step, *, barrier: bool):
  """Runs ``step(block, first)`` over this program's row blocks; with ``barrier`` (compiled,
  partial sums kept in the output slots) the block's stores are made visible to all of the
  program's threads before the next block reads them."""
  if g.tiled:  # the grid step's own tile; its sums add to the previous steps' (sequential)
    step(0, pl.program_id(0) == 0)
    return
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
        _accumulate(sums_ref, (pl.ds(i, 1), cols), jnp.sum(v, axis=0, keepdims=True), first)
      _accumulate(a_dz_ref, (slice(None), cols), _dot_tn(a, dz, g), first)
      _accumulate(xc_hc_ref, (cols, slice(None)), _dot_tn(xc, hc, g), first)
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
      _accumulate(sums_ref, (pl.ds(i, 1), slice(None)), jnp.sum(v, axis=0, keepdims=True), first)

    def chunk(j, carry):
      cols = block.cols(j)
      _accumulate(xc_da_ref, (cols, slice(None)), _dot_tn(block.xc(j), da, g), first)
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
      dx = (const("norm_scale") * (_dot(dh, w_down_t_ref[:, cols], g) + gate_dy)
            + const("dx_offset") + const("dx_slope") * xc)
      dx_ref[block.rows, cols] = dx.astype(dx_ref.dtype)
      return carry

    _loop(g.chunks, chunk, 0)

  _row_blocks(g, step, barrier=False)


# ----- the calls -----

def _whole(shape):
  return pl.BlockSpec(shape, lambda p: (0,) * len(shape))


def _tile(g: Geometry):
  """Grid step ``p``'s row block of an ``(R, C)`` operand (TPU)."""
  return pl.BlockSpec((g.row_block, g.channels), lambda p: (p, 0))


def _resident(shape):
  """The one slot of a ``(1, *shape)`` output every grid step adds to (TPU: sequential)."""
  return pl.BlockSpec((pl.squeezed, *shape), lambda p: (0,) * (len(shape) + 1))


def _slot(shape):
  """A program's own slot ``p`` of a ``(programs, *shape)`` output."""
  return pl.BlockSpec((pl.squeezed, *shape), lambda p: (p,) + (0,) * len(shape))


def _pallas(kernel, rows, consts, *, g: Geometry, partials, dtype, interpret: bool, flops: int,
            transcendentals: int):
  """One pallas_call over ``g.programs`` programs: ``rows`` (x, dy; whole on GPU, a row block a
  grid step on TPU) and ``consts`` whole; ``partials``: the shapes of the summed outputs (a
  slot per program on GPU, one resident slot on TPU; ``dtype``, the compute dtype), or None
  for ``dx`` (``x``'s dtype). Weights already in ``g.mxu_dtype`` stay in it."""
  slots = 1 if g.tiled else g.programs
  if partials is None:
    outs = [jax.ShapeDtypeStruct(rows[0].shape, rows[0].dtype)]
    out_specs = [_tile(g) if g.tiled else _whole(rows[0].shape)]
  else:
    outs = [jax.ShapeDtypeStruct((slots, *s), dtype) for s in partials]
    out_specs = [_resident(s) if g.tiled else _slot(s) for s in partials]
  outs = [_varying_like(o, rows[0]) for o in outs]
  keep = lambda c: g.mxu_dtype is not None and c.dtype == g.mxu_dtype  # weights for the MXU
  consts = varying_like(rows[0], tuple(c if keep(c) else jnp.asarray(c, dtype) for c in consts))
  nbytes = sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize
               for a in (*rows, *consts, *outs))
  row_specs = [_tile(g) if g.tiled else _whole(a.shape) for a in rows]
  if g.tiled:
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    options = {"barrier": False} if partials is not None else {}
    params = None if interpret else pltpu.CompilerParams(
        dimension_semantics=("parallel" if partials is None else "arbitrary",),
        vmem_limit_bytes=g.vmem_limit)
  else:
    from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
    options = {} if partials is None else {"barrier": not interpret}
    params = plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES)
  return pl.pallas_call(
      functools.partial(kernel, g=g, **options), out_shape=outs, grid=(g.programs,),
      in_specs=row_specs + [_whole(a.shape) for a in consts], out_specs=out_specs,
      compiler_params=params,
      cost_estimate=pl.CostEstimate(flops=int(flops), transcendentals=int(transcendentals),
                                    bytes_accessed=int(nbytes)),
      interpret=interpret)(*rows, *consts)


def _call(kernel, rows, consts, *, g: Geometry, partials, parallel: Optional[DataParallel],
          batch_axis: int, **options):
  """:func:`_pallas`, per device with ``parallel`` (the batch on axis ``batch_axis`` of
  ``rows``; each device's rows are flattened to ``(R, C)``). The partials are summed over the
  programs (and ``psum``-ed over the devices)."""
  pallas = functools.partial(_pallas, kernel, g=g, partials=partials, **options)

  def run(rows, consts):
    results = pallas(tuple(r.reshape(-1, r.shape[-1]) for r in rows), consts)
    if partials is None:
      return tuple(r.reshape(rows[0].shape) for r in results)
    return tuple(jnp.sum(r, axis=0) for r in results)

  return run_per_device(run, rows, consts, parallel=parallel, batch_axis=batch_axis,
                        summed=partials is not None)


def _pad(a: jax.Array, shape) -> jax.Array:
  """``a`` padded with zeros at the end of each axis to ``shape``."""
  return jnp.pad(a, [(0, s - d) for s, d in zip(shape, a.shape)])


def backward(x: jax.Array, params: GateParams, stats: GateStats, gram, dy: jax.Array,
             dstats: Optional[GateStats], *, epsilon: float, norm=None,
             norm_dstats: Optional[Moments] = None, interpret: bool = False,
             parallel: Optional[DataParallel] = None, axis_name: Any = None, g: Geometry,
             to_rows, from_rows, batch_axis: int):
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
    g: how a device's rows are cut (and which driver runs the kernels).
    to_rows: ``(N, spatial..., C)`` -> the rows as the platform lays them out, channels last,
      the batch on axis ``batch_axis`` (split there per device); ``from_rows(rows, shape)``
      inverts it.

  Returns:
    ``(dx, dparams, daffine)`` with ``norm``, else ``(dx, dparams, None)``.
  """
  dtype = jnp.float64 if x.dtype == jnp.float64 else jnp.float32  # float64: interpreter tests
  ddown, dup = (None, None) if dstats is None else dstats
  c = x.shape[-1]
  k = params.down.kernel.shape[-1]
  count = x.size // c
  kp, rows_dev = g.bottleneck, g.rows
  kd32, ku32 = params.down.kernel.astype(dtype), params.up.kernel.astype(dtype)
  f = _fold(params, stats, norm, epsilon, jnp.zeros((c,), dtype))

  # Operands of every pass (K padded to Kp with zeros: the padded units are inert).
  mxu = (lambda w: w) if g.mxu_dtype is None else (lambda w: w.astype(g.mxu_dtype))
  gate_consts = (
      mxu(_pad(kd32, (c, kp))),  # w_down
      mxu(_pad(ku32, (kp, c))),  # w_up
      mxu(_pad(ku32.T, (c, kp))),  # w_up_t
      jnp.stack(InputConsts(f.up_shift, f.up_scale, params.norm_up.bias.astype(dtype),
                            f.norm_scale, f.norm_shift, f.norm_mean)),  # (6, C)
      _pad(jnp.stack(BottleneckConsts(f.h_bias - stats.down.mean + f.norm_mean @ f.w_down,
                                      f.down_scale,
                                      params.norm_down.bias.astype(dtype))), (3, kp)))
  io = x.dtype if x.dtype == jnp.bfloat16 else dtype  # x and dy read (dx written) as given
  rows = (to_rows(x.astype(io)), to_rows(dy.astype(io)))
  call = functools.partial(_call, rows=rows, g=g, parallel=parallel, batch_axis=batch_axis,
                           dtype=dtype, interpret=interpret)
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
      up_grad, _pad(jnp.stack(_DownGradConsts(e0, e1)), (2, kp)), mxu(_pad(kd32, (c, kp)).T),
      jnp.stack(InputGradConsts(f.norm_scale, dx_offset, dx_slope)))
  (dx_rows,) = call(_dx_kernel, consts=dx_consts, partials=None,
                    flops=da_flops + (1 if g.chunks == 1 else 2) * mm + elementwise,
                    transcendentals=(1 if g.chunks == 1 else 2) * sig)  # z again (chunks)
  dx = from_rows(dx_rows, x.shape).astype(x.dtype)
  dparams = cast_like(GateParams(Projection(dkd, dbd), Affine(down.dscale, down.dbias),
                                 Projection(up.dkernel, up.dproj_bias),
                                 Affine(up.dscale, up.dbias)), params)
  return dx, dparams, daffine
