"""atac_jax.ops.pallas_gpu: the three-kernel GPU (Triton) backward, in Pallas' interpreter on
the CPU, and lowered to Triton IR (no GPU, no CUDA plugin needed).

Checked against the XLA lean backward (itself checked in float64 against the reference in
``test_ops.py``), against plain autodiff of the reference op and, in float64, against finite
differences. The kernels are called through a ``custom_vjp`` of the lean forward pass here, so
the tests do not depend on how the dispatch chooses them.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from jax.test_util import check_grads

from atac_jax.ops import Affine, GateStats, Moments, batch_norm, lean, pallas_gpu, reference
from atac_jax.ops.pallas_backward import DataParallel
from test_pallas_backward import _close, _params, backward_operands

EPS = 1e-5
NORM_EPS = 1e-3


@pytest.fixture
def small_tiles(monkeypatch):
  """Tiles small enough that tiny inputs take several programs, several row blocks a program
  and several channel chunks a block (the loops and the partial sums across them)."""
  monkeypatch.setattr(pallas_gpu, "TILE_ELEMENTS", 512)
  monkeypatch.setattr(pallas_gpu, "MIN_PROGRAMS", 2)


def _jit_backward(fn, x, params, stats, gram, dy, dstats, *, norm=None, norm_dstats=None,
                  **kwargs):
  """``fn`` (``pallas_gpu.backward``, or ``lean.backward`` with its ``cfg``) jitted: one
  compile instead of op-by-op dispatch around the interpreted kernels."""
  def run(x, params, stats, gram, dy, dstats, norm_arrays, norm_dstats):
    with_norm = {}
    if norm is not None:
      with_norm = {"norm": norm._replace(stats=norm_arrays[0], affine=norm_arrays[1]),
                   "norm_dstats": norm_dstats}
    return fn(x, params, stats, gram, dy, dstats, **with_norm, **kwargs)
  norm_arrays = None if norm is None else (norm.stats, norm.affine)
  return jax.jit(run)(x, params, stats, gram, dy, dstats, norm_arrays, norm_dstats)


def _affine(key, c):
  k1, k2 = jax.random.split(key)
  return Affine(1 + 0.1 * jax.random.normal(k1, (c,)), 0.2 * jax.random.normal(k2, (c,)))


def _kernel_op(fused: bool, axis_name=None, backward=None):
  """``reference.norm_gate`` (``fused``) or ``reference.gate`` in training mode: the lean
  forward pass, the backward through ``backward`` (default ``pallas_gpu.backward``; the TPU
  tests pass ``pallas_tpu.backward``) in the interpreter."""
  backward = pallas_gpu.backward if backward is None else backward
  cfg = lean.Config(EPS, True, axis_name=axis_name)

  def run(x, affine, params):
    norm = None
    if fused:
      norm = lean.InputNorm(batch_norm.moments(x, axis_name=axis_name), affine, NORM_EPS,
                            x.dtype, True, axis_name)
    y, stats, gram = lean.forward(x, params, None, cfg, norm=norm)
    return (y, None if norm is None else norm.stats, stats), (norm, gram)

  @jax.custom_vjp
  def op(x, affine, params):
    return run(x, affine, params)[0]

  def fwd(x, affine, params):
    out, (_, gram) = run(x, affine, params)
    return out, (x, affine, params, out[1], out[2], gram)

  def bwd(res, ct):
    x, affine, params, moments, stats, gram = res
    norm = None
    if fused:
      norm = lean.InputNorm(moments, affine, NORM_EPS, x.dtype, True, axis_name)
    dy, dmoments, dstats = ct
    dmoments, dstats = lean._whole_batch_cotangents((dmoments, dstats), x, axis_name)
    dx, dparams, daffine = backward(
        x, params, stats, gram, dy, dstats, epsilon=EPS, norm=norm, norm_dstats=dmoments,
        interpret=True, axis_name=axis_name)
    return dx, daffine if fused else jax.tree.map(jnp.zeros_like, affine), dparams

  op.defvjp(fwd, bwd)
  return op


def _reference_op(fused: bool, axis_name=None):
  def op(x, affine, params):
    if fused:
      return reference.norm_gate(x, affine, params, norm_epsilon=NORM_EPS, epsilon=EPS,
                                 inner_relu=True, dtype=x.dtype, axis_name=axis_name)
    y, stats = reference.gate(x, params, epsilon=EPS, inner_relu=True, axis_name=axis_name)
    return y, None, stats
  return op


def _loss(op, weights, x, affine, params):
  """A loss with cotangents flowing into every returned statistic."""
  y, moments, stats = op(x, affine, params)
  extra = 0.0 if moments is None else jnp.sum(moments.var) + jnp.sum(moments.mean ** 2)
  return (jnp.sum(y * weights) + jnp.sum(stats.down.var) + jnp.sum(stats.up.mean ** 2)
          + jnp.sum(jnp.sin(stats.down.mean)) + extra)


CASES = [  # shape, K, bias, fused, with_dstats, small_tiles
    ((8, 2, 4, 16), 4, True, False, True, False),  # K = 4 padded to 16
    ((4, 4, 4, 64), 16, False, True, False, False),
    ((4, 2, 2, 2, 64), 20, False, False, False, False),  # rank 5, K = 20 padded to 32
    ((16, 4, 4, 64), 4, True, True, True, True),  # 2 programs x 4 row blocks x 4 chunks
    ((8, 4, 4, 32), 20, True, False, True, True),  # 2 programs x 4 row blocks, K padded
]


@pytest.mark.parametrize("shape,k,bias,fused,with_dstats,tiles", CASES)
def test_matches_lean_backward(shape, k, bias, fused, with_dstats, tiles, request):
  if tiles:
    request.getfixturevalue("small_tiles")
  cfg, args, kwargs = backward_operands(sum(shape) + k + bias + 2 * fused, shape, k, bias=bias,
                                        fused=fused, with_dstats=with_dstats)
  want = _jit_backward(functools.partial(lean.backward, cfg=cfg, batch_stats=True), *args,
                       **kwargs)
  got = _jit_backward(pallas_gpu.backward, *args, epsilon=EPS, interpret=True, **kwargs)
  assert (got[2] is None) == (not fused)
  _close(got, want)


@pytest.mark.parametrize("fused", [False, True], ids=["gate", "norm_gate"])
def test_matches_plain_autodiff_of_the_reference(fused, small_tiles):
  """jax.grad of the reference op (no custom rule): input, every parameter, the fused
  BatchNorm's affine; several programs, row blocks and chunks."""
  shape = (16, 2, 4, 32)
  x = jax.random.normal(jax.random.PRNGKey(0), shape) * 2 + 1
  params = _params(jax.random.PRNGKey(1), 32, 4, bias=True)
  affine = _affine(jax.random.PRNGKey(2), 32)
  weights = jax.random.normal(jax.random.PRNGKey(3), shape)
  grads = lambda op: jax.jit(jax.grad(functools.partial(_loss, op, weights),
                                     argnums=(0, 1, 2)))(x, affine, params)
  got, want = grads(_kernel_op(fused)), grads(_reference_op(fused))
  if not fused:  # the affine is not an input of the unfused op
    got, want = (got[0], got[2]), (want[0], want[2])
  _close(got, want, rtol=1e-4)


