"""atac_jax.ops.pallas_tpu: the TPU's choice of kernels, and the three-pass row kernels
(:mod:`atac_jax.ops.pallas_rows`) with TPU tiles, in Pallas' interpreter on the CPU; compiled
by Mosaic for v5e where libtpu is installed (the ``tpu-aot`` extra).

Checked against the XLA lean backward (itself checked in float64 against the reference in
``test_ops.py``), against plain autodiff of the reference op and in float64. The row kernels
run where the two-pass kernels refuse: units wider than their on-chip budget, and bfloat16.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from atac_jax.ops import GateStats, Moments, batch_norm, lean, pallas_backward, pallas_tpu
from atac_jax.ops.pallas_backward import DataParallel
from atac_jax.ops.pallas_tiles import VMEM_BUDGET
from test_pallas_backward import _close, _params, backward_operands
from test_pallas_gpu import (EPS, NORM_EPS, _affine, _jit_backward, _kernel_op, _loss,
                             _reference_op, _shapes, bfloat16_errors, shard_map_gradients)


@pytest.fixture
def small_blocks(monkeypatch):
  """Row blocks of at most 16 rows: tiny inputs take several grid steps (the sums accumulate
  across them)."""
  monkeypatch.setattr(pallas_tpu, "MAX_ROW_BLOCK", 16)


CASES = [  # shape, K, bias, fused, with_dstats: every one too wide for the two-pass kernels
    ((16, 2, 2, 256), 128, True, False, True),
    ((8, 2, 4, 128), 64, False, True, False),
    ((8, 2, 2, 2, 128), 96, True, True, True),  # rank 5
]


@pytest.mark.parametrize("shape,k,bias,fused,with_dstats", CASES)
def test_row_kernels_match_lean_backward(shape, k, bias, fused, with_dstats, small_blocks):
  cfg, args, kwargs = backward_operands(sum(shape) + k + bias + 2 * fused, shape, k, bias=bias,
                                        fused=fused, with_dstats=with_dstats)
  x, params = args[0], args[1]
  assert "on-chip memory" in pallas_backward.supported(x, params, inner_relu=True)
  assert pallas_tpu.row_geometry(x.size // shape[-1], shape[-1], k, x.dtype).programs > 1
  want = _jit_backward(functools.partial(lean.backward, cfg=cfg, batch_stats=True), *args,
                       **kwargs)
  got = _jit_backward(pallas_tpu.backward, *args, epsilon=EPS, interpret=True, **kwargs)
  assert (got[2] is None) == (not fused)
  _close(got, want)


def test_row_kernels_match_plain_autodiff_of_the_reference(small_blocks):
  """jax.grad of the reference op (no custom rule): input, every parameter, the fused
  BatchNorm's affine, over several grid steps."""
  shape, c, k = (8, 2, 2, 256), 256, 128
  x = jax.random.normal(jax.random.PRNGKey(0), shape) * 2 + 1
  params = _params(jax.random.PRNGKey(1), c, k, bias=True)
  affine = _affine(jax.random.PRNGKey(2), c)
  weights = jax.random.normal(jax.random.PRNGKey(3), shape)
  grads = lambda op: jax.jit(jax.grad(functools.partial(_loss, op, weights),
                                     argnums=(0, 1, 2)))(x, affine, params)
  _close(grads(_kernel_op(True, backward=pallas_tpu.backward)), grads(_reference_op(True)),
         rtol=1e-4)


def test_row_kernels_in_float64_match_lean_backward(small_blocks):
  """In float64 (the interpreter computes in the input's dtype) to 1e-10: no approximation
  anywhere in the three passes or the host-side math between them."""
  with jax.enable_x64(True):
    shape, c, k = (8, 2, 2, 128), 128, 64
    x = jax.random.normal(jax.random.PRNGKey(0), shape, jnp.float64) + 0.5
    dy = jax.random.normal(jax.random.PRNGKey(1), shape, jnp.float64)
    params = jax.tree.map(lambda a: a.astype(jnp.float32).astype(jnp.float64),
                          _params(jax.random.PRNGKey(2), c, k, bias=True))
    affine = jax.tree.map(lambda a: a.astype(jnp.float32).astype(jnp.float64),
                          _affine(jax.random.PRNGKey(3), c))
    norm = lean.InputNorm(batch_norm.moments(x), affine, NORM_EPS, jnp.float64, True)
    cfg = lean.Config(EPS, True)
    _, stats, gram = lean.forward(x, params, None, cfg, norm=norm)
    args = (x, params, stats, gram, dy, None)
    want = _jit_backward(functools.partial(lean.backward, cfg=cfg, batch_stats=True), *args,
                         norm=norm, norm_dstats=None)
    got = _jit_backward(pallas_tpu.backward, *args, epsilon=EPS, interpret=True, norm=norm,
                        norm_dstats=None)
    assert got[0].dtype == jnp.float64
    _close(got, want, rtol=1e-10)


