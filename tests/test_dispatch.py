"""atac_jax.ops.dispatch: where the batch lies, read from JAX itself, in a user's own step.

The session has 8 fake CPU devices; the kernels run in Pallas' interpreter. Gradients are
checked against the lean op's XLA backward on the whole batch (itself checked in float64 against
plain autodiff of the reference op in ``test_ops.py``) or against the reference op in the same
``shard_map``.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from atac_jax import ops
from atac_jax.ops import Affine
from test_pallas_backward import _close, _params

EPS = 1e-5
SHAPE = (32, 4, 2, 16)  # batch-minor tiles, 8 examples a device over 4 devices


def _mesh(*shape_names, explicit=False):
  names, shape = zip(*shape_names)
  types = (AxisType.Explicit if explicit else AxisType.Auto,) * len(shape)
  return jax.make_mesh(shape, names, axis_types=types, devices=jax.devices()[:int(np.prod(shape))])


def _split_seen(fn, *args):
  """``where_batch_lies`` as ``fn`` traced on ``args`` sees it (fn calls ``see(x)``)."""
  seen = []
  jax.jit(fn(lambda x: seen.append(ops.dispatch.where_batch_lies(x)))).trace(*args)
  return seen[0]


def test_where_batch_lies_follows_jax_mesh_context_and_shard_map():
  x = jnp.ones(SHAPE)
  plain = lambda see: lambda x: see(x) or x
  # no context, 8 devices: unknown
  assert not _split_seen(plain, x).known
  # mesh context, automatic axes: the mesh's first axis
  with jax.set_mesh(_mesh(("data", 4), ("model", 2))):
    split = _split_seen(plain, x)
  assert split.shards == 4 and split.parallel.axes == ("data",) and "first axis" in split.source
  # explicit axes: the input's type says where its batch lies
  mesh = _mesh(("batch", 2), ("other", 4), explicit=True)
  with jax.set_mesh(mesh):
    split = _split_seen(plain, jax.device_put(x, NamedSharding(mesh, P("other"))))
    assert split.shards == 4 and split.parallel.axes == ("other",)
    split = _split_seen(plain, jax.device_put(x, NamedSharding(mesh, P(("batch", "other")))))
    assert split.shards == 8 and split.parallel.axes == ("batch", "other")
    whole = _split_seen(plain, jax.device_put(x, NamedSharding(mesh, P())))
    assert whole.on_one_device and whole.parallel is None  # every device has the whole batch
  # shard_map and pmap: the local shard
  mesh = _mesh(("data", 4))
  in_shard_map = lambda see: jax.shard_map(lambda x: see(x) or x, mesh=mesh, in_specs=P("data"),
                                           out_specs=P("data"))
  assert _split_seen(in_shard_map, x).on_one_device
  seen = []
  jax.pmap(lambda x: seen.append(ops.dispatch.where_batch_lies(x)) or x)(x.reshape(4, 8, 4, 2,
                                                                                   16))
  assert seen[0].on_one_device and "shard_map" in seen[0].source
  # shard_map over one axis of a mesh whose other automatic axis may split the batch: unknown
  mesh2 = _mesh(("data", 4), ("model", 2))
  partial = lambda see: jax.shard_map(lambda x: see(x) or x, mesh=mesh2, in_specs=P("data"),
                                      out_specs=P("data"), axis_names={"data"})
  assert not _split_seen(partial, x).known
  # the declaration overrides the context
  with jax.set_mesh(mesh), ops.pallas_backward.data_parallel(mesh, ("data",)):
    assert _split_seen(plain, x).source == "data_parallel declaration"


def _loss(impl, x, params, affine, weights):
  y, _, _ = ops.norm_gate(x, affine, params, norm_epsilon=EPS, epsilon=EPS, inner_relu=True,
                          dtype=jnp.float32, impl=impl)
  return jnp.sum(y * weights)


def _operands():
  x = jax.random.normal(jax.random.PRNGKey(0), SHAPE) + 0.2
  c = SHAPE[-1]
  params = _params(jax.random.PRNGKey(1), c, c // 2, bias=False)
  affine = Affine(jnp.linspace(0.5, 1.5, c), jnp.linspace(-0.3, 0.3, c))
  weights = jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(SHAPE)
  return x, params, affine, weights


def _recording(monkeypatch):
  """The backward each gate op traced from now on chose (``dispatch.choose`` wrapped)."""
  chosen, choose = [], ops.dispatch.choose

  def record(*args, **kwargs):
    chosen.append(choose(*args, **kwargs))
    return chosen[-1]

  monkeypatch.setattr(ops.dispatch, "choose", record)
  return chosen


@pytest.mark.parametrize("explicit", [False, True], ids=["auto-axes", "explicit-axes"])
def test_own_jit_step_in_a_mesh_context_takes_the_kernels(monkeypatch, explicit):
  """A user's own ``jax.jit`` step under ``jax.set_mesh``, no project declaration: the kernels
  run per shard (no gather of the batch), gradients equal the whole-batch XLA backward's."""
  x, params, affine, weights = _operands()
  want = jax.grad(functools.partial(_loss, "lean"), argnums=(0, 1))(x, params, affine, weights)
  chosen = _recording(monkeypatch)
  mesh = _mesh(("data", 4), explicit=explicit)
  with jax.set_mesh(mesh):
    xs, ws = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (x, weights))
    step = jax.jit(jax.grad(functools.partial(_loss, "pallas"), argnums=(0, 1)))
    got = step(xs, params, affine, ws)
    text = step.lower(xs, params, affine, ws).compile().as_text()
  assert [c.backward for c in chosen] == [ops.Backward.PALLAS], [c.reason for c in chosen]
  assert chosen[0].split.shards == 4 and chosen[0].split.parallel.axes == ("data",)
  assert not re.findall(r" all-gather(?:-start)?\(", text)
  assert got[0].sharding.spec[0] == "data"
  _close(got, want)