def _representable(tree):
  """float32 values as float64: ``_fold`` (shared with the TPU kernels) rounds the parameters
  to float32, exactly for these."""
  return jax.tree.map(lambda a: a.astype(jnp.float32).astype(jnp.float64), tree)


@pytest.mark.parametrize("fused", [False, True], ids=["gate", "norm_gate"])
def test_float64_matches_lean_backward_and_finite_differences(fused, small_tiles):
  """In float64 (the interpreter computes in the input's dtype): the lean XLA backward to
  1e-10, and (the fused op, which takes every path of the unfused one) ``check_grads``: finite
  differences on the input, the affine and every parameter."""
  with jax.enable_x64(True):
    shape, c, k = (8, 2, 4, 32), 32, 4
    x = jax.random.normal(jax.random.PRNGKey(0), shape, jnp.float64) + 0.5
    dy = jax.random.normal(jax.random.PRNGKey(1), shape, jnp.float64)
    params = _representable(_params(jax.random.PRNGKey(2), c, k, bias=True))
    affine = _representable(_affine(jax.random.PRNGKey(3), c))
    norm = (lean.InputNorm(batch_norm.moments(x), affine, NORM_EPS, jnp.float64, True)
            if fused else None)
    cfg = lean.Config(EPS, True)
    _, stats, gram = lean.forward(x, params, None, cfg, norm=norm)
    kwargs = {"norm": norm, "norm_dstats": None} if fused else {}
    args = (x, params, stats, gram, dy, None)
    want = _jit_backward(functools.partial(lean.backward, cfg=cfg, batch_stats=True), *args,
                         **kwargs)
    got = _jit_backward(pallas_gpu.backward, *args, epsilon=EPS, interpret=True, **kwargs)
    assert got[0].dtype == jnp.float64
    _close(got, want, rtol=1e-10)
    if not fused:
      return
    weights = jnp.cos(jnp.arange(x.size, dtype=jnp.float64)).reshape(shape)
    loss = jax.jit(functools.partial(_loss, _kernel_op(fused), weights))
    check_grads(loss, (x, affine, params), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def bfloat16_errors(backward, fused: bool, shape=(16, 2, 4, 32), k: int = 8):
  """``backward`` (the kernels) on bfloat16 ``x``, ``dy`` and parameters, and the XLA backward
  in bfloat16: each one's largest gradient error relative to the float32 XLA backward on the
  same rounded values, ``(kernels, xla_bf16)``; also checks the kernels' output dtypes."""
  c = shape[-1]
  bf16, f32 = jnp.bfloat16, jnp.float32
  x = (jax.random.normal(jax.random.PRNGKey(0), shape) + 0.3).astype(bf16)
  dy = jax.random.normal(jax.random.PRNGKey(1), shape).astype(bf16)
  params = _params(jax.random.PRNGKey(2), c, k, bias=True)
  params = params._replace(down=jax.tree.map(lambda a: a.astype(bf16), params.down),
                           up=jax.tree.map(lambda a: a.astype(bf16), params.up))
  affine = _affine(jax.random.PRNGKey(3), c)

  def grads(fn, dtype, **kwargs):
    xx, pp = x.astype(dtype), jax.tree.map(lambda a: a.astype(dtype) if a.dtype == bf16 else a,
                                           params)
    norm, with_norm = None, {}
    if fused:
      norm = lean.InputNorm(batch_norm.moments(xx), affine, NORM_EPS, dtype, dtype == f32)
      with_norm = {"norm": norm, "norm_dstats": None}
    cfg = lean.Config(EPS, True)
    _, stats, gram = lean.forward(xx, pp, None, cfg, norm=norm)
    if fn is lean.backward:
      fn = functools.partial(fn, cfg=cfg, batch_stats=True)
    return _jit_backward(fn, xx, pp, stats, gram, dy.astype(dtype), None, **with_norm, **kwargs)

  def error(got, want):
    return max(float(np.max(np.abs(np.asarray(g, np.float32) - np.asarray(w, np.float32))))
               / max(float(np.max(np.abs(np.asarray(w, np.float32)))), 1.0)
               for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True))

  want = grads(lean.backward, f32)
  got = grads(backward, bf16, epsilon=EPS, interpret=True)
  assert got[0].dtype == bf16 and got[1].down.kernel.dtype == bf16
  return error(got, want), error(grads(lean.backward, bf16), want)


