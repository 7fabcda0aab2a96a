"""atac_jax.ops.pallas_backward: the two-kernel backward (Pallas interpreter on the CPU).

Checked against the XLA lean backward (itself checked in float64 against the reference in
``test_ops.py``) and against plain autodiff of the reference op; float32 only, as the kernels.
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atac_jax import layers, ops
from atac_jax.ops import Affine, GateParams, GateStats, Moments, Projection, lean
from atac_jax.ops import pallas_backward

EPS = 1e-5


def _params(key, c, k, *, bias):
  ks = jax.random.split(key, 8)
  n = lambda i, shape, scale: scale * jax.random.normal(ks[i], shape)
  return GateParams(
      Projection(n(0, (c, k), 0.5), n(1, (k,), 0.5) if bias else None),
      Affine(1 + n(2, (k,), 0.1), n(3, (k,), 0.3)),
      Projection(n(4, (k, c), 0.5), n(5, (c,), 0.5) if bias else None),
      Affine(1 + n(6, (c,), 0.1), n(7, (c,), 0.3)))


def _close(got, want, rtol=2e-5):
  """Each leaf within ``rtol`` of the largest magnitude of the expected leaf (at least 1: a
  gradient that vanishes exactly, such as a bias before a BatchNorm, is rounding noise)."""
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    g, w = np.asarray(g), np.asarray(w)
    assert g.shape == w.shape
    np.testing.assert_allclose(g, w, rtol=0, atol=rtol * max(np.max(np.abs(w)), 1.0))


CASES = [((32, 2, 4, 16), False, True),  # batch-minor, as ResNet-20's first stage: S = 8
         ((32, 4, 2, 16), True, False),
         ((128, 2, 2, 64), True, True),  # batch-minor, S = 2
         ((8, 4, 4, 16), False, True),  # channels-minor (transposed in the kernel)
         ((8, 2, 4, 32), True, True),
         ((8, 2, 2, 2, 64), False, False),  # rank 5
         ((8, 2, 2, 256), False, True)]


def backward_operands(seed: int, shape, k: int, *, bias: bool, fused: bool, with_dstats: bool):
  """``(cfg, args, kwargs)`` of a training-mode backward: ``args`` are ``(x, params, stats,
  gram, dy, dstats)`` from the lean op's forward pass, ``kwargs`` the fused BatchNorm's
  (``norm``, ``norm_dstats``) with ``fused``; ``dstats`` cotangents of the returned moments."""
  c = shape[-1]
  keys = jax.random.split(jax.random.PRNGKey(seed), 6)
  x = jax.random.normal(keys[0], shape) + 0.3
  dy = jax.random.normal(keys[1], shape)
  params = _params(keys[2], c, k, bias=bias)
  cfg = lean.Config(EPS, True)
  norm, kwargs = None, {}
  if fused:
    norm = lean.InputNorm(ops.batch_norm.moments(x),
                          Affine(1 + 0.1 * jax.random.normal(keys[3], (c,)),
                                 0.2 * jax.random.normal(keys[4], (c,))),
                          1e-3, jnp.float32, True)
    kwargs = {"norm": norm, "norm_dstats": None}
  dstats = None
  if with_dstats:  # cotangents flowing into the returned batch moments
    r = jax.random.split(keys[5], 6)
    dstats = GateStats(Moments(jax.random.normal(r[0], (k,)), jax.random.normal(r[1], (k,))),
                       Moments(jax.random.normal(r[2], (c,)), None))
    if fused:
      kwargs["norm_dstats"] = Moments(None, jax.random.normal(r[3], (c,)))
  _, stats, gram = lean.forward(x, params, None, cfg, norm=norm)
  return cfg, (x, params, stats, gram, dy, dstats), kwargs


@pytest.mark.parametrize("shape,bias,fused", CASES)
@pytest.mark.parametrize("with_dstats", [False, True])
def test_matches_lean_backward(shape, bias, fused, with_dstats):
  cfg, args, kwargs = backward_operands(sum(shape) + bias + 2 * fused, shape, shape[-1] // 2,
                                        bias=bias, fused=fused, with_dstats=with_dstats)
  x, params, stats, gram, dy, dstats = args
  want = lean.backward(x, params, stats, gram, dy, dstats, cfg, batch_stats=True, **kwargs)
  got = pallas_backward.backward(x, params, stats, gram, dy, dstats, epsilon=EPS,
                                 interpret=True, **kwargs)
  assert (got[2] is None) == (not fused)
  _close(got, want)


def test_matches_plain_autodiff_of_the_reference():
  """A second path: jax.grad of the reference op (no custom rule) through ops.norm_gate."""
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 2, 4, 16)) * 2 + 1
  params = _params(jax.random.PRNGKey(1), 16, 8, bias=False)
  affine = Affine(jnp.linspace(0.5, 1.5, 16), jnp.linspace(-0.3, 0.3, 16))
  weights = jax.random.normal(jax.random.PRNGKey(2), x.shape)

  def loss(impl, x, affine, params):
    y, moments, stats = ops.norm_gate(x, affine, params, norm_epsilon=EPS, epsilon=EPS,
                                      inner_relu=True, dtype=jnp.float32, impl=impl)
    # the statistics' cotangents are nonzero too
    return jnp.sum(y * weights) + jnp.sum(moments.var) + jnp.sum(stats.up.mean ** 2)

  want = jax.grad(loss, argnums=(1, 2, 3))("reference", x, affine, params)
  got = jax.grad(loss, argnums=(1, 2, 3))("pallas", x, affine, params)
  _close(got, want, rtol=1e-4)


@pytest.mark.parametrize("fused", [False, True])
def test_layer_backward_kernel_matches_xla(fused):
  """``layers.ATAC(backward_kernel='pallas')``: same gradients as the default."""
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 4, 4, 16)) + 0.2

  class Net(nn.Module):
    kernel: str

    @nn.compact
    def __call__(self, x):
      norm = layers.BatchNormVariables(16, name="bn") if fused else None
      return layers.ATAC(backward_kernel=self.kernel)(x, train=True, norm=norm)

  def grads(kernel):
    net = Net(kernel)
    variables = net.init(jax.random.PRNGKey(1), x)

    def loss(params, x):
      y, _ = net.apply({**variables, "params": params}, x, mutable=["batch_stats"])
      return jnp.sum(y * jnp.cos(jnp.arange(y.size)).reshape(y.shape))
    return jax.grad(loss, argnums=(0, 1))(variables["params"], x)

  _close(grads("pallas"), grads("xla"))


@pytest.mark.parametrize("fused", [False, True])
def test_second_order_through_the_kernels_matches_xla(fused):
  """grad-of-grad and jvp-of-grad: the kernels' result is differentiated as the XLA
  backward's (a pallas_call has no derivative rule of its own)."""
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 2, 4, 16)) + 0.2
  params = _params(jax.random.PRNGKey(1), 16, 8, bias=True)
  affine = Affine(jnp.linspace(0.5, 1.5, 16), jnp.linspace(-0.3, 0.3, 16))

  def loss(impl, x, params):
    if fused:
      y = ops.norm_gate(x, affine, params, norm_epsilon=EPS, epsilon=EPS, inner_relu=True,
                        dtype=jnp.float32, impl=impl)[0]
    else:
      y = ops.gate(x, params, epsilon=EPS, inner_relu=True, impl=impl)[0]
    return jnp.sum(jnp.sin(y))

  def second(impl):
    grad = jax.grad(functools.partial(loss, impl), argnums=(0, 1))
    penalty = lambda x, p: sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grad(x, p)))
    hvp = jax.jvp(lambda x: grad(x, params)[0], (x,), (jnp.cos(x),))[1]
    return jax.grad(penalty, argnums=(0, 1))(x, params), hvp

  _close(second("pallas"), second("lean"), rtol=1e-4)


