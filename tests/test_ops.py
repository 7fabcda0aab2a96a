"""atac_jax.ops: each implementation against the reference, in float64, and the policy."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from atac_jax import ops
from atac_jax.ops import Affine, GateParams, GateStats, Moments, Projection
from conftest import batch_on_one_device

C, K = 6, 3
EPS = 1e-5


@pytest.fixture(autouse=True)
def float64():
  with jax.enable_x64(True):
    yield


def _params(key, *, bias: bool):
  k = jax.random.split(key, 8)
  f = jnp.float64
  return GateParams(
      Projection(jax.random.normal(k[0], (C, K), f), jax.random.normal(k[1], (K,), f) if bias
                 else None),
      Affine(1 + 0.2 * jax.random.normal(k[2], (K,), f), 0.2 * jax.random.normal(k[3], (K,), f)),
      Projection(jax.random.normal(k[4], (K, C), f), jax.random.normal(k[5], (C,), f) if bias
                 else None),
      Affine(1 + 0.2 * jax.random.normal(k[6], (C,), f), 0.2 * jax.random.normal(k[7], (C,), f)))


def _x(shape=(4, 5, C), offset=0.5):
  return jax.random.normal(jax.random.PRNGKey(1), shape, jnp.float64) + offset


def _numpy_gate(x, p, inner_relu=True):
  """An independent NumPy formula of the training-mode gate."""
  x = np.asarray(x).reshape(-1, C)

  def bn(h, affine):
    m, v = h.mean(0), h.var(0)
    return (h - m) / np.sqrt(v + EPS) * np.asarray(affine.scale) + np.asarray(affine.bias)

  h = x @ np.asarray(p.down.kernel) + (0 if p.down.bias is None else np.asarray(p.down.bias))
  a = bn(h, p.norm_down)
  a = np.maximum(a, 0) if inner_relu else a
  u = a @ np.asarray(p.up.kernel) + (0 if p.up.bias is None else np.asarray(p.up.bias))
  return x / (1 + np.exp(-bn(u, p.norm_up)))


@pytest.mark.parametrize("impl", ["reference", "lean"])
@pytest.mark.parametrize("inner_relu", [True, False])
def test_train_gate_matches_numpy(impl, inner_relu):
  p, x = _params(jax.random.PRNGKey(0), bias=True), _x()
  y, stats = ops.gate(x, p, epsilon=EPS, inner_relu=inner_relu, impl=impl)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, C), _numpy_gate(x, p, inner_relu),
                             rtol=1e-10, atol=1e-12)
  h = np.asarray(x).reshape(-1, C) @ np.asarray(p.down.kernel) + np.asarray(p.down.bias)
  np.testing.assert_allclose(stats.down.mean, h.mean(0), rtol=1e-10)
  np.testing.assert_allclose(stats.down.var, h.var(0), rtol=1e-8)


@pytest.mark.parametrize("shape", [(7, C), (3, 4, C), (2, 3, 4, C), (2, 2, 3, 2, C)])
@pytest.mark.parametrize("bias", [False, True])
def test_lean_gradients_check_in_float64(shape, bias):
  p, x = _params(jax.random.PRNGKey(2), bias=bias), _x(shape)
  train = lambda x, p: ops.gate(x, p, epsilon=EPS, inner_relu=True, impl="lean")
  check_grads(train, (x, p), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)
  running = GateStats(Moments(jnp.full((K,), 0.3), jnp.full((K,), 2.0)),
                      Moments(jnp.full((C,), -0.1), jnp.full((C,), 0.5)))
  infer = lambda x, p, s: ops.lean.gate(x, p, s, epsilon=EPS, inner_relu=True)
  check_grads(infer, (x, p, running), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


def test_reference_gradients_check_in_float64_all_modes():
  p, x = _params(jax.random.PRNGKey(3), bias=False), _x()
  fn = lambda x, p: ops.gate(x, p, epsilon=EPS, inner_relu=True, impl="reference")
  check_grads(fn, (x, p), order=2, modes=["fwd", "rev"], atol=1e-5, rtol=1e-5)


def _cotangent_cases():
  """Every combination of zero / non-zero output and statistics cotangents."""
  return list(itertools.product([False, True], repeat=3))


@pytest.mark.parametrize("use_y,use_down,use_up", _cotangent_cases())
def test_lean_vjp_with_symbolic_zero_cotangents(use_y, use_down, use_up):
  p, x = _params(jax.random.PRNGKey(4), bias=True), _x()

  def loss(impl):
    def fn(x, p):
      y, s = ops.gate(x, p, epsilon=EPS, inner_relu=True, impl=impl)
      total = jnp.zeros(())
      if use_y:
        total += jnp.sum(y * jnp.arange(C))
      if use_down:
        total += jnp.sum(s.down.mean * 2.0) + jnp.sum(jnp.sin(s.down.var))
      if use_up:
        total += jnp.sum(s.up.var ** 2) - jnp.sum(s.up.mean)
      return total
    return fn

  expected = jax.grad(loss("reference"), (0, 1))(x, p)
  got = jax.grad(loss("lean"), (0, 1))(x, p)
  chex.assert_trees_all_close(got, expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("impl", ["reference", "lean"])
@pytest.mark.parametrize("fold", [True, False])
def test_norm_gate_equals_batch_norm_then_gate(impl, fold, monkeypatch):
  monkeypatch.setitem(ops.policy._CHOICES, "fold_norm", {"default": fold})
  p, x = _params(jax.random.PRNGKey(5), bias=False), _x(offset=3.0)
  norm = Affine(jnp.linspace(0.5, 1.5, C), jnp.linspace(-0.2, 0.2, C))

  def fused(x, norm, p):
    y, m, s = ops.norm_gate(x, norm, p, norm_epsilon=1e-3, epsilon=EPS, inner_relu=True,
                            dtype=jnp.float64, impl=impl)
    return jnp.sum(y * jnp.arange(C)) + jnp.sum(m.var) + jnp.sum(s.up.mean ** 2)

  def composed(x, norm, p):
    m = ops.batch_norm.moments(x, plain=True)
    xn = ops.batch_norm.normalize(x, m, norm, epsilon=1e-3, dtype=jnp.float64)
    y, s = ops.reference.gate(xn, p, epsilon=EPS, inner_relu=True)
    return jnp.sum(y * jnp.arange(C)) + jnp.sum(m.var) + jnp.sum(s.up.mean ** 2)

  chex.assert_trees_all_close(fused(x, norm, p), composed(x, norm, p), rtol=1e-10)
  _, _, stats = ops.norm_gate(x, norm, p, norm_epsilon=1e-3, epsilon=EPS, inner_relu=True,
                              dtype=jnp.float64, impl=impl)
  xn = ops.batch_norm.normalize(x, ops.batch_norm.moments(x, plain=True), norm, epsilon=1e-3,
                                dtype=jnp.float64)
  h = np.asarray(xn).reshape(-1, C) @ np.asarray(p.down.kernel)  # every statistic, from NumPy
  np.testing.assert_allclose(stats.down.mean, h.mean(0), rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(stats.down.var, h.var(0), rtol=1e-9)
  chex.assert_trees_all_close(stats.up, ops.reference.gate(xn, p, epsilon=EPS,
                                                           inner_relu=True)[1].up, rtol=1e-9)
  chex.assert_trees_all_close(jax.grad(fused, (0, 1, 2))(x, norm, p),
                              jax.grad(composed, (0, 1, 2))(x, norm, p), rtol=1e-8, atol=1e-10)
  if impl == "lean":
    fn = lambda x, norm, p: ops.norm_gate(x, norm, p, norm_epsilon=1e-3, epsilon=EPS,
                                          inner_relu=True, dtype=jnp.float64, impl="lean")
    check_grads(fn, (x, norm, p), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_sigmoid_tail_does_not_underflow():
  """The lean backward's gate is the accurate sigmoid: d/dx at z = -20 is ~2e-9, not 0."""
  with jax.enable_x64(False):
    p = _params(jax.random.PRNGKey(6), bias=False)
    p = jax.tree.map(lambda a: a.astype(jnp.float32), p)
    p = p._replace(norm_up=Affine(jnp.zeros(C), jnp.full((C,), -20.0)))
    x = jax.random.normal(jax.random.PRNGKey(7), (16, C))
    dx = jax.grad(lambda x: jnp.sum(ops.gate(x, p, epsilon=EPS, inner_relu=True,
                                              impl="lean")[0]))(x)
    np.testing.assert_allclose(dx, jax.nn.sigmoid(-20.0) * np.ones_like(dx), rtol=1e-3)