@pytest.mark.parametrize("fused", [False, True], ids=["gate", "norm_gate"])
def test_bfloat16_io_is_no_less_accurate_than_the_xla_backward(fused):
  """bfloat16 ``x``, ``dy`` and parameters: the kernels read and write bfloat16 and compute in
  float32, so their gradients are at least as close to the float32 backward's (on the same
  rounded values) as the XLA backward's in bfloat16."""
  kernels, xla_bf16 = bfloat16_errors(pallas_gpu.backward, fused)
  assert kernels <= min(xla_bf16, 1e-2)


def shard_map_gradients(op, shape, k: int):
  """Gradients of :func:`_loss` through ``op`` (made with ``axis_name="data"``) inside
  ``shard_map`` on 4 devices, the batch split: the input's, and the affine's and parameters'
  summed over the devices."""
  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:4])
  c = shape[-1]
  x = jax.random.normal(jax.random.PRNGKey(0), shape) + 0.2
  params = _params(jax.random.PRNGKey(1), c, k, bias=True)
  affine = _affine(jax.random.PRNGKey(2), c)
  weights = jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(shape)

  def per_device(x, affine, params, weights):
    dx, *rest = jax.grad(functools.partial(_loss, op, weights), argnums=(0, 1, 2))(
        x, affine, params)
    return dx, jax.lax.psum(tuple(rest), "data")
  return jax.jit(jax.shard_map(per_device, mesh=mesh,
                               in_specs=(P("data"), P(), P(), P("data")),
                               out_specs=(P("data"), P()), check_vma=False))(
                                   x, affine, params, weights)


