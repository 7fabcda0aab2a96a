"""The lean gate's training backward pass as two Pallas kernels (two passes over the input).

XLA writes every operand of the gate's backward products (the bottleneck, ``dz``, ``dh``) and
runs each 1x1 convolution as a pass of its own: about 17 activation-sized passes per unit on
XLA:TPU. These kernels recompute the whole gate per tile in on-chip memory and need two:

1. **sums** (reads ``x`` and ``dy``): every batch sum the backward's three BatchNorms need, and
   the products the weight gradients come from. The down BatchNorm's sums depend on constants
   known only after the up BatchNorm's sums (``c0``, ``c1``); they are linear in them, so the
   pass accumulates each coefficient: with ``da = da_dz + a M + r`` (``da_dz = dz (scale_up
   Wu)^T``, ``M = Wu diag(c1) Wu^T``) and ``mask = a > 0``, ``sum(mask da) = sum(mask da_dz) +
   colsum(M * a^T mask) + r sum(mask)``; the input's products likewise take the three-way
   ``sum(xc_c a_j mask_k)`` (``C x K x K``, a matrix product on the MXU).
2. **dx** (reads ``x`` and ``dy``, writes ``dx``): the input gradient from those constants.

Notation (column form, the kernels' view of a tile): channels on rows, the batch on lanes; a
tile stacks ``S`` positions, so a ``C``-channel array is ``(S C, L)`` and a bottleneck array
``(S K, L)``, ``L`` lanes (``Tiling.col_lanes``); per-channel constants are tiled ``S`` times
and the channel products are block-diagonal ``kron(I_S, W)``. Small operands are packed into
one array each, columns named by a NamedTuple (:class:`InputConsts`, :class:`BottleneckConsts`,
:class:`DownGradConsts`, :class:`InputGradConsts`); the kernels' accumulated outputs likewise
(:class:`InputSums`, :class:`BottleneckSums`, :class:`ActProducts`, :class:`InputProducts`).

Layout: each kernel takes its operands in the layout XLA:TPU gives the activation of each
device, so the transposes around it are bitcasts (:class:`Tiling`, :func:`batch_minor_layout`;
a mismatch costs a relayout copy each way; ``docs/ops_decisions.md``).

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

# ----- TPU geometry and on-chip memory -----

LANES = 128  # a vreg's lanes and the MXU's width: the unit of the minor axis
SUBLANES = 8  # a float32 vreg's sublanes: arrays are stored in (8, 128) tiles
F32_BYTES = 4
MiB = 2**20
CHANNELS_MINOR_LANES = 512  # lanes a channels-minor tile's column form (T N) aims at: 4 vregs
VMEM_BUDGET = 12 * MiB  # the most supported() admits: under Mosaic's default 16 MiB scope on v5e
VMEM_LIMIT_FLOOR = 8 * MiB  # the least limit declared: tiny tiles keep headroom (costs no bytes)
VMEM_LIMIT_MARGIN = 2  # Mosaic allocated up to 1.8x vmem_bytes() (docs/ops_decisions.md)
_TILED_INPUTS = 2  # x and dy
_DOUBLE_BUFFERED = 2  # Pallas fetches the next tile while the kernel works on this one
_WORKING_ARRAYS = 12  # tile-sized temporaries alive at once in the sums kernel, rounded up
_THREE_WAY_ARRAYS = 3  # (K^2, lanes) each: selected a_j, selected mask_k, their product
_RECOMPUTE_ELEMENTWISE_FLOPS = 12  # per element of a tile: the gate's element-wise ops
_DX_ELEMENTWISE_FLOPS = 8  # per element of a tile: dh and dx's element-wise ops


def _round_up(value: int, unit: int) -> int:
  return -(-value // unit) * unit


def _padded_bytes(shape, itemsize: int = F32_BYTES) -> int:
  """Bytes of a float32 array in (8, 128) tiles of its last two axes."""
  *major, rows, lanes = shape
  return math.prod(major) * _round_up(rows, SUBLANES) * _round_up(lanes, LANES) * itemsize


# ----- packed operands: one NamedTuple per packed array, pack and unpack here only -----

def _columns(cls, packed: jax.Array):
  """The fields of ``cls`` from the columns of ``packed`` ``(rows, fields)``, each ``(rows, 1)``."""
  return cls(*(packed[:, i:i + 1] for i in range(len(cls._fields))))


def _stack_tiled(values, positions: int) -> jax.Array:
  """Per-channel vectors, each tiled ``positions`` times, as the columns of one array."""
  return jnp.stack([_tile(positions, v) for v in values], axis=1)


class InputConsts(NamedTuple):
  """Per-channel constants of the gate's ``C``-wide side, packed ``(S C, 6)``."""
  up_shift: jax.Array  # u - mean_u = a Wu + up_shift
  up_scale: jax.Array  # the up BatchNorm's multiplier rsqrt(var_u + eps) gamma_u
  up_bias: jax.Array  # beta_u
  norm_scale: jax.Array  # a fused BatchNorm's multiplier (ones without one)
  norm_shift: jax.Array  # and shift: the gate's input is x norm_scale + norm_shift
  norm_mean: jax.Array  # the fused BatchNorm's batch mean (zeros without one): xc = x - it

  def pack(self, positions: int) -> jax.Array:
    return _stack_tiled(self, positions)

  @classmethod
  def unpack(cls, packed: jax.Array) -> "InputConsts":
    return _columns(cls, packed)