def _kernel_operands():
  """A float32 input and parameters the Pallas kernels apply to (channels multiples of 8)."""
  f = jnp.float32
  params = GateParams(Projection(jnp.ones((16, 8), f)), Affine(jnp.ones(8, f), jnp.zeros(8, f)),
                      Projection(jnp.ones((8, 16), f)), Affine(jnp.ones(16, f), jnp.zeros(16, f)))
  return jnp.zeros((8, 4, 4, 16), f), params


def test_module_backward_kernel_auto_is_pallas_on_tpu_where_the_split_is_known(monkeypatch):
  """TPU and GPU: the kernels under 'auto' on one device or under a data_parallel declaration;
  with several devices and none (the kernels would see the whole batch) the XLA backward; CPU:
  the XLA backward. GPU: where the Triton kernels apply (channels a power of two)."""
  x, params = _kernel_operands()
  module = lambda memory_lean=True, kernel="auto": ops.Request.from_module(
      memory_lean=memory_lean, backward_kernel=kernel)
  backward = lambda request=module(): ops.choose(request, train=True, x=x,
                                                 params=params).backward
  with ops.policy.lowering_platform("tpu"):
    assert ops.policy.choice("backward_kernel") == "pallas"
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    assert backward() is ops.Backward.PALLAS
    monkeypatch.setattr(jax, "device_count", lambda: 4)
    assert backward() is ops.Backward.XLA
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    with ops.pallas_backward.data_parallel(mesh, ("data",)):
      assert backward() is ops.Backward.PALLAS
    assert backward(module(kernel="xla")) is ops.Backward.XLA
    assert backward(module(memory_lean=False)) is ops.Backward.REFERENCE
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  with ops.policy.lowering_platform("cpu"):
    assert backward() is ops.Backward.XLA
  with ops.policy.lowering_platform("gpu"):
    assert ops.policy.choice("backward_kernel") == "pallas"
    assert backward() is ops.Backward.PALLAS and ops.choose(
        module(), train=True, x=x, params=params).reason.startswith("13: gpu kernels")
    wide = jnp.zeros((8, 4, 4, 24), jnp.float32)  # 24 channels: not a power of two
    wide_params = jax.tree.map(lambda a: jnp.ones(tuple(24 if d == 16 else d for d in a.shape),
                                                  jnp.float32),
                               params)
    refused = ops.choose(module(), train=True, x=wide, params=wide_params)
    assert refused.backward is ops.Backward.XLA and "power of two" in refused.reason


