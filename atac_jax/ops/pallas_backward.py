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
and the channel products are block-diagonal ``kron(I_S, W)``. Small operands and the kernels'
accumulated outputs are packed into one array each, their columns named by the NamedTuples of
:mod:`atac_jax.ops.pallas_tiles` (``InputConsts`` ... ``InputProducts``), which also holds the
tiling and the on-chip memory estimate.

Layout: each kernel takes its operands in the layout XLA:TPU gives the activation of each
device, so the transposes around it are bitcasts (``Tiling``, ``batch_minor_layout``;
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
# The layout, tiling and memory names are pallas_tiles'; the ones tests and tools use are
# re-exported here (batch_minor_layout, tiling, vmem_bytes, vmem_limit, VMEM_*).
from atac_jax.ops.pallas_tiles import (  # pylint: disable=unused-import
    SUBLANES, VMEM_BUDGET, VMEM_LIMIT_FLOOR, ActProducts, BottleneckConsts, BottleneckSums,
    DownGradConsts, InputConsts, InputGradConsts, InputProducts, InputSums, MiB, Tiling,
    _lane_sums, _padded_bytes, batch_minor_layout, tiling, vmem_bytes, vmem_limit)
from atac_jax.ops.types import (Affine, GateParams, GateStats, Moments, Projection, cast_like,
                                varying_like)

_HI = lax.Precision.HIGHEST

_RECOMPUTE_ELEMENTWISE_FLOPS = 12  # per element of a tile: the gate's element-wise ops
_DX_ELEMENTWISE_FLOPS = 8  # per element of a tile: dh and dx's element-wise ops


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


# ----- the kernels (column form: channels on rows, the batch on lanes) -----

def _kron(s: int, w: jax.Array) -> jax.Array:
  """``kron(I_s, w)`` built in two dimensions (``jnp.kron`` broadcasts through a padded 4-D
  array, which costs an extra write on v5e)."""
  if s == 1:
    return w
  tiled = jnp.concatenate([jnp.concatenate([w] * s, axis=1)] * s, axis=0)
  return tiled * np.kron(np.eye(s, dtype=np.float32), np.ones(w.shape, np.float32))


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


def _varying_like(out: jax.ShapeDtypeStruct, operand: jax.Array) -> jax.ShapeDtypeStruct:
  """``out`` varying over the manual mesh axes ``operand`` varies over: inside a
  ``jax.shard_map`` that checks them, a ``pallas_call`` must say how its outputs vary."""
  manual = getattr(jax.typeof(operand), "manual_axis_type", None)
  if manual is None:
    return out
  return jax.ShapeDtypeStruct(out.shape, out.dtype, manual_axis_type=manual)


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
  outs = [_varying_like(o, tiled[0]) for o in outs]
  consts = varying_like(tiled[0], tuple(jnp.asarray(c) for c in consts))
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


def run_per_device(fn, tiled, consts, *, parallel: Optional[DataParallel], batch_axis: int,
                   summed: bool):
  """``fn(tiled, consts)`` (a tuple of outputs) on each device's shard of ``tiled`` (the batch
  on axis ``batch_axis``) under ``jax.shard_map`` with ``parallel``, ``consts`` whole on each;
  ``summed`` outputs (batch sums) are ``psum``-ed over the devices, else split as the batch.
  With one shard, ``fn`` on the whole. Shared by the TPU and GPU kernels."""
  if shards(parallel) == 1:
    return tuple(fn(tiled, consts))
  axes = parallel.axes if len(parallel.axes) > 1 else parallel.axes[0]
  split = PartitionSpec(*([None] * batch_axis), axes)
  n_tiled = len(tiled)

  def per_device(*args):
    results = tuple(fn(args[:n_tiled], args[n_tiled:]))
    return tuple(lax.psum(r, axes) for r in results) if summed else results

  return jax.shard_map(per_device, mesh=parallel.mesh,
                       in_specs=(split,) * n_tiled + (PartitionSpec(),) * len(consts),
                       out_specs=PartitionSpec() if summed else split,
                       check_vma=False)(*tiled, *consts)


def _call(kernel, tiled, consts, outs, *, tiles: Tiling, accumulate: bool,
          parallel: Optional[DataParallel], **options):
  """:func:`_pallas`, per device with ``parallel`` (batch: axis 1 of ``tiled``)."""
  pallas = functools.partial(_pallas, kernel, tiles=tiles, accumulate=accumulate, **options)
  return run_per_device(lambda t, c: pallas(t, c, outs), tiled, consts, parallel=parallel,
                        batch_axis=1, summed=accumulate)


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
  """The up BatchNorm's backward from the sums pass (as in ``lean.backward``); shared with
  :mod:`atac_jax.ops.pallas_gpu`, whose kernels use ``c0``, ``c1`` where these use ``M``, ``r``."""
  dscale: jax.Array
  dbias: jax.Array
  dkernel: jax.Array
  dproj_bias: Optional[jax.Array]
  c0: jax.Array  # (C,) du = up_scale dz + c0 + c1 uc
  c1: jax.Array  # (C,)
  m_mat: jax.Array  # (K, K) M = Wu diag(c1) Wu^T: da = da_dz + a M + r
  da_offset: jax.Array  # (K,) r = (c0 + c1 up_shift) Wu^T


def _up_gradients(f: _Folded, ku32, gram, sums: InputSums, a_dz, count, dup,
                  bias: bool, axis_name) -> _UpGradients:
  """From :class:`InputSums` and ``a_dz = a^T dz`` ``(K, C)``."""
  sum_dz_uc = jnp.sum(ku32 * a_dz, axis=0) + f.up_shift * sums.dz
  dscale, dbias = sum_dz_uc * f.rs_up, sums.dz
  c0, c1, dkernel, dproj_bias = batch_norm.projection_gradients(
      gram.total, gram.matrix, ku32, f.up_shift, f.up_scale, f.rs_up, sums.dz, sum_dz_uc,
      a_dz, count, dup, bias=bias, axis_name=axis_name)
  m_mat = (ku32 * c1) @ ku32.T
  da_offset = (c0 + c1 * f.up_shift) @ ku32.T
  return _UpGradients(dscale, dbias, dkernel, dproj_bias, c0, c1, m_mat, da_offset)


class _DownGradients(NamedTuple):
  """The down BatchNorm's backward: ``dh = down_scale da + dh_offset + dh_slope hc``."""
  dscale: jax.Array
  dbias: jax.Array
  dh_offset: jax.Array  # e0
  dh_slope: jax.Array  # e1
  sum_dh: jax.Array  # (K,)
  xc_dh: jax.Array  # (C, K) xc^T dh


def _down_from_sums(f: _Folded, sum_da, sum_da_hc, sum_hc, xc_da, xc_hc, sum_xc, count, ddown,
                    axis_name) -> _DownGradients:
  """The down BatchNorm's backward from the sums of ``da`` (masked), ``da hc``, ``hc`` and the
  products ``xc^T da``, ``xc^T hc`` (shared with :mod:`atac_jax.ops.pallas_gpu`)."""
  dscale, dbias = sum_da_hc * f.rs_down, sum_da
  e0, e1 = batch_norm.input_gradient_terms(f.down_scale, f.rs_down, sum_da, sum_da_hc, count,
                                           ddown, axis_name=axis_name)
  sum_dh = f.down_scale * sum_da + count * e0 + e1 * sum_hc
  xc_dh = f.down_scale * xc_da + jnp.outer(sum_xc, e0) + xc_hc * e1
  return _DownGradients(dscale, dbias, e0, e1, sum_dh, xc_dh)


def _down_gradients(f: _Folded, up: _UpGradients, sums: BottleneckSums, act: ActProducts,
                    inputs: InputProducts, sum_xc, count, ddown, axis_name) -> _DownGradients:
  # sums of da_m = mask (da_dz + a M + r) from the accumulated coefficients
  sum_da = sums.mask_da_dz + jnp.sum(up.m_mat * act.a_mask, axis=0) + up.da_offset * sums.mask
  sum_da_hc = (sums.mask_da_dz_hc + jnp.sum(up.m_mat * act.a_mask_hc, axis=0)
               + up.da_offset * sums.mask_hc)
  xc_da = (inputs.xc_mask_da_dz + jnp.einsum("cjk,jk->ck", inputs.xc_a_mask, up.m_mat)
           + inputs.xc_mask * up.da_offset)
  return _down_from_sums(f, sum_da, sum_da_hc, sums.hc, xc_da, inputs.xc_hc, sum_xc, count,
                         ddown, axis_name)


def backward(x: jax.Array, params: GateParams, stats: GateStats, gram, dy: jax.Array,
             dstats: Optional[GateStats], *, epsilon: float, norm=None,
             norm_dstats: Optional[Moments] = None, interpret: bool = False,
             parallel: Optional[DataParallel] = None, axis_name: Any = None):
  """Same contract as :func:`atac_jax.ops.lean.backward` with ``batch_stats=True``.

  Args:
    x: the input ``(N, spatial..., C)`` (with ``norm``: the fused BatchNorm's input).
    params, stats, gram, dy, dstats, norm, norm_dstats: as ``lean.backward``.
    epsilon: the gate BatchNorms' epsilon.
    interpret: run the kernels in Pallas' interpreter (CPU tests).
    parallel: the batch's mesh axes (the op's :class:`~atac_jax.ops.dispatch.Choice`): the
      kernels then run per device on its shard.
    axis_name: inside ``shard_map``/``pmap``, the axis over which batch statistics are global:
      the kernels take this device's sums, the BatchNorms' constants the whole batch's
      (``batch_norm.input_gradient_terms``); the parameter gradients are this device's part.

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
  up = _up_gradients(f, ku32, gram, input_sums, act_products.a_dz, count, dup,
                     bias=params.up.bias is not None, axis_name=axis_name)
  down = _down_gradients(f, up, bottleneck_sums, act_products, input_products, input_sums.xc,
                         count, ddown, axis_name)
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