def _per_shard(mesh, impl, *, check_vma):
  """A ``shard_map`` step: each device's gradient of its own shard's loss (parameters' gradients
  stacked per device where they vary)."""
  def step(x, params, affine, weights):
    dx, dparams = jax.grad(functools.partial(_loss, impl), argnums=(0, 1))(x, params, affine,
                                                                          weights)
    if check_vma:  # invariant parameters: their gradients are summed over the devices
      return dx, dparams
    return dx, jax.tree.map(lambda g: g[None], dparams)
  out_params = P() if check_vma else P("data")
  return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P("data"), P(), P(), P("data")),
                               out_specs=(P("data"), out_params), check_vma=check_vma))


def test_shard_map_step_takes_the_kernels_on_each_shard(monkeypatch):
  """Inside ``shard_map`` the input is the local shard: the kernels run on it as on one device
  and give each shard's gradients (its own batch statistics, no ``axis_name``)."""
  x, params, affine, weights = _operands()
  mesh = _mesh(("data", 4))
  chosen = _recording(monkeypatch)
  got = _per_shard(mesh, "pallas", check_vma=False)(x, params, affine, weights)
  assert [c.backward for c in chosen] == [ops.Backward.PALLAS]
  assert chosen[0].split.on_one_device
  shards = [jax.grad(functools.partial(_loss, "lean"), argnums=(0, 1))(
      x[8 * i:8 * i + 8], params, affine, weights[8 * i:8 * i + 8]) for i in range(4)]
  want = (jnp.concatenate([s[0] for s in shards]),
          jax.tree.map(lambda *g: jnp.stack(g), *[s[1] for s in shards]))
  _close(got, want)


def test_lean_op_in_a_shard_map_that_checks_varying_axes_matches_the_reference(monkeypatch):
  """``check_vma=True`` (shard_map's default): the lean op casts its parameters to varying as
  JAX does for its own primitives, so parameter gradients come out summed over the devices as
  the reference op's; off TPU the kernels give way to the XLA backward (the interpreter)."""
  x, params, affine, weights = _operands()
  mesh = _mesh(("data", 4))
  chosen = _recording(monkeypatch)
  got = _per_shard(mesh, "pallas", check_vma=True)(x, params, affine, weights)
  assert [c.backward for c in chosen] == [ops.Backward.XLA]
  assert "check_vma" in chosen[0].reason
  want = _per_shard(mesh, "reference", check_vma=True)(x, params, affine, weights)
  _close(got, want)