def test_choose_and_policy():
  x, params = _kernel_operands()
  impl = ops.Request.from_impl
  module = lambda memory_lean, kernel: ops.Request.from_module(memory_lean=memory_lean,
                                                               backward_kernel=kernel)
  backward = lambda request, train=True, axis_name=None: ops.choose(
      request, train=train, axis_name=axis_name, x=x, params=params).backward
  assert backward(impl("auto")) is ops.Backward.XLA and ops.policy.choice("gate_impl") == "lean"
  assert backward(impl("auto"), train=False) is ops.Backward.REFERENCE
  assert backward(impl("auto"), axis_name="d") is ops.Backward.XLA  # the lean op takes it
  with pytest.raises(ValueError, match=r"accepted: \['auto', 'lean', 'pallas', 'reference'\]"):
    impl("fast")
  assert backward(impl("pallas")) is ops.Backward.PALLAS
  assert backward(impl("pallas"), train=False) is ops.Backward.REFERENCE  # nothing kept
  assert backward(impl("lean"), train=False) is ops.Backward.XLA  # the lean op, running stats
  with ops.policy.lowering_platform("cpu"):  # policy: xla
    assert backward(module(True, "auto")) is ops.Backward.XLA
  assert backward(module(True, "pallas")) is ops.Backward.PALLAS
  assert backward(module(False, "pallas")) is ops.Backward.REFERENCE
  # cross-device statistics: the lean op and the kernels take them (their sums psum-ed)
  assert backward(module(True, "pallas"), axis_name="b") is ops.Backward.PALLAS
  assert backward(impl("lean"), axis_name="d") is ops.Backward.XLA
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
  with ops.pallas_backward.data_parallel(mesh, ("data",)):  # a declared split and an axis: no
    assert backward(module(True, "pallas"), axis_name="b") is ops.Backward.XLA
  with pytest.raises(ValueError, match="backward_kernel"):
    module(True, "cuda")
  # each choice names the table row that decided it
  assert ops.choose(impl("auto"), train=False).reason.startswith("4:")
  with ops.policy.lowering_platform("tpu"):
    assert ops.policy.platform() == "tpu"
    assert ops.policy.choice("colsum") == "reduce" and ops.policy.choice("tie") == "barrier"
    assert ops.policy.choice("contraction") == "conv" and ops.policy.choice("materialize_dz")
  assert ops.policy.platform() == jax.default_backend()
  with pytest.raises(ValueError, match="accepted"):
    with ops.policy.lowering_platform("npu"):
      pass


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
@pytest.mark.parametrize("shape", [(4, 5, C), (2, 3, 4, C)])
def test_policy_choices_give_equal_results(platform, shape):
  p, x = _params(jax.random.PRNGKey(8), bias=True), _x(shape)
  loss = lambda x, p: jnp.sum(ops.gate(x, p, epsilon=EPS, inner_relu=True, impl="lean")[0] ** 2)
  with ops.policy.lowering_platform(platform):
    got = jax.grad(loss, (0, 1))(x, p)
  ref = jax.grad(lambda x, p: jnp.sum(ops.reference.gate(x, p, epsilon=EPS,
                                                          inner_relu=True)[0] ** 2), (0, 1))(x, p)
  chex.assert_trees_all_close(got, ref, rtol=1e-9, atol=1e-10)
  norm = Affine(jnp.linspace(0.5, 1.5, C), jnp.linspace(-0.2, 0.2, C))
  fused = lambda x, norm, p: ops.norm_gate(x, norm, p, norm_epsilon=1e-3, epsilon=EPS,
                                           inner_relu=True, dtype=jnp.float64, impl="lean")
  with ops.policy.lowering_platform(platform):
    check_grads(fused, (x, norm, p), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_tie_mode_follows_where_the_batch_lies(monkeypatch):
  """CPU: the scalar tie where the batch lies on one device, else element-wise zeros (no
  collective); TPU and GPU: the optimisation barrier. Resolved when the op is traced."""
  config = lambda: ops.choose(ops.Request("lean", "xla"), train=True).tie
  assert jax.device_count() == 8 and config() == "zeros"  # undeclared, several devices
  with batch_on_one_device():
    assert config() == "scalar"
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
  with ops.pallas_backward.data_parallel(mesh, ("data",)):
    assert not ops.dispatch.where_batch_lies().on_one_device and config() == "zeros"
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  assert ops.dispatch.where_batch_lies().on_one_device and config() == "scalar"
  for platform in ("tpu", "gpu"):
    with ops.policy.lowering_platform(platform):
      assert config() == "barrier"


@pytest.mark.parametrize("tie", ["barrier", "scalar", "zeros"])  # lean._tie's modes
def test_lean_gradients_equal_under_each_tie(tie, monkeypatch):
  """Each tie only orders the computation: the same gradients as plain autodiff of the
  reference, for the gate in training and inference and for the fused BatchNorm."""
  one_device = tie == "scalar"
  if not one_device:
    monkeypatch.setitem(ops.policy._CHOICES["tie"], "cpu", tie)
  p, x = _params(jax.random.PRNGKey(11), bias=True), _x((2, 3, 4, C))
  norm = Affine(jnp.linspace(0.5, 1.5, C), jnp.linspace(-0.2, 0.2, C))
  running = GateStats(Moments(jnp.full((K,), 0.3), jnp.full((K,), 2.0)),
                      Moments(jnp.full((C,), -0.1), jnp.full((C,), 0.5)))
  weights = jnp.cos(jnp.arange(x.size, dtype=x.dtype)).reshape(x.shape)

  def losses(impl):
    def train(x, p):
      return jnp.sum(ops.gate(x, p, epsilon=EPS, inner_relu=True, impl=impl)[0] * weights)

    def infer(x, p):
      gate = ops.lean.gate if impl == "lean" else ops.reference.gate
      return jnp.sum(gate(x, p, running, epsilon=EPS, inner_relu=True) * weights)

    def fused(x, norm, p):
      y, m, _ = ops.norm_gate(x, norm, p, norm_epsilon=1e-3, epsilon=EPS, inner_relu=True,
                              dtype=jnp.float64, impl=impl)
      return jnp.sum(y * weights) + jnp.sum(m.var)
    return train, infer, fused

  args = ((x, p), (x, p), (x, norm, p))
  with batch_on_one_device(one_device):
    assert ops.choose(ops.Request("lean", "xla"), train=True).tie == tie
    got = [jax.grad(f, tuple(range(len(a))))(*a) for f, a in zip(losses("lean"), args)]
    check_grads(losses("lean")[2], args[2], order=1, modes=["rev"], atol=1e-6, rtol=1e-6)
  want = [jax.grad(f, tuple(range(len(a))))(*a) for f, a in zip(losses("reference"), args)]
  chex.assert_trees_all_close(got, want, rtol=1e-9, atol=1e-10)


def test_opaque_zero_is_zero_for_every_first_element():
  for first in (2.5, -0.0, np.inf, -np.inf, np.nan):
    a = jnp.array([first, 1.0, 2.0], jnp.float32)
    zero = jax.jit(ops.reductions.opaque_zero)(a)
    assert zero.dtype == jnp.float32 and zero.shape == () and float(zero) == 0.0
  # Not folded to a constant: the compiled function still reads the array.
  text = jax.jit(ops.reductions.opaque_zero).lower(jnp.ones((4, 3))).compile().as_text()
  assert "is-finite" in text


def test_contraction_forms_promote_mixed_dtypes_as_dot():
  x = _x((2, 3, 4, C)).astype(jnp.bfloat16)
  b = jax.random.normal(jax.random.PRNGKey(3), (2, 3, 4, K), jnp.float32)
  kernel = jax.random.normal(jax.random.PRNGKey(4), (C, K), jnp.float32)
  dot = ops.reductions.pointwise(x, kernel), ops.reductions.tdot(x, b)
  with ops.policy.lowering_platform("tpu"):
    conv = ops.reductions.pointwise(x, kernel), ops.reductions.tdot(x, b)
  chex.assert_trees_all_equal_dtypes(conv, dot)
  chex.assert_trees_all_close(conv, dot, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(7, C), (3, 4, C), (2, 3, 4, C), (2, 2, 3, 2, C)])