def test_supported_reasons():
  params = _params(jax.random.PRNGKey(0), 16, 8, bias=False)
  ok = jnp.zeros((32, 4, 4, 16))
  assert pallas_backward.supported(ok, params, inner_relu=True) is None
  assert "rank" in pallas_backward.supported(jnp.zeros((8, 16)), params, inner_relu=True)
  assert "float32" in pallas_backward.supported(ok.astype(jnp.bfloat16), params,
                                                inner_relu=True)
  assert "inner_relu" in pallas_backward.supported(ok, params, inner_relu=False)
  assert "multiple of" in pallas_backward.supported(jnp.zeros((32, 3, 1, 16)), params,
                                                    inner_relu=True)  # 3 positions, S = 8
  assert "multiple of 8" in pallas_backward.supported(jnp.zeros((4, 1, 1, 16)), params,
                                                      inner_relu=True)  # channels-minor
  wide = _params(jax.random.PRNGKey(0), 512, 256, bias=False)  # (K^2, lanes) products: too big
  assert "on-chip memory" in pallas_backward.supported(jnp.zeros((8, 2, 2, 512)), wide,
                                                       inner_relu=True)
  odd = _params(jax.random.PRNGKey(0), 12, 6, bias=False)
  assert "multiples of 8" in pallas_backward.supported(jnp.zeros((2, 4, 4, 12)), odd,
                                                       inner_relu=True)


