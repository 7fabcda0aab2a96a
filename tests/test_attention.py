"""SE and xUnit baselines against NumPy implementations of their formulas."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atac_jax.layers import SE, XUnit


def _randomize(variables, seed):
  rng = np.random.RandomState(seed)
  def draw(path, leaf):
    if getattr(path[-1], "key", "") == "var":
      return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), leaf.dtype)
    return jnp.asarray(rng.normal(0, 0.5, leaf.shape), leaf.dtype)
  return jax.tree_util.tree_map_with_path(draw, variables)


def test_se_matches_numpy():
  x = np.random.RandomState(0).normal(size=(3, 4, 5, 8)).astype(np.float32)
  unit = SE(reduction=4)
  params = _randomize(unit.init(jax.random.key(0), x), 1)["params"]
  p = jax.tree.map(np.asarray, params)
  s = x.mean(axis=(1, 2))
  s = np.maximum(s @ p["fc_down"]["kernel"] + p["fc_down"]["bias"], 0)
  s = s @ p["fc_up"]["kernel"] + p["fc_up"]["bias"]
  expected = x / (1 + np.exp(-s))[:, None, None, :]
  np.testing.assert_allclose(unit.apply({"params": params}, x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("train", [True, False])
def test_xunit_matches_numpy(train):
  x = np.random.RandomState(0).normal(size=(2, 5, 5, 3)).astype(np.float32)
  unit = XUnit(kernel_size=3)
  variables = _randomize(unit.init(jax.random.key(0), x, train=False), 2)
  p = jax.tree.map(np.asarray, variables["params"])
  s = jax.tree.map(np.asarray, variables["batch_stats"])

  def bn(h, name):
    mean, var = (h.mean((0, 1, 2)), h.var((0, 1, 2))) if train else (s[name]["mean"], s[name]["var"])
    return (h - mean) / np.sqrt(var + 1e-5) * p[name]["scale"] + p[name]["bias"]

  h = np.maximum(bn(x, "bn_in"), 0)
  hp = np.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
  kernel = p["dwconv"]["kernel"][:, :, 0, :]  # (3, 3, C): one filter per channel
  conv = sum(hp[:, i:i + 5, j:j + 5, :] * kernel[i, j] for i in range(3) for j in range(3))
  expected = x * np.exp(-bn(conv, "bn_out") ** 2)
  y, _ = unit.apply(variables, x, train=train, mutable=["batch_stats"])
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


def test_rank_check():
  with pytest.raises(ValueError, match="rank-4"):
    SE().init(jax.random.key(0), jnp.zeros((4, 8)))
  with pytest.raises(ValueError, match="kernel_size"):
    XUnit(kernel_size=0).init(jax.random.key(0), jnp.zeros((1, 4, 4, 2)), train=False)


def test_parameter_shapes():
  variables = XUnit(kernel_size=3).init(jax.random.key(0), jnp.zeros((1, 4, 4, 6)), train=False)
  chex.assert_shape(variables["params"]["dwconv"]["kernel"], (3, 3, 1, 6))