@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_contraction_forms_match_numpy(shape, platform):
  x = _x(shape)
  b = jax.random.normal(jax.random.PRNGKey(3), shape[:-1] + (K,), jnp.float64)
  kernel = jax.random.normal(jax.random.PRNGKey(4), (C, K), jnp.float64)
  with ops.policy.lowering_platform(platform):  # tpu: 1x1 convolutions for rank >= 3
    product, gram = ops.reductions.pointwise(x, kernel), ops.reductions.tdot(x, b)
  rows_x, rows_b = np.asarray(x).reshape(-1, C), np.asarray(b).reshape(-1, K)
  np.testing.assert_allclose(np.asarray(product).reshape(-1, K), rows_x @ np.asarray(kernel),
                             rtol=1e-12, atol=1e-12)
  assert product.shape == shape[:-1] + (K,)
  np.testing.assert_allclose(gram, rows_x.T @ rows_b, rtol=1e-12, atol=1e-12)
  with ops.policy.lowering_platform(platform):
    total, square = ops.reductions.gram(x)
    products = ops.reductions.sum_product(x, 2 * x + 1)
  np.testing.assert_allclose(total, rows_x.sum(0), rtol=1e-12)
  np.testing.assert_allclose(square, rows_x.T @ rows_x, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(products, (rows_x * (2 * rows_x + 1)).sum(0), rtol=1e-12)

@pytest.mark.parametrize("width", [C, 128])  # 128: whole lane tiles, concatenated under tpu
@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_pointwise_sum_matches_numpy(width, platform):
  x = jax.random.normal(jax.random.PRNGKey(5), (2, 3, 4, width), jnp.float64)
  b = jax.random.normal(jax.random.PRNGKey(6), (2, 3, 4, 2 * width), jnp.float64)
  kx = jax.random.normal(jax.random.PRNGKey(7), (width, K), jnp.float64)
  kb = jax.random.normal(jax.random.PRNGKey(8), (2 * width, K), jnp.float64)
  with ops.policy.lowering_platform(platform):
    both = ops.reductions.pointwise_sum((x, kx), (b, kb))
  expected = (np.asarray(x).reshape(-1, width) @ np.asarray(kx)
              + np.asarray(b).reshape(-1, 2 * width) @ np.asarray(kb))
  np.testing.assert_allclose(np.asarray(both).reshape(-1, K), expected, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize("fused", [False, True], ids=["gate", "norm_gate"])
def test_lean_op_with_axis_name_matches_the_reference_under_shard_map(check_vma, fused):
  """``axis_name`` inside ``shard_map`` on 4 devices, float64: the lean op's outputs, batch
  statistics (what the running averages are made of) and gradients equal the reference op's with
  the same ``axis_name``, and the statistics are the whole batch's (NumPy)."""
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:4])
  p, x = _params(jax.random.PRNGKey(3), bias=True), _x((16, 3, C))
  norm = Affine(jnp.linspace(0.5, 1.5, C), jnp.linspace(-0.2, 0.2, C))
  weights = jnp.cos(jnp.arange(x.size, dtype=jnp.float64)).reshape(x.shape)

  def run(impl):
    def per_device(x, p, norm, w):
      def loss(x, p, norm):
        if fused:
          y, moments, stats = ops.norm_gate(x, norm, p, norm_epsilon=1e-3, epsilon=EPS,
                                            inner_relu=True, dtype=jnp.float64, impl=impl,
                                            axis_name="data")
        else:
          (y, stats), moments = ops.gate(x, p, epsilon=EPS, inner_relu=True, impl=impl,
                                         axis_name="data"), None
        # the statistics' cotangents flow too (as a loss on running averages would make them)
        return jnp.sum(y * w) + jnp.sum(stats.down.var) + jnp.sum(stats.up.mean), (y, stats,
                                                                                   moments)
      (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, p, norm)
      if not check_vma:  # parameter gradients are this device's parts: sum them here
        grads = (grads[0],) + jax.lax.psum(grads[1:], "data")
      return out, grads
    spec = (P("data"), P(), P(), P("data"))
    out_specs = ((P("data"), P(), P()), (P("data"), P(), P()))
    return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=spec, out_specs=out_specs,
                                 check_vma=check_vma))(x, p, norm, weights)

  got, want = run("lean"), run("reference")
  chex.assert_trees_all_close(got, want, rtol=1e-9, atol=1e-10)
  (_, stats, _), _ = got
  h = np.asarray(x).reshape(-1, C) @ np.asarray(p.down.kernel) + np.asarray(p.down.bias)
  if not fused:  # the down projection's statistics over the whole batch, not a shard
    np.testing.assert_allclose(stats.down.mean, h.mean(0), rtol=1e-9)
    np.testing.assert_allclose(stats.down.var, h.var(0), rtol=1e-9)