def test_vmem_limit_covers_what_mosaic_allocated():
  """The declared scoped VMEM limit: a whole number of MiB, twice the estimate or the floor,
  and above what Mosaic allocated in v5e compiles: ResNet-20's sums kernels (32 images a chip:
  1.28, 1.86 and 8.27 MB for C = 16, 32, 64) and the shape that failed at 1.5x the estimate
  (6.98 MiB for 128 images of 2x2 positions, C = 64, K = 32: 1.8x the estimate)."""
  for shape, k, allocated in [((32, 32, 32, 16), 8, 1277952), ((32, 16, 16, 32), 16, 1855488),
                              ((32, 8, 8, 64), 32, 8269824), ((128, 2, 2, 64), 32, 6.98 * 2**20)]:
    t = pallas_backward.tiling(shape)
    limit = pallas_backward.vmem_limit(t, shape[-1], k)
    assert limit % 2**20 == 0
    assert limit >= max(2 * pallas_backward.vmem_bytes(t, shape[-1], k),
                        pallas_backward.VMEM_LIMIT_FLOOR)
    assert limit > 1.1 * allocated
    assert limit <= 2 * pallas_backward.VMEM_BUDGET + 2**20  # what supported() admits


@pytest.mark.parametrize("kernel,dtype,tied", [("pallas", jnp.float32, True),
                                               ("xla", jnp.float32, False),
                                               ("pallas", jnp.bfloat16, False)])  # falls back
def test_pallas_backward_reads_the_input_through_the_barrier(kernel, dtype, tied, monkeypatch):
  """For the kernels the input joins the optimisation barrier on the cotangent (lean._tie):
  on XLA:TPU the kernels then read the forward pass's buffer instead of a recomputed copy.
  The XLA backward keeps the barrier over the parameters only. (The barrier is TPU's 'tie';
  here on the CPU it is forced, and the lowered step is read.)"""
  monkeypatch.setitem(ops.policy._CHOICES["tie"], "cpu", "barrier")
  x = jax.random.normal(jax.random.PRNGKey(0), (32, 2, 4, 16)).astype(dtype)
  params = jax.tree.map(lambda a: a.astype(dtype), _params(jax.random.PRNGKey(1), 16, 8,
                                                           bias=False))
  loss = lambda x, p: jnp.sum(lean.gate(x, p, epsilon=EPS, inner_relu=True, kernel=kernel)[0])
  text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, params).as_text()
  barriers = [line for line in text.splitlines() if "optimization_barrier" in line]
  name = "f32" if dtype == jnp.float32 else "bf16"
  assert barriers and all(f"tensor<16x8x{name}>" in line for line in barriers)  # down kernel
  # the cotangent, and where the kernels run the input too
  assert sum(line.count(f"tensor<32x2x4x16x{name}>") for line in barriers) == (2 if tied else 1)


def test_unsupported_input_falls_back_to_the_xla_backward():
  """A rank-2 input takes the XLA backward under impl='pallas': same gradients as 'lean'."""
  x = jax.random.normal(jax.random.PRNGKey(0), (32, 16))
  params = _params(jax.random.PRNGKey(1), 16, 8, bias=True)
  loss = lambda impl, x, p: jnp.sum(jnp.sin(ops.gate(x, p, epsilon=EPS, inner_relu=True,
                                                     impl=impl)[0]))
  _close(jax.grad(loss, argnums=(1, 2))("pallas", x, params),
         jax.grad(loss, argnums=(1, 2))("lean", x, params), rtol=1e-6)


def test_bad_kernel_names_are_rejected():
  x = jnp.zeros((2, 4, 4, 16))
  with pytest.raises(ValueError, match="backward_kernel"):
    layers.ATAC(backward_kernel="cuda").init(jax.random.PRNGKey(0), x, train=True)
  params = _params(jax.random.PRNGKey(1), 16, 8, bias=False)
  with pytest.raises(ValueError, match="accepted"):
    lean.gate(x, params, epsilon=EPS, inner_relu=True, kernel="triton")