class BottleneckConsts(NamedTuple):
  """Per-bottleneck-channel constants of the down BatchNorm, packed ``(S K, 3)``."""
  h_offset: jax.Array  # h - mean_h = x Wd' + h_offset (Wd' = diag(norm_scale) Wd)
  down_scale: jax.Array  # the down BatchNorm's multiplier rsqrt(var_h + eps) gamma_h
  down_bias: jax.Array  # beta_h

  def pack(self, positions: int) -> jax.Array:
    return _stack_tiled(self, positions)

  @classmethod
  def unpack(cls, packed: jax.Array) -> "BottleneckConsts":
    return _columns(cls, packed)

  @classmethod
  def column(cls, packed: jax.Array, name: str) -> jax.Array:
    """One field, ``(S K, 1)``."""
    i = cls._fields.index(name)
    return packed[:, i:i + 1]


class DownGradConsts(NamedTuple):
  """The dx pass's bottleneck-side constants, packed ``(S K, 3)``: ``da = da_dz + a M + r``,
  ``dh = down_scale mask da + dh_offset + dh_slope hc``."""
  da_offset: jax.Array  # r
  dh_offset: jax.Array  # e0
  dh_slope: jax.Array  # e1

  def pack(self, positions: int) -> jax.Array:
    return _stack_tiled(self, positions)

  @classmethod
  def unpack(cls, packed: jax.Array) -> "DownGradConsts":
    return _columns(cls, packed)


class InputGradConsts(NamedTuple):
  """The dx pass's channel-side constants, packed ``(S C, 3)``:
  ``dx = Wd' dh + norm_scale gate_dy + dx_offset + dx_slope xc``."""
  norm_scale: jax.Array
  dx_offset: jax.Array  # a fused BatchNorm's c0 (zeros without one)
  dx_slope: jax.Array  # and c1

  def pack(self, positions: int) -> jax.Array:
    return _stack_tiled(self, positions)

  @classmethod
  def unpack(cls, packed: jax.Array) -> "InputGradConsts":
    return _columns(cls, packed)


def _fold_cols(v: jax.Array, positions: int, n: int) -> jax.Array:
  """``(m S n, 1)``: ``m`` stacked sums, each per tile position and channel -> ``(m, n)``."""
  return jnp.sum(v.reshape(-1, positions, n), axis=1)


def _lane_sums(*parts: jax.Array) -> jax.Array:
  """``(sum(rows) , 1)``: each part summed over the lanes, stacked on the rows."""
  return jnp.sum(jnp.concatenate(parts, axis=0), axis=1, keepdims=True)


class InputSums(NamedTuple):
  """Batch sums over the ``C`` channels, accumulated ``(4 S C, 1)``, unpacked ``(C,)`` each."""
  dz: jax.Array
  gate_dy: jax.Array
  gate_dy_xc: jax.Array
  xc: jax.Array

  @staticmethod
  def shape(rows_c: int) -> tuple[int, int]:
    return (4 * rows_c, 1)

  @classmethod
  def unpack(cls, packed: jax.Array, positions: int, c: int) -> "InputSums":
    return cls(*_fold_cols(packed, positions, c))