@pytest.mark.parametrize("fused", [False, True], ids=["gate", "norm_gate"])
def test_axis_name_under_shard_map_matches_the_reference(fused):
  """``axis_name`` inside ``shard_map`` on 4 devices: the kernels sum this device's rows, the
  BatchNorms' constants take the whole batch's; gradients (the input's, the parameters'
  summed over the devices) equal plain autodiff of the reference op with the same
  ``axis_name``."""
  run = lambda op: shard_map_gradients(op, (16, 4, 2, 16), 4)  # 32 rows a device
  got, want = run(_kernel_op(fused, "data")), run(_reference_op(fused, "data"))
  if not fused:
    got, want = (got[0], got[1][1]), (want[0], want[1][1])
  _close(got, want, rtol=1e-4)


def test_parallel_runs_per_device_and_keeps_the_batch_split():
  """``parallel`` (a data-parallel step's batch axes): the kernels run per device under
  ``shard_map`` on its shard, their sums ``psum``-ed, ``dx`` stays split; same gradients as
  on one device."""
  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:4])
  shape = (16, 4, 4, 32)
  x = jax.random.normal(jax.random.PRNGKey(0), shape) + 0.2
  dy = jax.random.normal(jax.random.PRNGKey(1), shape)
  params = _params(jax.random.PRNGKey(2), 32, 8, bias=False)
  norm = lean.InputNorm(batch_norm.moments(x), _affine(jax.random.PRNGKey(3), 32), NORM_EPS,
                        jnp.float32, True)
  _, stats, gram = lean.forward(x, params, None, lean.Config(EPS, True), norm=norm)

  def backward(x, dy, parallel):
    return pallas_gpu.backward(x, params, stats, gram, dy, None, epsilon=EPS, norm=norm,
                               interpret=True, parallel=parallel)

  split = NamedSharding(mesh, P("data"))
  got = jax.jit(functools.partial(backward, parallel=DataParallel(mesh, ("data",))))(
      jax.device_put(x, split), jax.device_put(dy, split))
  assert got[0].sharding.spec == P("data")
  _close(got, jax.jit(functools.partial(backward, parallel=None))(x, dy))


def _shapes(c, k):
  """Parameters' shapes and dtypes (``supported`` reads no values)."""
  return jax.eval_shape(lambda: _params(jax.random.PRNGKey(0), c, k, bias=False))


def test_supported_reasons():
  params = _shapes(16, 4)
  ok = jnp.zeros((8, 2, 4, 16))
  assert pallas_gpu.supported(ok, params, inner_relu=True) is None
  assert "rank" in pallas_gpu.supported(jnp.zeros((64, 16)), params, inner_relu=True)
  assert pallas_gpu.supported(ok.astype(jnp.bfloat16), params, inner_relu=True) is None
  assert "float32 or bfloat16" in pallas_gpu.supported(ok.astype(jnp.float16), params,
                                                       inner_relu=True)
  assert "inner_relu" in pallas_gpu.supported(ok, params, inner_relu=False)
  odd = _shapes(24, 6)
  reason = pallas_gpu.supported(jnp.zeros((8, 2, 4, 24)), odd, inner_relu=True)
  assert reason == ("channels 24: the GPU kernels take a power of two >= 16 (Triton's tensor "
                    "sizes)")
  narrow = _shapes(8, 4)
  assert "power of two >= 16" in pallas_gpu.supported(jnp.zeros((8, 2, 4, 8)), narrow,
                                                      inner_relu=True)
  assert "multiple of 16" in pallas_gpu.supported(jnp.zeros((2, 3, 1, 16)), params,
                                                  inner_relu=True)  # 6 rows
  wide = _shapes(2048, 1024)
  assert "bottleneck 1024" in pallas_gpu.supported(jax.ShapeDtypeStruct((2, 2, 4, 2048),
                                                                        jnp.float32), wide,
                                                   inner_relu=True)
  mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
  assert "does not split" in pallas_gpu.supported(jnp.zeros((6, 4, 4, 16)), params,
                                                  inner_relu=True,
                                                  parallel=DataParallel(mesh, ("data",)))


@pytest.mark.parametrize("shape,k", [((128, 32, 32, 16), 4), ((128, 16, 16, 32), 8),
                                     ((128, 8, 8, 64), 16), ((256, 56, 56, 256), 16),
                                     ((256, 28, 28, 512), 32), ((256, 14, 14, 1024), 64),
                                     ((256, 7, 7, 2048), 128), ((64, 7, 7, 2048), 512)])
