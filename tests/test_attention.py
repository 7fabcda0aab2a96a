"""SE and xUnit baselines against NumPy implementations of their formulas."""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, PartitionSpec as P

from atac_jax.layers import SE, XUnit
from conftest import randomize




def _se_numpy(x, p):
  s = x.mean(axis=tuple(range(1, x.ndim - 1)), keepdims=True)
  s = np.maximum(s @ p["fc_down"]["kernel"] + p["fc_down"]["bias"], 0)
  s = s @ p["fc_up"]["kernel"] + p["fc_up"]["bias"]
  gate = 1 / (1 + np.exp(-s))
  return x * gate, gate


@pytest.mark.parametrize("shape", [(3, 8), (3, 6, 8), (3, 4, 5, 8), (2, 3, 4, 2, 8)])
def test_se_matches_numpy(shape):
  """Any channels-last rank >= 2: the squeeze averages every axis between batch and channels."""
  x = np.random.RandomState(0).normal(size=shape).astype(np.float32)
  unit = SE(reduction=4)
  params = randomize(unit.init(jax.random.key(0), x), 1)["params"]
  expected, expected_gate = _se_numpy(x, jax.tree.map(np.asarray, params))
  y, state = unit.apply({"params": params}, x, mutable=["intermediates"])
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
  (gate,) = state["intermediates"]["gate"]
  chex.assert_shape(gate, (shape[0],) + (1,) * (len(shape) - 2) + (8,))
  np.testing.assert_allclose(gate, expected_gate, rtol=1e-5, atol=1e-6)


def _depthwise_same(h, kernel):
  """'SAME' depthwise convolution over every spatial axis of ``h`` with ``kernel`` (k, ..., C)."""
  k = kernel.shape[0]
  spatial = h.shape[1:-1]
  pad = [(0, 0)] + [((k - 1) // 2, k // 2)] * len(spatial) + [(0, 0)]
  hp = np.pad(h, pad)
  out = np.zeros_like(h)
  for offset in itertools.product(range(k), repeat=len(spatial)):
    window = (slice(None),) + tuple(slice(o, o + n) for o, n in zip(offset, spatial))
    out += hp[window] * kernel[offset]
  return out


def _xunit_numpy(x, variables, train):
  p = jax.tree.map(np.asarray, variables["params"])
  s = jax.tree.map(np.asarray, variables["batch_stats"])
  axes = tuple(range(x.ndim - 1))

  def bn(h, name):
    mean, var = (h.mean(axes), h.var(axes)) if train else (s[name]["mean"], s[name]["var"])
    return (h - mean) / np.sqrt(var + 1e-5) * p[name]["scale"] + p[name]["bias"]

  h = np.maximum(bn(x, "bn_in"), 0)
  kernel = p["dwconv"]["kernel"][..., 0, :]  # (k, ..., k, C): one filter per channel
  gate = np.exp(-bn(_depthwise_same(h, kernel), "bn_out") ** 2)
  return x * gate, gate


@pytest.mark.parametrize("shape", [(2, 5, 5, 3), (3, 7, 3), (2, 3, 4, 5, 3)])
@pytest.mark.parametrize("train", [True, False])
def test_xunit_matches_numpy(train, shape):
  """Images, sequences and volumes: the depthwise kernel spans every spatial axis."""
  x = np.random.RandomState(0).normal(size=shape).astype(np.float32)
  unit = XUnit(kernel_size=3)
  variables = randomize(unit.init(jax.random.key(0), x, train=False), 2)
  chex.assert_shape(variables["params"]["dwconv"]["kernel"], (3,) * (len(shape) - 2) + (1, 3))
  expected, expected_gate = _xunit_numpy(x, variables, train)
  y, state = unit.apply(variables, x, train=train, mutable=["batch_stats", "intermediates"])
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
  (gate,) = state["intermediates"]["gate"]
  np.testing.assert_allclose(gate, expected_gate, rtol=1e-4, atol=1e-5)


def test_rank_check():
  with pytest.raises(ValueError, match=r"rank >= 2 \(accepted: \(N, C\), \(N, L, C\)"):
    SE().init(jax.random.key(0), jnp.zeros((8,)))
  with pytest.raises(ValueError, match=r"rank >= 3 \(accepted: \(N, L, C\), \(N, H, W, C\)"):
    XUnit().init(jax.random.key(0), jnp.zeros((4, 8)), train=False)
  with pytest.raises(ValueError, match="kernel_size"):
    XUnit(kernel_size=0).init(jax.random.key(0), jnp.zeros((1, 4, 4, 2)), train=False)


@pytest.mark.parametrize("num_devices", [2, 4])
def test_xunit_axis_name_gives_whole_batch_statistics(num_devices):
  """Under ``shard_map`` with ``axis_name``, outputs and updated statistics equal one device's
  result on the whole batch; without it each device normalises with its own shard's statistics.
  """
  x = np.random.RandomState(0).normal(size=(8, 4, 4, 3)).astype(np.float32)
  x[:4] += 2.0  # shards with different statistics
  variables = randomize(XUnit().init(jax.random.key(0), x, train=False), 3)
  expected, expected_updates = XUnit().apply(variables, x, train=True, mutable=["batch_stats"])
  mesh = Mesh(np.array(jax.devices()[:num_devices]), ("batch",), axis_types=(AxisType.Auto,))

  def sharded(unit, out_specs):
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("batch")), out_specs=out_specs)
    def run(variables, x):
      return unit.apply(variables, x, train=True, mutable=["batch_stats"])
    return jax.jit(run)(variables, x)

  # out_specs P() for the statistics: shard_map checks they are the same on every device.
  y, updates = sharded(XUnit(axis_name="batch"), (P("batch"), P()))
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(updates, expected_updates, rtol=1e-5, atol=1e-6)
  y_local, _ = sharded(XUnit(), (P("batch"), P("batch")))
  assert np.abs(np.asarray(y_local) - np.asarray(expected)).max() > 1e-2


def test_parameter_shapes():
  variables = XUnit(kernel_size=3).init(jax.random.key(0), jnp.zeros((1, 4, 4, 6)), train=False)
  chex.assert_shape(variables["params"]["dwconv"]["kernel"], (3, 3, 1, 6))