@pytest.mark.parametrize("fused", [False, True], ids=["gate", "norm_gate"])
def test_kernels_with_axis_name_match_the_lean_op_under_shard_map(monkeypatch, fused):
  """``axis_name`` inside ``shard_map`` on 4 devices: the kernels sum this device's rows, the
  BatchNorms' constants take the whole batch's sums; gradients (input, parameters summed over
  the devices) equal the XLA backward's with the same ``axis_name`` (itself checked against the
  reference in float64 in ``test_ops.py``)."""
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:4])
  shape = (32, 4, 2, 16)
  x = jax.random.normal(jax.random.PRNGKey(0), shape) + 0.2
  params = _params(jax.random.PRNGKey(1), 16, 8, bias=True)
  affine = Affine(jnp.linspace(0.5, 1.5, 16), jnp.linspace(-0.3, 0.3, 16))
  weights = jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(shape)

  def run(impl):
    def per_device(x, params, affine, weights):
      def loss(x, params, affine):
        if fused:
          y, moments, stats = ops.norm_gate(x, affine, params, norm_epsilon=EPS, epsilon=EPS,
                                            inner_relu=True, dtype=jnp.float32, impl=impl,
                                            axis_name="data")
          extra = jnp.sum(moments.var)
        else:
          y, stats = ops.gate(x, params, epsilon=EPS, inner_relu=True, impl=impl,
                              axis_name="data")
          extra = 0.0
        return jnp.sum(y * weights) + jnp.sum(stats.down.var) + jnp.sum(stats.up.mean) + extra
      dx, *rest = jax.grad(loss, argnums=(0, 1, 2))(x, params, affine)
      return dx, jax.lax.psum(tuple(rest), "data")
    return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"), P(), P(), P("data")),
                                 out_specs=(P("data"), P()), check_vma=False))(x, params, affine,
                                                                             weights)

  chosen, choose = [], ops.dispatch.choose
  monkeypatch.setattr(ops.dispatch, "choose", lambda *a, **k: chosen.append(choose(*a, **k))
                      or chosen[-1])
  got = run("pallas")
  assert [c.backward for c in chosen] == [ops.Backward.PALLAS], [c.reason for c in chosen]
  _close(got, run("lean"))


@pytest.mark.parametrize("shape", [(32, 2, 4, 16), (8, 3, 4, 16), (16, 2, 2, 4, 8)])
def test_rows_round_trip(shape):
  """Rows ``(P C, N)`` (batch-minor) or ``(P, N, C)`` and back are inverse permutations."""
  x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
  t = pallas_backward.tiling(shape)
  assert t.batch_minor == (shape[0] > shape[-1])
  rows = t.to_rows(x)
  n, c = shape[0], shape[-1]
  if t.batch_minor:  # column j is image j, channels fastest
    np.testing.assert_array_equal(rows[:, 1], np.asarray(x[1]).reshape(-1))
  else:  # (position, image, channel)
    np.testing.assert_array_equal(rows[:, 1], np.asarray(x[1]).reshape(-1, c))
  assert rows.shape == ((x.size // n, n) if t.batch_minor else (x.size // n // c, n, c))
  np.testing.assert_array_equal(t.from_rows(rows, shape), x)
  assert t.steps * t.block[0] == rows.shape[0]


def test_nnx_module_takes_the_option():
  from atac_jax import nnx as atac_nnx  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 2, 4, 16))

  def grads(kernel):
    unit = atac_nnx.ATAC(16, backward_kernel=kernel, rngs=nnx.Rngs(0))
    graph, state = nnx.split(unit)

    def loss(state, x):
      return jnp.sum(jnp.tanh(nnx.merge(graph, state)(x)))
    return jax.grad(loss, argnums=(0, 1))(state, x)

  _close(grads("pallas"), grads("xla"))
  with pytest.raises(ValueError, match="backward_kernel"):
    atac_nnx.ATAC(16, backward_kernel="mosaic", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("shape", [(32, 4, 2, 16), (32, 2, 2, 64)])  # batch-, channels-minor
def test_data_parallel_keeps_the_batch_split(shape):
  """Under ``data_parallel`` on 4 devices: the kernels run per shard (a psum of their sums, no
  gather of the batch), the input gradient stays split, and the gradients equal one device's."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  split = NamedSharding(mesh, PartitionSpec("data"))
  x = jax.random.normal(jax.random.PRNGKey(0), shape) + 0.2
  c = shape[-1]
  params = _params(jax.random.PRNGKey(1), c, c // 2, bias=False)
  affine = Affine(jnp.linspace(0.5, 1.5, c), jnp.linspace(-0.3, 0.3, c))
  weights = jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(shape)

  def loss(impl, x, params):
    y, _, _ = ops.norm_gate(x, affine, params, norm_epsilon=EPS, epsilon=EPS, inner_relu=True,
                            dtype=jnp.float32, impl=impl)
    return jnp.sum(y * weights)

  def step(x, params):
    with pallas_backward.data_parallel(mesh, ("data",)):
      return jax.grad(functools.partial(loss, "pallas"), argnums=(0, 1))(x, params)

  sharded = jax.jit(step, in_shardings=(split, None))
  xs = jax.device_put(x, split)
  got = sharded(xs, params)
  text = sharded.lower(xs, params).compile().as_text()
  assert not re.findall(r" all-gather(?:-start)?\(", text)
  assert got[0].sharding.spec == PartitionSpec("data")
  _close(got, jax.grad(functools.partial(loss, "lean"), argnums=(0, 1))(x, params))
