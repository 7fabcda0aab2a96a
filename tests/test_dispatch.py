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


def _one_device_step():
  """A user's own jitted gradient step of a BatchNorm -> ATAC pair, 'auto' kernels (as the
  modules' default), with its operands on one device."""
  x, params, affine, weights = _operands()
  auto = ops.Request.from_module(memory_lean=True, backward_kernel="auto")
  step = jax.jit(jax.grad(functools.partial(_loss, auto), argnums=(0, 1)))
  return step, (x, params, affine, weights)


def test_choice_is_resolved_for_every_platform(monkeypatch):
  """One call's choice holds each platform's row; the trace platform's is the choice itself;
  a lowering_platform block resolves its platform only."""
  x, params, _, _ = _operands()
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  auto = ops.Request.from_module(memory_lean=True, backward_kernel="auto")
  choice = ops.choose(auto, train=True, x=x, params=params)
  assert [c.platform for c in choice.by_platform] == list(ops.policy.PLATFORMS)
  assert {c.platform: c.backward for c in choice.by_platform} == {
      "cpu": ops.Backward.XLA, "gpu": ops.Backward.PALLAS, "tpu": ops.Backward.PALLAS}
  assert choice.on("tpu").reason.startswith("13:") and choice.on("cpu").reason.startswith("9:")
  assert choice.on("cpu").tie == "scalar" and choice.on("tpu").tie == "barrier"
  assert choice.backward is choice.on(jax.default_backend()).backward is ops.Backward.XLA
  with ops.policy.lowering_platform("tpu"):
    forced = ops.choose(auto, train=True, x=x, params=params)
    assert forced.here().backward is ops.Backward.PALLAS
  assert [c.platform for c in forced.by_platform] == ["tpu"]
  assert forced.on("cpu") is forced  # not resolved: the override's row everywhere


TRITON = "__gpu$xla.gpu.triton"  # the custom call of a Pallas kernel lowered by Triton


def test_multi_platform_export_carries_each_platform_backward(monkeypatch):
  """``jax.export`` for ('cpu', 'cuda', 'tpu') with no declaration: the TPU lowering holds the
  two Mosaic kernels, the CUDA lowering the three Triton kernels, the CPU lowering the XLA
  backward; the exported step runs on the CPU with the whole-batch XLA backward's gradients.
  Exported for the CPU alone, or under ``lowering_platform('cpu')``, no kernel appears."""
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  step, args = _one_device_step()
  # JAX guarantees no compatibility for Triton's custom call, so export asks for consent.
  with pytest.raises(ValueError, match="custom calls"):
    jax.export.export(step, platforms=("cpu", "cuda"))(*args)
  every = jax.export.export(
      step, platforms=("cpu", "cuda", "tpu"),
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON)])(*args)
  text = every.mlir_module()
  assert every.platforms == ("cpu", "cuda", "tpu")
  assert text.count("tpu_custom_call") == 2  # the TPU's sums and dx kernels, once each
  assert text.count(TRITON) == 3  # the GPU's sums, da and dx kernels
  assert "stablehlo.case" in text  # the per-platform branches
  want = jax.grad(functools.partial(_loss, "lean"), argnums=(0, 1))(*args)
  _close(every.call(*args), want)
  both = jax.export.export(step, platforms=("cpu", "tpu"))(*args)
  assert both.mlir_module().count("tpu_custom_call") == 2 and TRITON not in both.mlir_module()
  assert "tpu_custom_call" not in jax.export.export(step, platforms=("cpu",))(*args).mlir_module()
  # The override wins over the lowering platform (a fresh jit: JAX's caches do not know it).
  with ops.policy.lowering_platform("cpu"):
    text = jax.export.export(_one_device_step()[0], platforms=("cpu", "tpu"))(*args).mlir_module()
  assert "tpu_custom_call" not in text


def test_tpu_lowering_from_the_cpu_host_takes_the_kernels(monkeypatch):
  """An AOT lowering for TPU from this CPU host (``jax.jit(...).trace(...).lower(
  lowering_platforms=('tpu',))``, as a compile for a TPU topology does) takes the kernels
  without ``lowering_platform``."""
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  step, args = _one_device_step()
  traced = step.trace(*args)
  tpu = traced.lower(lowering_platforms=("tpu",)).as_text()
  cpu = traced.lower().as_text()
  assert tpu.count("tpu_custom_call") == 2 and "tpu_custom_call" not in cpu


def test_trace_time_choices_follow_the_mesh_context_devices():
  """The forward pass's choices (traced with the program) follow the devices of JAX's mesh
  context, e.g. a Cloud TPU topology's mesh on this CPU host; lowering_platform overrides."""
  from jax._src.mesh import AbstractDevice  # pylint: disable=g-import-not-at-top
  tpu = jax.sharding.AbstractMesh(
      (4,), ("data",), abstract_device=AbstractDevice(device_kind="TPU v5 lite", num_cores=None,
                                                      platform="tpu"))
  assert ops.policy.platform() == "cpu"
  with jax.sharding.use_abstract_mesh(tpu):
    assert ops.policy.platform() == "tpu" and ops.policy.choice("contraction") == "conv"
    with ops.policy.lowering_platform("gpu"):
      assert ops.policy.platform() == "gpu"
  with jax.set_mesh(_mesh(("data", 2))):
    assert ops.policy.platform() == "cpu"


def test_training_export_with_a_symbolic_batch_takes_the_xla_backward(monkeypatch):
  """A symbolic batch (``jax.export.symbolic_shape``): the kernels' tiling needs sizes, so every
  platform's choice is the XLA backward, and the export runs with the XLA backward's values."""
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  chosen = _recording(monkeypatch)
  step, args = _one_device_step()
  x, params, affine, weights = args
  spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape("b, 4, 2, 16"), jnp.float32)
  exported = jax.export.export(step, platforms=("cpu", "tpu"))(spec, params, affine, spec)
  assert "tpu_custom_call" not in exported.mlir_module()
  assert {c.backward for c in chosen[0].by_platform} == {ops.Backward.XLA}
  assert "symbolic shape" in chosen[0].on("tpu").reason
  want = jax.grad(functools.partial(_loss, "lean"), argnums=(0, 1))(*args)
  _close(exported.call(*args), want)
