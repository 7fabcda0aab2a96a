"""What XLA makes of an ATAC unit: the fused element-wise tail and the lean backward pass.

These tests read the optimised HLO (``jax.jit(f).lower(...).compile().as_text()``) and XLA's
compile-time memory analysis; they measure no time.
"""


import jax
import jax.numpy as jnp
import pytest

from atac_jax import ops
from atac_jax.layers import ATAC
from atac_train import hlo
from conftest import batch_on_one_device

SHAPE = (8, 8, 8, 32)  # activation-sized = 16384 elements; the bottleneck (r = 2) has half that


def _ops_in(computations: dict[str, str], name: str) -> set[str]:
  """Opcodes of a computation, nested fused/called computations included."""
  ops = set()
  for inst in hlo.instructions(computations[name]):
    ops.add(inst.op)
    if inst.calls in computations:
      ops |= _ops_in(computations, inst.calls)
  return ops


def _unit_forward_hlo(*, memory_lean: bool, train: bool) -> str:
  unit = ATAC(memory_lean=memory_lean)
  x = jnp.ones(SHAPE)
  variables = unit.init(jax.random.key(0), x, train=False)
  fn = lambda v, x: unit.apply(v, x, train=train, mutable=["batch_stats"])
  return jax.jit(fn).lower(variables, x).compile().as_text()


@pytest.mark.parametrize("memory_lean", [True, False])
@pytest.mark.parametrize("train", [False, True])
def test_elementwise_tail_is_one_fusion(memory_lean, train):
  """BN normalise, scale/shift, sigmoid and ``* x`` are one fusion writing only the output.

  XLA:CPU expands ``logistic`` into ``1 / (1 + exp(-z))`` (other backends may keep the op), so
  the gate's fusion is the one holding ``logistic`` or ``exponential``. It must also hold the
  final multiply, read the unit's input ``x`` (an entry parameter) directly, and produce the
  unit's output. Between the up-projection (a dot; with YNNPACK dot fusions it may sit inside
  the same fusion) and that output no other activation-sized buffer may be written.
  """
  comps = hlo.computations(_unit_forward_hlo(memory_lean=memory_lean, train=train))
  entry = hlo.instructions(comps["ENTRY"])
  by_name = {i.name: i for i in entry}
  size = hlo.elements(f"f32[{','.join(map(str, SHAPE))}]")

  def source(name):  # looks through bitcasts/reshapes (free in XLA:CPU)
    while by_name[name].op in ("bitcast", "reshape"):
      name = by_name[name].operands[0]
    return name

  x_param = [i.name for i in entry if i.op == "parameter" and hlo.elements(i.shape) == size]
  assert len(x_param) == 1, x_param
  gates = [i for i in entry if i.op == "fusion"
           and _ops_in(comps, i.calls) & {"logistic", "exponential"}]
  assert len(gates) == 1, [g.name for g in gates]
  gate = gates[0]
  fused_ops = _ops_in(comps, gate.calls)
  assert {"multiply", "subtract"} <= fused_ops, fused_ops  # BN (x - mean) * ..., and * x
  assert x_param[0] in {source(o) for o in gate.operands}, "the gate does not read x"
  assert hlo.elements(gate.shape) == size
  root = next(i for i in entry if i.root)
  outputs = {source(o) for o in root.operands} if root.op == "tuple" else {source(root.name)}
  assert gate.name in outputs, "the gate fusion's result is not the unit's output"

  # The gate reads the up-projection's output straight from its dot (or contains the dot), and
  # nothing else of activation size is computed from that output: no separately written
  # normalised values, sigmoid or product.
  producers = [by_name[source(o)] for o in gate.operands]
  big_inputs = [p for p in producers if hlo.elements(p.shape) >= size and p.op != "parameter"]
  for producer in big_inputs:
    ops = _ops_in(comps, producer.calls) if producer.calls else {producer.op}
    assert "dot" in ops, f"the gate reads {producer.name} ({sorted(ops)}), not the dot"
    consumers = [i for i in entry if producer.name in i.operands
                 or any(source(o) == producer.name for o in i.operands)]
    written = [c.name for c in consumers
               if c is not gate and c.op not in ("bitcast", "reshape")
               and hlo.elements(c.shape) >= size]
    assert not written, f"activation-sized intermediates between the dot and the gate: {written}"
  if not big_inputs:  # YNNPACK fused the up-projection into the gate
    assert "dot" in fused_ops