class BottleneckSums(NamedTuple):
  """Batch sums over the ``K`` bottleneck channels, accumulated ``(5 S K, 1)``."""
  mask_da_dz: jax.Array
  mask_da_dz_hc: jax.Array
  mask: jax.Array
  mask_hc: jax.Array
  hc: jax.Array

  @staticmethod
  def shape(rows_k: int) -> tuple[int, int]:
    return (5 * rows_k, 1)

  @classmethod
  def unpack(cls, packed: jax.Array, positions: int, k: int) -> "BottleneckSums":
    return cls(*_fold_cols(packed, positions, k))


class ActProducts(NamedTuple):
  """``a^T [dz | mask | mask hc]`` over the batch, accumulated ``(K, C + 2 K)``."""
  a_dz: jax.Array  # (K, C)
  a_mask: jax.Array  # (K, K)
  a_mask_hc: jax.Array  # (K, K)

  @staticmethod
  def shape(c: int, k: int) -> tuple[int, int]:
    return (k, c + 2 * k)

  @staticmethod
  def right(dz, mask, mask_hc) -> jax.Array:
    """The right operand whose product with ``a`` (per position) gives the packed array."""
    return jnp.concatenate([dz, mask, mask_hc], axis=0)

  @classmethod
  def unpack(cls, packed: jax.Array, c: int, k: int) -> "ActProducts":
    return cls(packed[:, :c], packed[:, c:c + k], packed[:, c + k:])


class InputProducts(NamedTuple):
  """``xc^T [mask da_dz | mask | hc | a_j mask_k]`` over the batch, accumulated
  ``(C, 3 K + K^2)``."""
  xc_mask_da_dz: jax.Array  # (C, K)
  xc_mask: jax.Array  # (C, K)
  xc_hc: jax.Array  # (C, K)
  xc_a_mask: jax.Array  # (C, K, K): [c, j, k] = sum(xc_c a_j mask_k)

  @staticmethod
  def shape(c: int, k: int) -> tuple[int, int]:
    return (c, (3 + k) * k)

  @staticmethod
  def right(mask_da_dz, mask, hc, a_mask) -> jax.Array:
    return jnp.concatenate([mask_da_dz, mask, hc, a_mask], axis=0)

  @classmethod
  def unpack(cls, packed: jax.Array, c: int, k: int) -> "InputProducts":
    return cls(packed[:, :k], packed[:, k:2 * k], packed[:, 2 * k:3 * k],
               packed[:, 3 * k:].reshape(c, k, k))


# ----- layout and tiling -----