def test_bfloat16_takes_the_row_kernels_as_accurately_as_the_xla_backward():
  """bfloat16 ``x``, ``dy`` and parameters (the two-pass kernels are float32 only): the row
  kernels read and write bfloat16, multiply bfloat16 operands as XLA's backward does except in
  the down-projection (float32: it decides the mask), and compute the rest in float32, so
  their gradients are at least as close to the float32 backward's (on the same rounded values)
  as the XLA backward's in bfloat16 (measured: 10-25x closer on the fused unit)."""
  shape, k = (16, 2, 4, 128), 64
  x = jnp.zeros(shape, jnp.bfloat16)
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16), _shapes(128, k))
  assert "float32 only" in pallas_backward.supported(x, params, inner_relu=True)
  assert pallas_tpu.supported(x, params, inner_relu=True) is None
  kernels, xla_bf16 = bfloat16_errors(pallas_tpu.backward, True, shape, k)
  assert kernels <= min(xla_bf16, 1e-2), (kernels, xla_bf16)


def test_axis_name_under_shard_map_matches_the_reference():
  """``axis_name`` inside ``shard_map`` on 4 devices: the row kernels sum this device's rows,
  the BatchNorms' constants take the whole batch's; gradients equal plain autodiff of the
  reference op with the same ``axis_name``."""
  run = lambda op: shard_map_gradients(op, (32, 2, 2, 128), 64)  # 8 images a device
  _close(run(_kernel_op(True, "data", pallas_tpu.backward)), run(_reference_op(True, "data")),
         rtol=1e-4)


def test_parallel_runs_per_device_and_keeps_the_batch_split(small_blocks):
  """``parallel``: the row kernels run per device on its shard of the ``(positions, N, C)``
  rows (the batch on axis 1), their sums ``psum``-ed; ``dx`` stays split; same gradients as on
  one device."""
  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:4])
  shape, c, k = (32, 2, 2, 256), 256, 128
  x = jax.random.normal(jax.random.PRNGKey(0), shape) + 0.2
  dy = jax.random.normal(jax.random.PRNGKey(1), shape)
  params = _params(jax.random.PRNGKey(2), c, k, bias=False)
  norm = lean.InputNorm(batch_norm.moments(x), _affine(jax.random.PRNGKey(3), c), NORM_EPS,
                        jnp.float32, True)
  _, stats, gram = lean.forward(x, params, None, lean.Config(EPS, True), norm=norm)
  parallel = DataParallel(mesh, ("data",))
  assert pallas_backward.supported(x, params, inner_relu=True, parallel=parallel) is not None

  def backward(x, dy, parallel):
    return pallas_tpu.backward(x, params, stats, gram, dy, None, epsilon=EPS, norm=norm,
                               interpret=True, parallel=parallel)

  split = NamedSharding(mesh, P("data"))
  got = jax.jit(functools.partial(backward, parallel=parallel))(
      jax.device_put(x, split), jax.device_put(dy, split))
  assert got[0].sharding.spec == P("data")
  _close(got, jax.jit(functools.partial(backward, parallel=None))(x, dy))