def test_geometry_of_the_resnet_stages(shape, k):
  """ResNet-20's and ResNet-50's units: tiles within TILE_ELEMENTS, Triton's shapes (powers of
  two >= 16), every row covered once, and at least MIN_PROGRAMS programs or ROWS_PER_PARTIAL
  K rows a program."""
  rows, c = np.prod(shape[:-1]), shape[-1]
  g = pallas_gpu.geometry(rows, c, k)
  for n in (g.bottleneck, g.row_block, g.chunk):
    assert n >= 16 and n & (n - 1) == 0
  assert g.bottleneck >= k and c % g.chunk == 0
  assert g.row_block * max(g.chunk, g.bottleneck) <= pallas_gpu.TILE_ELEMENTS
  assert g.chunk * g.bottleneck <= 2 * pallas_gpu.TILE_ELEMENTS
  assert g.programs * g.steps * g.row_block == rows
  rows_a_program = g.steps * g.row_block
  assert (g.programs >= pallas_gpu.MIN_PROGRAMS
          or rows_a_program >= pallas_gpu.ROWS_PER_PARTIAL * g.bottleneck)
  if rows_a_program > g.row_block:  # no more row blocks a program than the partials ask for
    assert (g.steps - 1) * g.row_block < pallas_gpu.ROWS_PER_PARTIAL * g.bottleneck


@pytest.mark.parametrize("shape,k,fused,tiles", [((8, 4, 4, 64), 4, True, True),
                                                 ((128, 32, 32, 16), 4, False, False),
                                                 ((256, 14, 14, 1024), 64, True, False)])
def test_kernels_lower_to_triton(shape, k, fused, tiles, request):
  """Pallas' Triton lowering (jaxlib's, no GPU or CUDA plugin needed) takes the three kernels:
  the loops, the barrier, the padded products, Triton's power-of-two shapes. (Compiling the IR
  for sm_80/sm_90 needs the CUDA plugin.)"""
  if tiles:
    request.getfixturevalue("small_tiles")
  c = shape[-1]
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  params = _shapes(c, k)
  vec = lambda n: jax.ShapeDtypeStruct((n,), jnp.float32)
  stats = GateStats(Moments(vec(k), vec(k)), Moments(vec(c), vec(c)))
  gram = lean.Gram(vec(k), jax.ShapeDtypeStruct((k, k), jnp.float32))
  norm = Affine(vec(c), vec(c)) if fused else None

  def backward(x, params, stats, gram, dy, affine, moments):
    norm = (lean.InputNorm(moments, affine, NORM_EPS, jnp.float32, True) if fused else None)
    return pallas_gpu.backward(x, params, stats, gram, dy, None, epsilon=EPS, norm=norm)

  text = jax.jit(backward).trace(x, params, stats, gram, x, norm, Moments(vec(c), vec(c))
                                 ).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 3


@pytest.mark.parametrize("gpu", ["a100", "h100"])  # sm_80, sm_90
def test_kernels_compile_deviceless_for_nvidia_gpus(gpu, monkeypatch):
  """XLA's GPU compiler (the CUDA plugin, no GPU needed) takes the kernels through Triton to
  PTX and SASS: the loops and barrier (small tiles) and the stage that needs the most shared
  memory (ResNet-50's last, ``C = 2048, K = 128``). Skipped without the plugin (CI)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  if (importlib.util.find_spec("jax_plugins") is None
      or importlib.util.find_spec("jax_plugins.xla_cuda12") is None):
    pytest.skip("the CUDA plugin is not installed (pip install -e '.[gpu-aot]')")
  from atac_train import aot  # pylint: disable=g-import-not-at-top
  (device,) = aot.topology_devices(aot.parse_topology(f"{gpu}:1"))
  on_gpu = jax.sharding.SingleDeviceSharding(device)
  for shape, k, tile in [((8, 4, 4, 64), 4, 512), ((256, 7, 7, 2048), 128, None)]:
    if tile:
      monkeypatch.setattr(pallas_gpu, "TILE_ELEMENTS", tile)
      monkeypatch.setattr(pallas_gpu, "MIN_PROGRAMS", 2)
    else:
      monkeypatch.undo()
    c = shape[-1]
    s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=on_gpu)
    params = jax.tree.map(lambda a: s(*a.shape), _shapes(c, k))
    stats = GateStats(Moments(s(k), s(k)), Moments(s(c), s(c)))

    def backward(x, params, stats, gram, dy, moments, affine):
      norm = lean.InputNorm(moments, affine, NORM_EPS, jnp.float32, True)
      return pallas_gpu.backward(x, params, stats, gram, dy, None, epsilon=EPS, norm=norm)

    compiled = jax.jit(backward).lower(s(*shape), params, stats, lean.Gram(s(k), s(k, k)),
                                      s(*shape), Moments(s(c), s(c)),
                                      Affine(s(c), s(c))).compile()
    assert compiled.as_text().count("__gpu$xla.gpu.triton") == 3