class Tiling(NamedTuple):
  """How the input is laid out as rows for the kernels, and how it is cut into tiles.

  ``batch_minor``: rows ``(P C, N)`` (channels on sublanes, the batch on lanes), a tile
  ``positions`` (``S``) positions of ``C`` channels; the kernels' column form is the tile itself
  and the channel products are ``kron(I_S, W)``. Else channels-minor: rows ``(P, N, C)``, a tile
  ``T`` positions of ``N`` images, transposed in the kernel to the column form ``(C, T N)``
  (``S = 1``). Either way the batch is axis 1 of the rows array, and a batch-sharded input stays
  sharded.
  """
  batch_minor: bool
  positions: int  # S: positions a tile stacks in the column form's rows
  block: tuple[int, ...]  # a tile of the rows array (a device's batch)
  steps: int
  col_lanes: int  # L: lanes of the column form (a device's batch)
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

  The wider of batch and channels goes on the lanes, ties to the channels (read off v5e
  compiles of ResNet-20; ``tests/test_aot.py`` fails if XLA:TPU changes it). The kernels take
  the same layout so the transposes to their rows are bitcasts.
  """
  return c < min(n, LANES)


def tiling(shape, shards: int = 1) -> Tiling:
  """The :class:`Tiling` of an input of ``shape`` ``(N, spatial..., C)``, its batch split in
  ``shards`` (the layout XLA gives each device's shard is what the kernels must match)."""
  n, c = shape[0] // shards, shape[-1]
  positions = math.prod(shape[1:-1])
  if batch_minor_layout(n, c):
    # S C = 128 rows: the block-diagonal channel products are whole MXU tiles.
    per_tile = LANES // c if c <= LANES and LANES % c == 0 else 1
    steps = positions // per_tile if positions % per_tile == 0 else 0
    return Tiling(True, per_tile, (per_tile * c, n), steps, n, n)
  per_tile = max(1, CHANNELS_MINOR_LANES // n)
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
  if c % SUBLANES or k % SUBLANES:
    return f"channels {c} and bottleneck {k} must be multiples of 8"
  if x.shape[0] % shards(parallel):
    return f"batch {x.shape[0]} does not split into {shards(parallel)} shards"
  tiles = tiling(x.shape, shards(parallel))
  if not tiles.steps:
    return (f"{math.prod(x.shape[1:-1])} positions are not a multiple of {tiles.positions} "
            "per tile")
  if not tiles.batch_minor and tiles.batch % SUBLANES:
    return f"batch {tiles.batch} a device is not a multiple of 8 (channels-minor tiles)"
  need = vmem_bytes(tiles, c, k)
  if need > VMEM_BUDGET:
    return (f"a tile needs ~{need / MiB:.1f} MiB of on-chip memory (C={c}, K={k}, "
            f"{tiles.col_lanes} lanes); the budget is {VMEM_BUDGET / MiB:.0f} MiB")
  return None


def vmem_bytes(tiles: Tiling, c: int, k: int) -> int:
  """A generous estimate of the on-chip memory the sums kernel (the larger) needs per tile.

  Double-buffered input tiles, the working arrays of the tile's size, the per-position
  ``(K^2, lanes)`` three-way products, the accumulators and the constants (all float32, lanes
  padded to 128).
  """
  lanes = _round_up(tiles.col_lanes, LANES)
  rows_c, rows_k = tiles.positions * c, tiles.positions * k
  tile = F32_BYTES * lanes * (_TILED_INPUTS * _DOUBLE_BUFFERED * rows_c
                              + _WORKING_ARRAYS * max(rows_c, rows_k)
                              + _THREE_WAY_ARRAYS * k * k)
  accumulators = _padded_bytes(InputProducts.shape(c, k)) + _padded_bytes(ActProducts.shape(c, k))
  weights = 3 * _padded_bytes((rows_k, rows_c))  # kron(I_S, W): down, up and the up transpose
  selectors = 2 * _padded_bytes((k * k, k))  # the 0/1 matrices picking a_j and mask_k
  return tile + accumulators + weights + selectors


def vmem_limit(tiles: Tiling, c: int, k: int) -> int:
  """The scoped on-chip memory limit the kernels declare to Mosaic: ``VMEM_LIMIT_MARGIN`` x
  :func:`vmem_bytes` rounded up to a MiB, at least ``VMEM_LIMIT_FLOOR`` (at most 24 MiB under
  ``VMEM_BUDGET``).

  Mosaic otherwise reserves its default limit around each kernel, and XLA:TPU's memory-space
  assignment keeps fewer of the step's activations on chip across the kernels; a limit below a
  kernel's need fails its compile (``CompileTimeScopedVmemOom``). Data: ``docs/ops_decisions.md``.
  """
  return max(VMEM_LIMIT_FLOOR, _round_up(VMEM_LIMIT_MARGIN * vmem_bytes(tiles, c, k), MiB))


# ----- the kernels (column form: channels on rows, the batch on lanes) -----

def _kron(s: int, w: jax.Array) -> jax.Array:
  """``kron(I_s, w)`` built in two dimensions (``jnp.kron`` broadcasts through a padded 4-D
  array, which costs an extra write on v5e)."""
  if s == 1:
    return w
  tiled = jnp.concatenate([jnp.concatenate([w] * s, axis=1)] * s, axis=0)
  return tiled * np.kron(np.eye(s, dtype=np.float32), np.ones(w.shape, np.float32))


def _tile(s: int, v: jax.Array) -> jax.Array:
  return jnp.tile(v, s)


def _dot(a, b):
  return jnp.dot(a, b, precision=_HI, preferred_element_type=jnp.float32)


def _dot_nt(a, b):
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_HI,
                         preferred_element_type=jnp.float32)


class Recomputed(NamedTuple):
  """The gate recomputed for one tile (column form)."""
  xc: jax.Array  # (S C, L) the input centred on the fused BatchNorm's mean
  hc: jax.Array  # (S K, L) the down-projection centred on its batch mean
  mask: jax.Array  # (S K, L) 1 where the bottleneck activation is positive
  act: jax.Array  # (S K, L) the bottleneck activation a
  gate_dy: jax.Array  # (S C, L) dy sigmoid(z)
  dz: jax.Array  # (S C, L) the up BatchNorm's output gradient
  da_dz: jax.Array  # (S K, L) dz's term of da: kron(I_S, scale_up Wu) dz


def _recompute(x, dy, w_down, w_up, w_back, input_consts, bottleneck_consts) -> Recomputed:
  """The gate per tile: ``x``, ``dy`` ``(S C, L)``; the weights ``kron(I_S, .)``."""
  up_shift, up_scale, up_bias, norm_scale, norm_shift, norm_mean = (
      InputConsts.unpack(input_consts))
  h_offset, down_scale, down_bias = BottleneckConsts.unpack(bottleneck_consts)
  hc = _dot(w_down, x) + h_offset  # (S K, L)
  pre = down_scale * hc + down_bias
  mask = (pre > 0).astype(jnp.float32)
  act = jnp.maximum(pre, 0.0)
  z = up_scale * (_dot(w_up, act) + up_shift) + up_bias  # (S C, L)
  sig = 1.0 / (1.0 + jnp.exp(-z))
  gate_dy = dy * sig
  dz = gate_dy * (x * norm_scale + norm_shift) * (1.0 - sig)
  da_dz = _dot(w_back, dz)  # (S K, L)
  return Recomputed(x - norm_mean, hc, mask, act, gate_dy, dz, da_dz)


def _load(ref, transposed: bool):
  """A tile in the column form: ``(T, N, C)`` tiles are transposed to ``(C, T N)``."""
  v = ref[...]
  return v.reshape(-1, v.shape[-1]).T if transposed else v


def _sums_kernel(x_ref, dy_ref, w_down_ref, w_up_ref, w_back_ref, input_consts_ref,
                 bottleneck_consts_ref, pick_a_ref, pick_mask_ref, input_sums_ref,
                 bottleneck_sums_ref, act_products_ref, input_products_ref, *, transposed: bool,
                 positions: int):
  """Accumulates :class:`InputSums`, :class:`BottleneckSums`, :class:`ActProducts` and
  :class:`InputProducts` over the tiles."""
  xc, hc, mask, act, gate_dy, dz, da_dz = _recompute(
      _load(x_ref, transposed), _load(dy_ref, transposed), w_down_ref[...], w_up_ref[...],
      w_back_ref[...], input_consts_ref[...], bottleneck_consts_ref[...])
  mask_da_dz = mask * da_dz  # (S K, L)
  mask_hc = mask * hc
  input_sums = _lane_sums(dz, gate_dy, gate_dy * xc, xc)  # InputSums, (4 S C, 1)
  bottleneck_sums = _lane_sums(mask_da_dz, mask_da_dz * hc, mask, mask_hc, hc)  # (5 S K, 1)
  c, k = xc.shape[0] // positions, act.shape[0] // positions
  act_products = input_products = 0.0
  for i in range(positions):  # the cross products per position: sublane slices of the tile
    at = lambda v, w: v[i * w:(i + 1) * w]
    a_mask = _dot(pick_a_ref[...], at(act, k)) * _dot(pick_mask_ref[...], at(mask, k))  # (K^2, L)
    act_products += _dot_nt(at(act, k), ActProducts.right(at(dz, c), at(mask, k),
                                                          at(mask_hc, k)))
    input_products += _dot_nt(at(xc, c), InputProducts.right(at(mask_da_dz, k), at(mask, k),
                                                             at(hc, k), a_mask))

  @pl.when(pl.program_id(0) == 0)
  def _init():
    for ref in (input_sums_ref, bottleneck_sums_ref, act_products_ref, input_products_ref):
      ref[...] = jnp.zeros(ref.shape, ref.dtype)

  input_sums_ref[...] += input_sums
  bottleneck_sums_ref[...] += bottleneck_sums
  act_products_ref[...] += act_products
  input_products_ref[...] += input_products


def _dx_kernel(x_ref, dy_ref, w_down_ref, w_up_ref, w_back_ref, input_consts_ref,
               bottleneck_consts_ref, m_ref, w_down_t_ref, down_grad_ref, input_grad_ref,
               dx_ref, *, transposed: bool):
  """``dx`` per tile from the :class:`DownGradConsts` and :class:`InputGradConsts`."""
  xc, hc, mask, act, gate_dy, _, da_dz = _recompute(
      _load(x_ref, transposed), _load(dy_ref, transposed), w_down_ref[...], w_up_ref[...],
      w_back_ref[...], input_consts_ref[...], bottleneck_consts_ref[...])
  down_grad, input_grad = down_grad_ref[...], input_grad_ref[...]
  da_offset, dh_offset, dh_slope = DownGradConsts.unpack(down_grad)
  norm_scale, dx_offset, dx_slope = InputGradConsts.unpack(input_grad)
  down_scale = BottleneckConsts.column(bottleneck_consts_ref[...], "down_scale")
  dh = (down_scale * (mask * (da_dz + _dot(m_ref[...], act) + da_offset)) + dh_offset
        + dh_slope * hc)  # (S K, L)
  dx = _dot(w_down_t_ref[...], dh) + norm_scale * gate_dy + dx_offset + dx_slope * xc  # (S C, L)
  dx_ref[...] = (dx.T.reshape(dx_ref.shape) if transposed else dx).astype(dx_ref.dtype)


def _pallas(kernel, tiled, consts, outs, *, tiles: Tiling, flops: int, transcendentals: int,
            interpret: bool, accumulate: bool, kernel_options, vmem: int):
  """One pallas_call over the tiles of ``tiled`` (rows), ``consts`` whole in each step.

  ``tiled`` may be a shard of the batch (axis 1): the tiles take the batch they are given, and
  ``flops``/``transcendentals`` are per device (``tiles`` is the per-device tiling). The declared
  bytes are each operand and output once in its (8, 128)-tiled size; the FLOPs are the MXU work
  done, block-diagonal zeros and 0/1 selection products included. ``vmem``: the scoped
  on-chip memory limit (:func:`vmem_limit`).
  """
  block = (tiles.block[0], tiled[0].shape[1]) + tuple(tiles.block[2:])
  kernel = functools.partial(kernel, transposed=not tiles.batch_minor, **kernel_options)
  index = tiles.index_map()
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
      kernel, out_shape=list(outs), grid=(tiles.steps,), in_specs=in_specs, out_specs=out_specs,
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


def _call(kernel, tiled, consts, outs, *, tiles: Tiling, accumulate: bool,
          parallel: Optional[DataParallel], **options):
  """:func:`_pallas`, per device with ``parallel`` (batch: axis 1 of ``tiled``)."""
  n_tiled = len(tiled)
  pallas = functools.partial(_pallas, kernel, tiles=tiles, accumulate=accumulate, **options)
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


class _Folded(NamedTuple):
  """The forward pass's BatchNorms as per-channel constants (float32, host side)."""
  w_down: jax.Array  # (C, K) Wd' = diag(norm_scale) Wd: h = x Wd' + h_bias
  h_bias: jax.Array  # (K,) norm_shift Wd + bd
  rs_down: jax.Array  # (K,) rsqrt(var_h + eps)
  down_scale: jax.Array  # (K,) rs_down gamma_h
  rs_up: jax.Array  # (C,) rsqrt(var_u + eps)
  up_scale: jax.Array  # (C,) rs_up gamma_u
  up_shift: jax.Array  # (C,) bu - mean_u: u - mean_u = a Wu + up_shift
  norm_scale: jax.Array  # (C,) the fused BatchNorm's multiplier (ones without one)
  norm_shift: jax.Array  # (C,) and shift (zeros without one)
  norm_mean: jax.Array  # (C,) its batch mean (zeros without one)


def _fold(params: GateParams, stats: GateStats, norm, epsilon: float, zeros_c) -> _Folded:
  f32 = jnp.float32
  kd, bd = params.down
  (m2, v2) = stats.up
  if norm is not None:
    norm_scale, norm_shift = batch_norm.scale_shift(norm.stats, norm.affine, norm.epsilon)
    norm_mean = norm.stats.mean
  else:
    norm_scale, norm_shift, norm_mean = jnp.ones(zeros_c.shape, f32), zeros_c, zeros_c
  kd32 = kd.astype(f32)
  w_down = norm_scale[:, None] * kd32
  h_bias = norm_shift @ kd32 + (0.0 if bd is None else bd.astype(f32))
  rs_down = lax.rsqrt(stats.down.var + epsilon)
  down_scale = rs_down * params.norm_down.scale.astype(f32)
  rs_up = lax.rsqrt(v2 + epsilon)
  up_scale = rs_up * params.norm_up.scale.astype(f32)
  bu = params.up.bias
  up_shift = -m2 if bu is None else bu.astype(f32) - m2
  return _Folded(w_down, h_bias, rs_down, down_scale, rs_up, up_scale, up_shift, norm_scale,
                 norm_shift, norm_mean)


class _UpGradients(NamedTuple):
  """The up BatchNorm's backward from the sums pass (as in ``lean.backward``)."""
  dscale: jax.Array
  dbias: jax.Array
  dkernel: jax.Array
  dproj_bias: Optional[jax.Array]
  m_mat: jax.Array  # (K, K) M = Wu diag(c1) Wu^T: da = da_dz + a M + r
  da_offset: jax.Array  # (K,) r = (c0 + c1 up_shift) Wu^T


def _up_gradients(f: _Folded, ku32, gram, sums: InputSums, act: ActProducts, count, dup,
                  bias: bool) -> _UpGradients:
  sum_dz_uc = jnp.sum(ku32 * act.a_dz, axis=0) + f.up_shift * sums.dz
  dscale, dbias = sum_dz_uc * f.rs_up, sums.dz
  c0, c1, dkernel, dproj_bias = batch_norm.projection_gradients(
      gram.total, gram.matrix, ku32, f.up_shift, f.up_scale, f.rs_up, sums.dz, sum_dz_uc,
      act.a_dz, count, dup, bias=bias)
  m_mat = (ku32 * c1) @ ku32.T
  da_offset = (c0 + c1 * f.up_shift) @ ku32.T
  return _UpGradients(dscale, dbias, dkernel, dproj_bias, m_mat, da_offset)


class _DownGradients(NamedTuple):
  """The down BatchNorm's backward: ``dh = down_scale da + dh_offset + dh_slope hc``."""
  dscale: jax.Array
  dbias: jax.Array
  dh_offset: jax.Array  # e0
  dh_slope: jax.Array  # e1
  sum_dh: jax.Array  # (K,)
  xc_dh: jax.Array  # (C, K) xc^T dh


def _down_gradients(f: _Folded, up: _UpGradients, sums: BottleneckSums, act: ActProducts,
                    inputs: InputProducts, sum_xc, count, ddown) -> _DownGradients:
  # sums of da_m = mask (da_dz + a M + r) from the accumulated coefficients
  sum_da = sums.mask_da_dz + jnp.sum(up.m_mat * act.a_mask, axis=0) + up.da_offset * sums.mask
  sum_da_hc = (sums.mask_da_dz_hc + jnp.sum(up.m_mat * act.a_mask_hc, axis=0)
               + up.da_offset * sums.mask_hc)
  dscale, dbias = sum_da_hc * f.rs_down, sum_da
  e0, e1 = batch_norm.input_gradient_terms(f.down_scale, f.rs_down, sum_da, sum_da_hc, count,
                                           ddown)
  sum_dh = f.down_scale * sum_da + count * e0 + e1 * sums.hc
  xc_da = (inputs.xc_mask_da_dz + jnp.einsum("cjk,jk->ck", inputs.xc_a_mask, up.m_mat)
           + inputs.xc_mask * up.da_offset)
  xc_dh = f.down_scale * xc_da + jnp.outer(sum_xc, e0) + inputs.xc_hc * e1
  return _DownGradients(dscale, dbias, e0, e1, sum_dh, xc_dh)


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
    parallel: the batch's mesh axes (the op's :class:`~atac_jax.ops.dispatch.Choice`): the
      kernels then run per device on its shard.

  Returns:
    ``(dx, dparams, daffine)`` with ``norm``, else ``(dx, dparams, None)``.
  """
  f32 = jnp.float32
  ddown, dup = (None, None) if dstats is None else dstats
  n_batch, c = x.shape[0], x.shape[-1]
  k = params.down.kernel.shape[-1]
  count = n_batch * math.prod(x.shape[1:-1])
  tiles = tiling(x.shape, shards(parallel))  # lanes, flops: per device
  s, steps, lanes = tiles.positions, tiles.steps, tiles.col_lanes
  rows_c, rows_k = s * c, s * k  # rows of the column form
  kd32, ku32 = params.down.kernel.astype(f32), params.up.kernel.astype(f32)
  zeros_c = jnp.zeros((c,), f32)
  f = _fold(params, stats, norm, epsilon, zeros_c)

  # Operands of both kernels: the weights kron(I_S, .) and the packed per-channel constants.
  w_down = _kron(s, f.w_down.T)  # (S K, S C)
  w_up = _kron(s, ku32.T)  # (S C, S K)
  w_back = _kron(s, ku32 * f.up_scale[None, :])  # (S K, S C)
  input_consts = InputConsts(f.up_shift, f.up_scale, params.norm_up.bias.astype(f32),
                             f.norm_scale, f.norm_shift, f.norm_mean).pack(s)  # (S C, 6)
  bottleneck_consts = BottleneckConsts(f.h_bias - stats.down.mean, f.down_scale,
                                       params.norm_down.bias.astype(f32)).pack(s)  # (S K, 3)
  eye_k, ones_k = np.eye(k, dtype=np.float32), np.ones((k, 1), np.float32)
  pick_a = np.kron(eye_k, ones_k)  # (K^2, K): row (j, k) <- a_j
  pick_mask = np.kron(ones_k, eye_k)  # (K^2, K): row (j, k) <- mask_k
  x_rows, dy_rows = tiles.to_rows(x.astype(f32)), tiles.to_rows(dy.astype(f32))
  consts = (w_down, w_up, w_back, input_consts, bottleneck_consts)
  mm = lambda rows, inner: 2 * rows * inner * lanes
  recompute_flops = (mm(rows_k, rows_c) * 2 + mm(rows_c, rows_k)
                     + _RECOMPUTE_ELEMENTWISE_FLOPS * rows_c * lanes)
  per_position = 2 * 2 * k * k * k + 2 * k * (c + 2 * k) + 2 * c * (3 + k) * k
  sums_flops = steps * (recompute_flops + s * per_position * lanes)

  # Pass 1: the sums.
  outs = tuple(jax.ShapeDtypeStruct(shape, f32) for shape in (
      InputSums.shape(rows_c), BottleneckSums.shape(rows_k), ActProducts.shape(c, k),
      InputProducts.shape(c, k)))
  packed = _call(_sums_kernel, (x_rows, dy_rows),
                 consts + (jnp.asarray(pick_a), jnp.asarray(pick_mask)), outs, tiles=tiles,
                 flops=sums_flops, transcendentals=steps * rows_c * lanes, interpret=interpret,
                 accumulate=True, kernel_options={"positions": s}, parallel=parallel,
                 vmem=vmem_limit(tiles, c, k))
  input_sums = InputSums.unpack(packed[0], s, c)
  bottleneck_sums = BottleneckSums.unpack(packed[1], s, k)
  act_products = ActProducts.unpack(packed[2], c, k)
  input_products = InputProducts.unpack(packed[3], c, k)

  # The BatchNorms' gradients from the sums (host side, small).
  up = _up_gradients(f, ku32, gram, input_sums, act_products, count, dup,
                     bias=params.up.bias is not None)
  down = _down_gradients(f, up, bottleneck_sums, act_products, input_products, input_sums.xc,
                         count, ddown)
  dbd = None if params.down.bias is None else down.sum_dh
  daffine = None
  if norm is not None:  # lean.InputNorm's terms with xc = x - norm_mean
    _, dx_offset, dx_slope, dkd, daffine = norm.gradient_terms(
        kd32, down.xc_dh, down.sum_dh, input_sums.gate_dy, input_sums.gate_dy_xc, count,
        norm_dstats)
  else:  # norm_mean = 0: xc_dh = x^T dh
    dx_offset, dx_slope = zeros_c, zeros_c
    dkd = down.xc_dh

  # Pass 2: dx.
  down_grad = DownGradConsts(up.da_offset, down.dh_offset, down.dh_slope).pack(s)  # (S K, 3)
  input_grad = InputGradConsts(f.norm_scale, dx_offset, dx_slope).pack(s)  # (S C, 3)
  dx_flops = steps * (recompute_flops + mm(rows_k, rows_k) + mm(rows_c, rows_k)
                      + _DX_ELEMENTWISE_FLOPS * rows_c * lanes)
  (dx_rows,) = _call(_dx_kernel, (x_rows, dy_rows),
                     consts + (_kron(s, up.m_mat), _kron(s, f.w_down), down_grad, input_grad),
                     (jax.ShapeDtypeStruct(x_rows.shape, f32),), tiles=tiles, flops=dx_flops,
                     transcendentals=steps * rows_c * lanes, interpret=interpret,
                     accumulate=False, kernel_options={}, parallel=parallel,
                     vmem=vmem_limit(tiles, c, k))
  dx = tiles.from_rows(dx_rows, x.shape).astype(x.dtype)
  dparams = cast_like(GateParams(Projection(dkd, dbd), Affine(down.dscale, down.dbias),
                                 Projection(up.dkernel, up.dproj_bias),
                                 Affine(up.dscale, up.dbias)), params)
  return dx, dparams, daffine