def test_supported_reasons():
  """The two-pass kernels first, the row kernels (bfloat16) where those refuse; both reasons
  where neither applies."""
  narrow = _shapes(16, 8)
  assert pallas_tpu.supported(jnp.zeros((32, 4, 4, 16)), narrow, inner_relu=True) is None
  bf16 = lambda p: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16), p)
  wide = bf16(_shapes(512, 256))
  x = jax.ShapeDtypeStruct((64, 7, 7, 512), jnp.bfloat16)
  assert pallas_tpu.supported(x, wide, inner_relu=True) is None
  reason = pallas_tpu.supported(jax.ShapeDtypeStruct(x.shape, jnp.float32), _shapes(512, 256),
                                inner_relu=True)  # float32 and too wide for the two-pass kernels
  assert "on-chip memory" in reason and "row kernels take bfloat16" in reason
  # ResNet-20's first stage in bfloat16: 16 channels lie batch-minor beside a batch of 32
  reason = pallas_tpu.supported(jnp.zeros((32, 4, 4, 16), jnp.bfloat16), bf16(narrow),
                                inner_relu=True)
  assert "float32 only" in reason and "batch-minor" in reason
  reason = pallas_tpu.supported(jnp.zeros((8, 2, 2, 128), jnp.bfloat16), bf16(_shapes(128, 64)),
                                inner_relu=True)
  assert "batch 8 a device is not a multiple of 16" in reason
  assert "rank" in pallas_tpu.supported(jnp.zeros((64, 512)), wide, inner_relu=True)
  assert "inner_relu" in pallas_tpu.supported(x, wide, inner_relu=False)
  assert "take bfloat16" in pallas_tpu.supported(
      jax.ShapeDtypeStruct((64, 7, 7, 512), jnp.float16), wide, inner_relu=True)
  huge = bf16(_shapes(8192, 8192))  # the kernels alone exceed the budget
  assert "a row block needs" in pallas_tpu.supported(
      jax.ShapeDtypeStruct((16, 2, 2, 8192), jnp.bfloat16), huge, inner_relu=True)
  mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
  assert "does not split" in pallas_tpu.supported(
      jax.ShapeDtypeStruct((6, 7, 7, 512), jnp.bfloat16), wide, inner_relu=True,
      parallel=DataParallel(mesh, ("data",)))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("shape,k", [((64, 56, 56, 64), 32), ((64, 28, 28, 128), 64),
                                     ((64, 14, 14, 256), 128), ((64, 28, 28, 256), 128),
                                     ((64, 7, 7, 512), 256), ((64, 14, 14, 512), 256)])
def test_row_geometry_of_resnet50_units(shape, k, dtype):
  """ResNet-50's units (``reduction=2``, 64 images a chip as in the v5e:2x2 figures) fit the
  row kernels in either dtype (float32: the tests' interpreter runs): a row block that divides
  the rows, is whole tiles of the dtype and fits the on-chip budget; the declared limit covers
  twice the estimate; bfloat16 products only where asked (a bfloat16 input and kernels)."""
  rows, c = int(np.prod(shape[:-1])), shape[-1]
  g = pallas_tpu.row_geometry(rows, c, k, dtype)
  unit = 16 if dtype == jnp.bfloat16 else 8
  assert g.tiled and g.steps == 1 and g.chunk == c and g.bottleneck == k
  assert g.row_block % unit == 0 and g.programs * g.row_block == rows
  assert pallas_tpu.row_vmem_bytes(g.row_block, c, k, dtype) <= VMEM_BUDGET
  assert g.vmem_limit >= 2 * pallas_tpu.row_vmem_bytes(g.row_block, c, k, dtype)
  assert g.mxu_dtype is None and g.precision == jax.lax.Precision.HIGHEST
  low = pallas_tpu.row_geometry(rows, c, k, dtype, bf16_products=True)
  assert low.mxu_dtype == jnp.bfloat16 and low.precision == jax.lax.Precision.DEFAULT


def test_mosaic_compiles_the_row_kernels_for_v5e():
  """Mosaic (libtpu's compiler, no TPU needed) compiles the three row kernels at ResNet-50's
  widest unit in bfloat16 and float32, and at a batch split over 4 chips (libtpu only)."""
  pytest.importorskip("libtpu")
  from atac_train import aot  # pylint: disable=g-import-not-at-top
  devices = aot.topology_devices(aot.parse_topology("v5e:2x2"))
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  for dtype, shape, k in [(jnp.bfloat16, (256, 7, 7, 512), 256),
                          (jnp.float32, (64, 14, 14, 256), 128)]:
    c = shape[-1]
    split, whole = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    s = lambda *shape, dt=jnp.float32, sh=whole: jax.ShapeDtypeStruct(shape, dt, sharding=sh)
    params = jax.tree.map(lambda a: s(*a.shape, dt=dtype if a.ndim == 2 else jnp.float32),
                          _shapes(c, k))
    stats = GateStats(Moments(s(k), s(k)), Moments(s(c), s(c)))

    def backward(x, params, stats, gram, dy):
      return pallas_tpu.backward(x, params, stats, gram, dy, None, epsilon=EPS,
                                 parallel=DataParallel(mesh, ("data",)))

    x = s(*shape, dt=dtype, sh=split)
    compiled = jax.jit(backward).lower(x, params, stats, lean.Gram(s(k), s(k, k)), x).compile()
    assert compiled.as_text().count("tpu_custom_call") >= 3