def _grad_temp_bytes(memory_lean: bool, depth: int = 4) -> int:
  """XLA's scratch bytes for the gradient of a stack of ATAC units in training mode."""
  units = [ATAC(memory_lean=memory_lean) for _ in range(depth)]
  x = jnp.ones(SHAPE)
  variables = [u.init(jax.random.key(i), x, train=False) for i, u in enumerate(units)]

  def loss(params, x):
    for unit, p, v in zip(units, params, variables):
      x, _ = unit.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True,
                        mutable=["batch_stats"])
    return jnp.sum(x * x)

  params = [v["params"] for v in variables]
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("one_device", [False, True])
def test_memory_lean_backward_keeps_only_the_inputs(one_device):
  """Per unit the lean gradient keeps its input; plain autodiff keeps several more buffers.

  Under both CPU ties: ``"scalar"`` (the batch on one device) leaves the input untied, so the
  input's batch mean is tied instead, else XLA:CPU computes the centred input early.
  """
  activation = 4 * SHAPE[0] * SHAPE[1] * SHAPE[2] * SHAPE[3]
  with batch_on_one_device(one_device):
    assert ops.choose(ops.Request("lean", "xla"), train=True).tie == ("scalar" if one_device
                                                                        else "zeros")
    lean, plain = _grad_temp_bytes(True), _grad_temp_bytes(False)
  assert lean < 0.7 * plain, (lean, plain)
  # 4 unit inputs (x of unit 1 is an argument, so 3 are temporaries) plus a working set of a
  # few activation-sized buffers for one unit's backward pass.
  assert lean <= (3 + 6) * activation, (lean, activation)


def _sharded_step_all_reduces(act: str) -> int:
  """All-reduces in the optimised HLO of the real train step of ResNet-8 on 8 CPU devices."""
  from atac_train import bench, trainer  # pylint: disable=g-import-not-at-top
  config = bench.bench_config("cifar_resnet8", act, batch=64)
  s = trainer.setup(config, devices=jax.devices()[:8])
  step, _ = trainer.compile_steps(config, s)
  state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                       s.abstract_state, s.state_sharding)
  batch = {"image": jax.ShapeDtypeStruct((64, *s.info.image_shape), jnp.float32,
                                         sharding=s.batch_sharding),
           "label": jax.ShapeDtypeStruct((64,), jnp.int32, sharding=s.batch_sharding)}
  text = step.lower(state, batch).compile().as_text()
  return sum(inst.op in ("all-reduce", "all-reduce-start")
             for body in hlo.computations(text).values() for inst in hlo.instructions(body))


def test_sharded_step_has_no_collectives_beyond_batch_norm_statistics():
  """Per ATAC unit at most 5 more all-reduces than ReLU (ResNet-8 has 7 units; measured 16 vs 51).

  The unit's two BatchNorms need, in the forward pass, the down BatchNorm's mean and then its
  centred variance (two dependent reductions) and the bottleneck's Gram matrix; in the backward
  pass one reduction each for the two BatchNorms' input-gradient sums (the fused BatchNorm's
  are ReLU's own). Anything reading one element of the batch-sharded cotangent (the previous
  release's opaque zero) or another stray reduction adds to it.
  """
  assert len(jax.devices()) >= 8
  relu, atac = _sharded_step_all_reduces("relu"), _sharded_step_all_reduces("atac")
  assert relu > 0
  assert atac - relu <= 5 * 7, (relu, atac)
