"""How the Pallas backward's kernels see their operands: TPU geometry, the tiling of the
input, the packed small operands and the on-chip memory a tile needs.

Column form (the kernels' view of a tile): channels on rows, the batch on lanes; a tile stacks
``S`` positions, so a ``C``-channel array is ``(S C, L)`` and a bottleneck array ``(S K, L)``,
``L`` lanes (:attr:`Tiling.col_lanes`); per-channel constants are tiled ``S`` times. Small
operands are packed into one array each, columns named by a NamedTuple; the kernels'
accumulated outputs likewise. Pack and unpack live here only.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


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

  @classmethod
  def shape(cls, rows_c: int) -> tuple[int, int]:
    return (len(cls._fields) * rows_c, 1)  # one stacked sum a field

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

  @classmethod
  def shape(cls, rows_k: int) -> tuple[int, int]:
    return (len(cls._fields) * rows_k, 1)  # one stacked sum a field

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


def _tile(s: int, v: jax.Array) -> jax.Array:
  return jnp.tile(v, s)


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
