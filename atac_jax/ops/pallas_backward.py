"""The lean gate's training backward pass as two Pallas kernels (two passes over the input).

XLA writes every operand of the gate's backward products (the bottleneck, ``dz``, ``dh``) and
runs each 1x1 convolution as a pass of its own: about 17 activation-sized passes per unit on
XLA:TPU. These kernels recompute the whole gate per tile in on-chip memory and need two:

1. **sums** (reads ``x`` and ``dy``): every batch sum the backward's three BatchNorms need, and
   the products the weight gradients come from. The down BatchNorm's sums depend on constants
   known only after the up BatchNorm's sums (``c0``, ``c1``); they are linear in them, so the
   pass accumulates each coefficient: with ``da = t + a M + r`` (``t = dz (a2 Wu)^T``,
   ``M = Wu diag(c1) Wu^T``) and ``mask = a > 0``, ``sum(mask da) = sum(mask t) +
   colsum(M * a^T mask) + r sum(mask)``; the input's products likewise take the three-way
   ``sum(xc_c a_j mask_k)`` (``C x K x K``, a matrix product on the MXU).
2. **dx** (reads ``x`` and ``dy``, writes ``dx``): the input gradient from those constants.

Layout: each kernel takes its operands in the layout XLA:TPU gives the activation of each
device, so the transposes around it are bitcasts (:class:`Tiling`): batch-minor ``(P C, N)``
(the batch on the lanes: ResNet-20's 16-channel stage, ``f32[32,32,32,16]{0,3,2,1}`` at 32 images
a chip), tiles of ``S`` positions of ``C`` channels whose channel products are block-diagonal
``kron(I_S, W)`` MXU tiles; or channels-minor ``(P, N, C)``, tiles transposed in the kernel. A
probe of four 3x3 convolutions with an element-wise Pallas op between them on v5e compiled
without copies in the matching layout and with a relayout copy on each side in the other. The
ResNet-20 step on one v5e chip (32 images, float32) accesses 3.06 GB with the XLA backward,
2.74 GB with these kernels batch-minor everywhere, 2.19 GB in each activation's own layout, and
2.10 GB with the cross products per tile position instead of block-diagonal.

Same values as :func:`atac_jax.ops.lean.backward` with batch statistics (training), float32,
``inner_relu``, rank >= 3; checked against it and plain autodiff in Pallas' interpreter on the
CPU (``tests/test_pallas_backward.py``). Under a data-parallel step the caller declares the
batch's mesh axes (:func:`data_parallel`) and the kernels run per device under ``shard_map``,
their sums ``psum``-ed.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from typing import Any, Iterator, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec

from atac_jax.ops import batch_norm
from atac_jax.ops.types import Affine, GateParams, GateStats, Moments, Projection, cast_like

_HI = lax.Precision.HIGHEST


class Tiling(NamedTuple):
  """How the input is laid out as rows for the kernels, and how it is cut into tiles.

  ``batch_minor``: rows ``(P C, N)`` (channels on sublanes, the batch on lanes), a tile ``S``
  positions of ``C`` channels; the kernels' column form is the tile itself and the channel
  products are ``kron(I_S, W)``. Else channels-minor: rows ``(P, N, C)``, a tile ``T`` positions
  of ``N`` images, transposed in the kernel to the column form ``(C, T N)`` (``S = 1``). Either
  way the batch is axis 1 of the rows array, and a batch-sharded input stays sharded.
  """
  batch_minor: bool
  s: int  # positions a tile in the column form's rows
  block: tuple[int, ...]  # a tile of the rows array (a device's batch)
  steps: int
  col_lanes: int  # lanes of the column form (a device's batch)
  batch: int  # a device's batch

  def to_rows(self, a: jax.Array) -> jax.Array:
    """``(N, spatial..., C)`` -> the rows array (a bitcast in XLA:TPU's layout for it)."""
    last = a.ndim - 1
    if self.batch_minor:
      return jnp.transpose(a, tuple(range(1, last)) + (last, 0)).reshape(-1, a.shape[0])
    return jnp.transpose(a, tuple(range(1, last)) + (0, last)).reshape(-1, *a.shape[::last])

  def from_rows(self, rows: jax.Array, shape) -> jax.Array:
    n, c, spatial = shape[0], shape[-1], tuple(shape[1:-1])
    last = len(shape) - 1
    if self.batch_minor:
      return jnp.transpose(rows.reshape(spatial + (c, n)), (last,) + tuple(range(last)))
    return jnp.transpose(rows.reshape(spatial + (n, c)),
                         (last - 1,) + tuple(range(last - 1)) + (last,))

  def index_map(self):
    return (lambda i: (i, 0)) if self.batch_minor else (lambda i: (i, 0, 0))


def batch_minor_layout(n: int, c: int) -> bool:
  """Whether XLA:TPU lays an ``(N, ..., C)`` activation out with the batch on the lanes.

  Read off the v5e compiles of ResNet-20 (32 images a chip): ``f32[32,32,32,16]{0,3,2,1}``
  (batch minor) but ``f32[32,16,16,32]{3,0,2,1}`` and ``f32[32,8,8,64]{3,0,2,1}`` (channels
  minor): the wider of the two goes on the lanes, ties to the channels. The kernels take the
  same layout so the transposes to their rows are bitcasts (a mismatch costs a copy each way).
  """
  return c < min(n, 128)


def tiling(shape, shards: int = 1) -> Tiling:
  """The :class:`Tiling` of an input of ``shape`` ``(N, spatial..., C)``, its batch split in
  ``shards`` (the layout XLA gives each device's shard is what the kernels must match)."""
  n, c = shape[0] // shards, shape[-1]
  positions = math.prod(shape[1:-1])
  if batch_minor_layout(n, c):
    s = 128 // c if c <= 128 and 128 % c == 0 else 1
    return Tiling(True, s, (s * c, n), positions // s if positions % s == 0 else 0, n, n)
  per_tile = max(1, 512 // n)
  while positions % per_tile:
    per_tile -= 1
  return Tiling(False, 1, (per_tile, n, c), positions // per_tile, per_tile * n, n)


def shards(parallel: Optional["DataParallel"]) -> int:
  """How many shards ``parallel`` splits the batch into (1 for None)."""
  return 1 if parallel is None else math.prod(parallel.mesh.shape[a] for a in parallel.axes)


def supported(x: jax.Array, params: GateParams, *, inner_relu: bool,
              parallel: Optional["DataParallel"] = None) -> Optional[str]:
  """None where the kernels apply to ``x`` (split per ``parallel``), else the reason."""
  c = x.shape[-1]
  k = params.down.kernel.shape[-1]
  if x.ndim < 3:
    return f"input of rank {x.ndim}; the kernels take rank >= 3 (batch, spatial..., channels)"
  if x.dtype != jnp.float32 or params.down.kernel.dtype != jnp.float32:
    return f"dtype {x.dtype}; the kernels are float32 only"
  if not inner_relu:
    return "inner_relu=False"
  if c % 8 or k % 8:
    return f"channels {c} and bottleneck {k} must be multiples of 8"
  if x.shape[0] % shards(parallel):
    return f"batch {x.shape[0]} does not split into {shards(parallel)} shards"
  t = tiling(x.shape, shards(parallel))
  if not t.steps:
    return f"{math.prod(x.shape[1:-1])} positions are not a multiple of {t.s} per tile"
  if not t.batch_minor and t.batch % 8:
    return f"batch {t.batch} a device is not a multiple of 8 (channels-minor tiles)"
  need = vmem_bytes(t, c, k)
  if need > VMEM_BUDGET:
    return (f"a tile needs ~{need / 2**20:.1f} MiB of on-chip memory (C={c}, K={k}, "
            f"{t.col_lanes} lanes); the budget is {VMEM_BUDGET / 2**20:.0f} MiB")
  return None


VMEM_BUDGET = 12 * 2**20  # under the 16 MiB Mosaic scopes by default on v5e


def vmem_bytes(t: Tiling, c: int, k: int) -> int:
  """A generous estimate of the on-chip memory the sums kernel (the larger) needs per tile.

  Double-buffered input tiles, about a dozen working arrays of the tile's size, the per-position
  ``(K^2, lanes)`` three-way products, the accumulators and the constants (all float32, lanes
  padded to 128).
  """
  lanes = -(-t.col_lanes // 128) * 128
  rows_c, rows_k = t.s * c, t.s * k
  tile = 4 * lanes * (2 * 2 * rows_c + 12 * max(rows_c, rows_k) + 3 * k * k)
  accumulators = _padded_bytes((c, (3 + k) * k)) + _padded_bytes((k, c + 2 * k))
  constants = 3 * _padded_bytes((rows_k, rows_c)) + 2 * _padded_bytes((k * k, k))
  return tile + accumulators + constants


VMEM_LIMIT_FLOOR = 8 * 2**20


def vmem_limit(t: Tiling, c: int, k: int) -> int:
  """The scoped on-chip memory limit the kernels declare to Mosaic: twice :func:`vmem_bytes`
  rounded up to a MiB, at least 8 MiB (at most 24 MiB under ``VMEM_BUDGET``).

  Mosaic otherwise reserves its default limit around each kernel, and XLA:TPU's memory-space
  assignment keeps fewer of the step's activations on chip across the kernels. Measured on
  ResNet-20, one v5e chip (32 images, float32, ``x`` tied, ``lean._tie``): 2.01 GB accessed
  with the default, 1.92 GB with this limit (the same with 1.5x and no floor, or 10 MiB for
  all). Mosaic needed up to 1.8x the estimate over the 55 supported of 98 shapes compiled for
  v5e (C = 8-256, K = 8-128, 1-256 images a device): a limit below a kernel's need fails its
  compile (``CompileTimeScopedVmemOom``).
  """
  return max(VMEM_LIMIT_FLOOR, -(-2 * vmem_bytes(t, c, k) // 2**20) * 2**20)


def _kron(s: int, w: jax.Array) -> jax.Array:
  """``kron(I_s, w)`` built in two dimensions (``jnp.kron`` broadcasts through a padded 4-D
  array: on v5e that cost 20 MB a ResNet-20 step)."""
  if s == 1:
    return w
  tiled = jnp.concatenate([jnp.concatenate([w] * s, axis=1)] * s, axis=0)
  return tiled * np.kron(np.eye(s, dtype=np.float32), np.ones(w.shape, np.float32))


def _tile(s: int, v: jax.Array) -> jax.Array:
  return jnp.tile(v, s)


def _fold_cols(v: jax.Array, s: int, n: int) -> jax.Array:
  """``(m S n, 1)``: ``m`` stacked sums, each per tile position and channel -> ``(m, n)``."""
  return jnp.sum(v.reshape(-1, s, n), axis=1)


def _dot(a, b):
  return jnp.dot(a, b, precision=_HI, preferred_element_type=jnp.float32)


def _dot_nt(a, b):
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_HI,
                         preferred_element_type=jnp.float32)


def _recompute(p, dy, kh, ku, tm, vc, vk):
  """The gate per tile (column form: channels on rows, batch on lanes)."""
  su, a2, b2, mul0, shift0, cen = (vc[:, i:i + 1] for i in range(6))
  hoff, a1, b1 = (vk[:, i:i + 1] for i in range(3))
  hc = _dot(kh, p) + hoff
  pre = a1 * hc + b1
  mask = (pre > 0).astype(jnp.float32)
  act = jnp.maximum(pre, 0.0)
  logits = a2 * (_dot(ku, act) + su) + b2
  s = 1.0 / (1.0 + jnp.exp(-logits))
  gdy = dy * s
  dz = gdy * (p * mul0 + shift0) * (1.0 - s)
  t = _dot(tm, dz)
  return p - cen, hc, mask, act, gdy, dz, t


def _load(ref, transposed: bool):
  """A tile in the column form: ``(T, N, C)`` tiles are transposed to ``(C, T N)``."""
  v = ref[...]
  return v.reshape(-1, v.shape[-1]).T if transposed else v


def _sums_kernel(p_ref, dy_ref, kh_ref, ku_ref, tm_ref, vc_ref, vk_ref, ea_ref, em_ref,
                 colc_ref, colk_ref, xa_ref, xp_ref, *, transposed: bool, positions: int):
  pc, hc, mask, act, gdy, dz, t = _recompute(
      _load(p_ref, transposed), _load(dy_ref, transposed), kh_ref[...], ku_ref[...],
      tm_ref[...], vc_ref[...], vk_ref[...])
  mt = mask * t
  mh = mask * hc
  lane_sum = lambda *vs: jnp.sum(jnp.concatenate(vs, axis=0), axis=1, keepdims=True)
  colc = lane_sum(dz, gdy, gdy * pc, pc)
  colk = lane_sum(mt, mt * hc, mask, mh, hc)
  c, k = pc.shape[0] // positions, act.shape[0] // positions
  xa = xp = 0.0
  for i in range(positions):  # the cross products per position: sublane slices of the tile
    at = lambda v, w: v[i * w:(i + 1) * w]
    three = _dot(ea_ref[...], at(act, k)) * _dot(em_ref[...], at(mask, k))  # (j, k): a_j mask_k
    xa += _dot_nt(at(act, k), jnp.concatenate([at(dz, c), at(mask, k), at(mh, k)], axis=0))
    xp += _dot_nt(at(pc, c), jnp.concatenate([at(mt, k), at(mask, k), at(hc, k), three],
                                              axis=0))

  @pl.when(pl.program_id(0) == 0)
  def _init():
    for ref in (colc_ref, colk_ref, xa_ref, xp_ref):
      ref[...] = jnp.zeros(ref.shape, ref.dtype)

  colc_ref[...] += colc
  colk_ref[...] += colk
  xa_ref[...] += xa
  xp_ref[...] += xp


def _dx_kernel(p_ref, dy_ref, kh_ref, ku_ref, tm_ref, vc_ref, vk_ref, m_ref, kx_ref, wk_ref,
               wc_ref, dx_ref, *, transposed: bool):
  pc, hc, mask, act, gdy, _, t = _recompute(
      _load(p_ref, transposed), _load(dy_ref, transposed), kh_ref[...], ku_ref[...],
      tm_ref[...], vc_ref[...], vk_ref[...])
  wk, wc = wk_ref[...], wc_ref[...]
  r, e0, e1 = (wk[:, i:i + 1] for i in range(3))
  mul0, c0, c1 = (wc[:, i:i + 1] for i in range(3))
  a1 = vk_ref[...][:, 1:2]
  dh = a1 * (mask * (t + _dot(m_ref[...], act) + r)) + e0 + e1 * hc
  dx = _dot(kx_ref[...], dh) + mul0 * gdy + c0 + c1 * pc
  dx_ref[...] = (dx.T.reshape(dx_ref.shape) if transposed else dx).astype(dx_ref.dtype)


def _padded_bytes(shape, itemsize: int = 4) -> int:
  """Bytes of a float32 array in (8, 128) tiles of its last two axes."""
  *major, rows, lanes = shape
  return math.prod(major) * (-(-rows // 8) * 8) * (-(-lanes // 128) * 128) * itemsize


def _pallas(kernel, tiled, consts, outs, *, t: Tiling, flops: int, transcendentals: int,
            interpret: bool, accumulate: bool, kernel_options, vmem: int):
  """One pallas_call over the tiles of ``tiled`` (rows), ``consts`` whole in each step.

  ``tiled`` may be a shard of the batch (axis 1): the tiles take the batch they are given, and
  ``flops``/``transcendentals`` are per device (``t`` is the per-device tiling). The declared
  bytes are each operand and output once in its (8, 128)-tiled size; the FLOPs are the MXU work
  done, block-diagonal zeros and 0/1 selection products included. ``vmem``: the scoped
  on-chip memory limit (:func:`vmem_limit`).
  """
  block = (t.block[0], tiled[0].shape[1]) + tuple(t.block[2:])
  kernel = functools.partial(kernel, transposed=not t.batch_minor, **kernel_options)
  index = t.index_map()
  in_specs = ([pl.BlockSpec(block, index) for _ in tiled]
              + [pl.BlockSpec(c.shape, lambda i: (0, 0)) for c in consts])
  if accumulate:
    out_specs = [pl.BlockSpec(o.shape, lambda i: (0, 0)) for o in outs]
  else:
    outs = [jax.ShapeDtypeStruct(tiled[0].shape, o.dtype) for o in outs]
    out_specs = [pl.BlockSpec(block, index) for _ in outs]
  nbytes = sum(_padded_bytes(a.shape) for a in (*tiled, *consts, *outs))
  kwargs = {}
  if not interpret:
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    kwargs["compiler_params"] = pltpu.CompilerParams(
        dimension_semantics=("arbitrary" if accumulate else "parallel",),
        vmem_limit_bytes=vmem)
  return pl.pallas_call(
      kernel, out_shape=list(outs), grid=(t.steps,), in_specs=in_specs, out_specs=out_specs,
      cost_estimate=pl.CostEstimate(flops=int(flops), transcendentals=int(transcendentals),
                                    bytes_accessed=int(nbytes)),
      interpret=interpret, **kwargs)(*tiled, *consts)


class DataParallel(NamedTuple):
  """The mesh and its axes over which the batch of a traced step is split (see
  :func:`data_parallel`)."""
  mesh: Any
  axes: tuple[str, ...]


_context = threading.local()


@contextlib.contextmanager
def data_parallel(mesh, axes: Sequence[str]) -> Iterator[None]:
  """Declares, while a step is traced, that its batch is split over ``axes`` of ``mesh``.

  The kernels then run under ``jax.shard_map`` on each device's shard, and their batch sums
  are summed over the devices (``psum``), so a jitted step whose batch XLA partitions (the
  training CLI's) keeps the batch split. Without it the kernels see the whole batch: XLA would
  gather a batch-sharded input onto every device first (correct, slow).
  """
  previous = getattr(_context, "value", None)
  _context.value = DataParallel(mesh, tuple(axes))
  try:
    yield
  finally:
    _context.value = previous


def current_data_parallel() -> Optional[DataParallel]:
  """The innermost :func:`data_parallel` declaration, or None.

  Read when the op is traced: the backward pass may be traced later (lowering), outside it.
  """
  return getattr(_context, "value", None)


def batch_split_known() -> bool:
  """Whether an op traced now knows how its batch is split: one device in the process's
  runtime, or a :func:`data_parallel` declaration. (Otherwise, under a step whose batch XLA
  partitions, the kernels would see the whole batch on every device.)"""
  return current_data_parallel() is not None or jax.device_count() == 1


def batch_on_one_device() -> bool:
  """Whether an op traced now sees a batch that lies on one device: a :func:`data_parallel`
  declaration over one shard, or, without one, one device in the process's runtime."""
  declared = current_data_parallel()
  return shards(declared) == 1 if declared is not None else jax.device_count() == 1


def _call(kernel, tiled, consts, outs, *, t: Tiling, accumulate: bool,
          parallel: Optional[DataParallel], **options):
  """:func:`_pallas`, per device with ``parallel`` (batch: axis 1 of ``tiled``)."""
  n_tiled = len(tiled)
  pallas = functools.partial(_pallas, kernel, t=t, accumulate=accumulate, **options)
  if shards(parallel) == 1:
    return pallas(tiled, consts, outs)
  axes = parallel.axes if len(parallel.axes) > 1 else parallel.axes[0]
  split = PartitionSpec(None, axes)

  def per_device(*args):
    results = pallas(args[:n_tiled], args[n_tiled:], outs)
    return tuple(lax.psum(r, axes) for r in results) if accumulate else tuple(results)

  out_specs = tuple(PartitionSpec() if accumulate else split for _ in outs)
  return jax.shard_map(per_device, mesh=parallel.mesh,
                       in_specs=(split,) * n_tiled + (PartitionSpec(),) * len(consts),
                       out_specs=out_specs, check_vma=False)(*tiled, *consts)


def backward(x: jax.Array, params: GateParams, stats: GateStats, gram, dy: jax.Array,
             dstats: Optional[GateStats], *, epsilon: float, norm=None,
             norm_dstats: Optional[Moments] = None, interpret: bool = False,
             parallel: Optional[DataParallel] = None):
  """Same contract as :func:`atac_jax.ops.lean.backward` with ``batch_stats=True``.

  Args:
    x: the input ``(N, spatial..., C)`` (with ``norm``: the fused BatchNorm's input).
    params, stats, gram, dy, dstats, norm, norm_dstats: as ``lean.backward``.
    epsilon: the gate BatchNorms' epsilon.
    interpret: run the kernels in Pallas' interpreter (CPU tests).
    parallel: the batch's mesh axes (:func:`current_data_parallel` when the op was traced):
      the kernels then run per device on its shard.

  Returns:
    ``(dx, dparams, daffine)`` with ``norm``, else ``(dx, dparams, None)``.
  """
  f32 = jnp.float32
  kd, bd = params.down
  ku, bu = params.up
  g1, g2 = params.norm_down.scale.astype(f32), params.norm_up.scale.astype(f32)
  (m1, v1), (m2, v2) = stats
  ddown, dup = (None, None) if dstats is None else dstats
  n_batch, c = x.shape[0], x.shape[-1]
  k = kd.shape[-1]
  positions = math.prod(x.shape[1:-1])
  count = n_batch * positions
  t = tiling(x.shape, shards(parallel))  # lanes, flops: per device
  s, steps, lanes = t.s, t.steps, t.col_lanes
  tile_rows = s * c  # rows of the column form
  kd32, ku32 = kd.astype(f32), ku.astype(f32)
  zeros_c = jnp.zeros((c,), f32)

  if norm is not None:
    mul0, shift0 = batch_norm.scale_shift(norm.stats, norm.affine, norm.epsilon)
    cen = norm.stats.mean
  else:
    mul0, shift0, cen = jnp.ones((c,), f32), zeros_c, zeros_c
  kdf = mul0[:, None] * kd32  # h = p kdf + cd
  cd = shift0 @ kd32 + (0.0 if bd is None else bd.astype(f32))
  rs1 = lax.rsqrt(v1 + epsilon)
  a1 = rs1 * g1
  rs2 = lax.rsqrt(v2 + epsilon)
  a2 = rs2 * g2
  shift_u = -m2 if bu is None else bu.astype(f32) - m2

  kh = _kron(s, kdf.T)
  kum = _kron(s, ku32.T)
  tm = _kron(s, ku32 * a2[None, :])
  vc = jnp.stack([_tile(s, v) for v in (shift_u, a2, params.norm_up.bias.astype(f32), mul0,
                                        shift0, cen)], axis=1)
  vk = jnp.stack([_tile(s, v) for v in (cd - m1, a1, params.norm_down.bias.astype(f32))],
                 axis=1)
  eye_k, ones_k = np.eye(k, dtype=np.float32), np.ones((k, 1), np.float32)
  ea = np.kron(eye_k, ones_k)  # row (j, k) <- a_j
  em = np.kron(ones_k, eye_k)  # row (j, k) <- mask_k
  p_rows, dy_rows = t.to_rows(x.astype(f32)), t.to_rows(dy.astype(f32))
  sk = s * k
  consts = (kh, kum, tm, vc, vk)
  mm = lambda rows, inner: 2 * rows * inner * lanes
  recompute_flops = mm(sk, tile_rows) * 2 + mm(tile_rows, sk) + 12 * tile_rows * lanes
  per_position = 2 * 2 * k * k * k + 2 * k * (c + 2 * k) + 2 * c * (3 + k) * k
  sums_flops = steps * (recompute_flops + s * per_position * lanes)
  outs = (jax.ShapeDtypeStruct((4 * tile_rows, 1), f32), jax.ShapeDtypeStruct((5 * sk, 1), f32),
          jax.ShapeDtypeStruct((k, c + 2 * k), f32), jax.ShapeDtypeStruct((c, (3 + k) * k), f32))
  colc, colk, xa, xp = _call(_sums_kernel, (p_rows, dy_rows),
                             consts + (jnp.asarray(ea), jnp.asarray(em)), outs, t=t,
                             flops=sums_flops,
                             transcendentals=steps * tile_rows * lanes, interpret=interpret,
                             accumulate=True,
                             kernel_options={"positions": s}, parallel=parallel,
                             vmem=vmem_limit(t, c, k))
  s_dz, s_gdy, s_gdy_pc, s_pc = _fold_cols(colc, s, c)
  s_mt, s_mth, s_m, s_mh, s_hc = _fold_cols(colk, s, k)
  adz, q, q2 = xa[:, :c], xa[:, c:c + k], xa[:, c + k:]
  x_mt, x_m, x_hc = xp[:, :k], xp[:, k:2 * k], xp[:, 2 * k:3 * k]
  t3 = xp[:, 3 * k:].reshape(c, k, k)  # [c, j, k]

  # Up BatchNorm (as lean.backward).
  sum_dz_uc = jnp.sum(ku32 * adz, axis=0) + shift_u * s_dz
  dg2, db2 = sum_dz_uc * rs2, s_dz
  c0, c1, dku, dbu = batch_norm.projection_gradients(
      gram.total, gram.matrix, ku32, shift_u, a2, rs2, s_dz, sum_dz_uc, adz, count, dup,
      bias=bu is not None)
  m_mat = (ku32 * c1) @ ku32.T
  r = (c0 + c1 * shift_u) @ ku32.T
  # Down BatchNorm: sums of da_m = mask (t + a M + r) from the accumulated coefficients.
  sum_da = s_mt + jnp.sum(m_mat * q, axis=0) + r * s_m
  sum_da_hc = s_mth + jnp.sum(m_mat * q2, axis=0) + r * s_mh
  dg1, db1 = sum_da_hc * rs1, sum_da
  e0, e1 = batch_norm.input_gradient_terms(a1, rs1, sum_da, sum_da_hc, count, ddown)
  sum_dh = a1 * sum_da + count * e0 + e1 * s_hc
  pc_da = x_mt + jnp.einsum("cjk,jk->ck", t3, m_mat) + x_m * r
  pc_dh = a1 * pc_da + jnp.outer(s_pc, e0) + x_hc * e1  # (p - cen)^T dh
  dbd = None if bd is None else sum_dh
  daffine = None
  if norm is not None:  # lean.InputNorm's terms with xc = p - mean (cen = mean)
    _, d0, d1, dkd, daffine = norm.gradient_terms(kd32, pc_dh, sum_dh, s_gdy, s_gdy_pc, count,
                                                  norm_dstats)
  else:  # cen = 0: pc_dh = x^T dh
    d0, d1 = zeros_c, zeros_c
    dkd = pc_dh

  wk = jnp.stack([_tile(s, v) for v in (r, e0, e1)], axis=1)
  wc = jnp.stack([_tile(s, v) for v in (mul0, d0, d1)], axis=1)
  dx_flops = steps * (recompute_flops + mm(sk, sk) + mm(tile_rows, sk) + 8 * tile_rows * lanes)
  (dx_rows,) = _call(_dx_kernel, (p_rows, dy_rows),
                     consts + (_kron(s, m_mat), _kron(s, kdf), wk, wc),
                     (jax.ShapeDtypeStruct(p_rows.shape, f32),), t=t, flops=dx_flops,
                     transcendentals=steps * tile_rows * lanes, interpret=interpret,
                     accumulate=False, kernel_options={}, parallel=parallel,
                     vmem=vmem_limit(t, c, k))
  dx = t.from_rows(dx_rows, x.shape).astype(x.dtype)
  dparams = cast_like(GateParams(Projection(dkd, dbd), Affine(dg1, db1),
                                 Projection(dku, dbu), Affine(dg2, db2)), params)
  return dx, dparams, daffine
