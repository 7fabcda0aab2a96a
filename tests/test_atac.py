"""ATAC against an independent NumPy implementation of the published formula."""

import functools
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atac_jax import ops
from atac_jax.layers import ATAC, BatchNormVariables
from conftest import batch_on_one_device, randomize

MOMENTUM, EPS = 0.9, 1e-5




def _np_bn(h, p, s, train):
  if train:
    mean, var = h.mean(axis=(0, 1, 2)), h.var(axis=(0, 1, 2))
  else:
    mean, var = s["mean"], s["var"]
  out = (h - mean) / np.sqrt(var + EPS) * p["scale"] + p["bias"]
  new = {"mean": MOMENTUM * s["mean"] + (1 - MOMENTUM) * h.mean(axis=(0, 1, 2)),
         "var": MOMENTUM * s["var"] + (1 - MOMENTUM) * h.var(axis=(0, 1, 2))}
  return out, new


def _np_atac(x, variables, *, train, use_global=False, inner_relu=True):
  p = jax.tree.map(np.asarray, variables["params"])
  s = jax.tree.map(np.asarray, variables["batch_stats"])
  h = x.mean(axis=(1, 2), keepdims=True) if use_global else x
  h = h @ p["conv_down"]["kernel"][0, 0] + p["conv_down"].get("bias", 0.0)
  h, new_down = _np_bn(h, p["bn_down"], s["bn_down"], train)
  if inner_relu:
    h = np.maximum(h, 0)
  h = h @ p["conv_up"]["kernel"][0, 0] + p["conv_up"].get("bias", 0.0)
  h, new_up = _np_bn(h, p["bn_up"], s["bn_up"], train)
  return x / (1 + np.exp(-h)), {"bn_down": new_down, "bn_up": new_up}


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("use_global", [False, True])
@pytest.mark.parametrize("inner_relu,use_bias", [(True, False), (False, True)])
def test_matches_numpy_formula(train, use_global, inner_relu, use_bias):
  x = np.random.RandomState(0).normal(size=(4, 5, 6, 8)).astype(np.float32)
  unit = ATAC(reduction=2, use_global=use_global, inner_relu=inner_relu, use_bias=use_bias)
  variables = randomize(unit.init(jax.random.key(0), x, train=False), seed=1)
  y, updates = unit.apply(variables, x, train=train, mutable=["batch_stats"])
  expected, expected_stats = _np_atac(x, variables, train=train, use_global=use_global,
                                      inner_relu=inner_relu)
  chex.assert_shape(y, x.shape)
  chex.assert_type(y, jnp.float32)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  if train:
    chex.assert_trees_all_close(updates["batch_stats"], expected_stats, rtol=1e-5, atol=1e-6)
  else:
    chex.assert_trees_all_close(updates["batch_stats"], variables["batch_stats"])


def test_global_gate_is_one_value_per_channel():
  """use_global gives an SE-style gate: y / x is constant over H and W for each (n, c)."""
  x = np.random.RandomState(2).uniform(0.5, 2.0, size=(3, 4, 4, 6)).astype(np.float32)
  unit = ATAC(reduction=3, use_global=True)
  variables = randomize(unit.init(jax.random.key(0), x, train=False), seed=3)
  gate = np.asarray(unit.apply(variables, x, train=False)) / x
  np.testing.assert_allclose(gate, np.broadcast_to(gate[:, :1, :1, :], gate.shape), rtol=1e-5)
  assert np.all((gate > 0) & (gate < 1))


@pytest.mark.parametrize("channels,reduction", [(16, 2), (64, 4), (32, 1), (6, 3), (1, 2)])
def test_parameter_count(channels, reduction):
  unit = ATAC(reduction=reduction)
  variables = jax.eval_shape(functools.partial(unit.init, train=False), jax.random.key(0),
                             jnp.zeros((1, 4, 4, channels)))
  hidden = max(channels // reduction, 1)
  trainable = sum(np.prod(v.shape) for v in jax.tree.leaves(variables["params"]))
  stats = sum(np.prod(v.shape) for v in jax.tree.leaves(variables["batch_stats"]))
  assert trainable == 2 * channels * hidden + 2 * hidden + 2 * channels
  if channels % reduction == 0:
    assert trainable == 2 * channels**2 / reduction + 2 * channels / reduction + 2 * channels
  assert stats == 2 * hidden + 2 * channels
  chex.assert_shape(variables["params"]["conv_down"]["kernel"], (1, 1, channels, hidden))
  chex.assert_shape(variables["params"]["conv_up"]["kernel"], (1, 1, hidden, channels))


def test_bfloat16_compute_with_float32_params():
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
  unit = ATAC(dtype=jnp.bfloat16)
  variables = unit.init(jax.random.key(1), x, train=False)
  y, _ = unit.apply(variables, x, train=True, mutable=["batch_stats"])
  chex.assert_type(y, jnp.bfloat16)
  chex.assert_tree_all_finite(y)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
  reference = unit.clone(dtype=None).apply(variables, x, train=False)
  np.testing.assert_allclose(np.asarray(unit.apply(variables, x, train=False), np.float32),
                             reference, atol=0.05)


def test_jit_grad_vmap():
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
  unit = ATAC()
  variables = unit.init(jax.random.key(1), x, train=False)

  def loss(params, x):
    y, _ = unit.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                      train=True, mutable=["batch_stats"])
    return jnp.sum(y**2)

  grads = jax.jit(jax.grad(loss))(variables["params"], x)
  chex.assert_trees_all_equal_shapes(grads, variables["params"])
  chex.assert_tree_all_finite(grads)
  per_example = jax.vmap(lambda xi: unit.apply(variables, xi[None], train=False)[0])(x)
  np.testing.assert_allclose(per_example, unit.apply(variables, x, train=False), rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("kwargs,shape,match", [
    ({}, (8,), "rank >= 2"),
    ({"reduction": 3}, (1, 4, 4, 8), "do not fit reduction=3"),
    ({"reduction": 0}, (1, 4, 4, 8), "reduction must be an integer >= 1"),
    ({"momentum": 1.5}, (1, 4, 4, 8), r"momentum must be in \[0, 1\)"),
    ({"epsilon": 0.0}, (1, 4, 4, 8), "epsilon must be a number > 0"),
])
def test_bad_input(kwargs, shape, match):
  with pytest.raises(ValueError, match=match):
    ATAC(**kwargs).init(jax.random.key(0), jnp.zeros(shape), train=False)


# --- memory-lean gradient (ATAC(memory_lean=True), the default) against the plain autodiff path ---

def _lean_and_plain(**kwargs):
  lean = ATAC(memory_lean=True, **kwargs)
  return lean, lean.clone(memory_lean=False)


def _loss_and_grads(unit, variables, x, *, train):
  def loss(params, stats, x):
    y, updates = unit.apply({"params": params, "batch_stats": stats}, x, train=train,
                            mutable=["batch_stats"])
    return jnp.sum(jnp.sin(3.0 * y) * jnp.cos(y)), updates
  (value, updates), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
      variables["params"], variables["batch_stats"], x)
  return value, updates["batch_stats"], grads


def _assert_close_to_scale(got, want, rtol=1e-4):
  """``|got - want| <= rtol * max|want|`` over a whole gradient tree.

  Leaves whose exact value is 0 (e.g. the bias before a training-mode BatchNorm) hold only
  float32 rounding noise, so the tolerance is relative to the tree's scale, not the leaf's.
  """
  scale = max((float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree.leaves(want)), default=0.0)
  chex.assert_trees_all_close(got, want, rtol=rtol, atol=rtol * scale + 1e-7)


def test_memory_lean_is_the_default_and_creates_the_same_variables():
  assert ATAC().memory_lean
  x = jax.random.normal(jax.random.key(0), (2, 3, 3, 8))
  lean, plain = _lean_and_plain(use_bias=True, reduction=4)
  init = lambda unit: jax.jit(functools.partial(unit.init, train=False))(jax.random.key(3), x)
  chex.assert_trees_all_equal(init(lean), init(plain))


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("inner_relu,use_bias,reduction", [(True, False, 2), (False, True, 4),
                                                          (True, True, 1)])
def test_memory_lean_gradients_equal_plain(train, inner_relu, use_bias, reduction):
  """Loss, parameter, input and running-statistic gradients, and batch_stats updates."""
  x = np.random.RandomState(4).normal(1.0, 2.0, size=(4, 5, 6, 8)).astype(np.float32)
  lean, plain = _lean_and_plain(inner_relu=inner_relu, use_bias=use_bias, reduction=reduction)
  variables = randomize(plain.init(jax.random.key(0), x, train=False), seed=5)
  value, stats, grads = _loss_and_grads(lean, variables, x, train=train)
  expected_value, expected_stats, expected_grads = _loss_and_grads(plain, variables, x,
                                                                   train=train)
  np.testing.assert_allclose(value, expected_value, rtol=1e-5)
  chex.assert_trees_all_close(stats, expected_stats, rtol=1e-5, atol=1e-6)
  for got, want in zip(grads, expected_grads):  # parameters, running statistics, input
    _assert_close_to_scale(got, want)
  if train:  # the running statistics do not influence the training-mode output
    chex.assert_trees_all_equal(grads[1], jax.tree.map(jnp.zeros_like, grads[1]))


def test_memory_lean_differentiates_the_returned_statistics():
  """Cotangents flowing into the updated batch_stats reach the input and the parameters."""
  x = jax.random.normal(jax.random.key(1), (4, 6, 6, 8))
  lean, plain = _lean_and_plain()
  variables = randomize(plain.init(jax.random.key(0), x, train=False), seed=6)

  def loss(unit, params, x):
    y, updates = unit.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                            train=True, mutable=["batch_stats"])
    s = updates["batch_stats"]
    return (jnp.sum(y) + jnp.sum(3.0 * s["bn_up"]["mean"]) + jnp.sum(s["bn_up"]["var"] ** 2)
            + jnp.sum(s["bn_down"]["mean"] * s["bn_down"]["var"]))

  grads = [jax.jit(jax.grad(functools.partial(loss, unit), argnums=(0, 1)))(variables["params"], x)
           for unit in (lean, plain)]
  for got, want in zip(*grads):
    _assert_close_to_scale(got, want)


def test_memory_lean_bfloat16_close_to_plain():
  x = jax.random.normal(jax.random.key(2), (4, 4, 4, 16))
  lean, plain = _lean_and_plain(dtype=jnp.bfloat16)
  variables = plain.init(jax.random.key(0), x, train=False)
  value, stats, grads = _loss_and_grads(lean, variables, x, train=True)
  expected_value, expected_stats, expected_grads = _loss_and_grads(plain, variables, x, train=True)
  chex.assert_trees_all_equal_dtypes(grads, expected_grads)
  np.testing.assert_allclose(value, expected_value, rtol=0.02)
  chex.assert_trees_all_close(stats, expected_stats, rtol=0.02, atol=0.02)
  for got, want in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(expected_grads[0])):
    scale = float(jnp.max(jnp.abs(want))) + 1e-6
    assert float(jnp.max(jnp.abs(got.astype(jnp.float32) - want))) <= 0.03 * scale


def test_memory_lean_model_train_step_equals_plain():
  """A CIFAR ResNet (ATAC units in its last stage and head, between BatchNorms and convolutions):
  loss, gradients and BatchNorm updates agree."""
  from atac_jax import models  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  labels = jnp.array([0, 1, 2, 3])
  create = lambda lean: models.create("cifar_resnet8", num_classes=10, act="atac", act_layers=1,
                                      act_options={"memory_lean": lean})
  variables = jax.jit(functools.partial(create(True).init, train=False))(jax.random.key(1), x)
  results = []
  for lean in (True, False):
    model = create(lean)

    def loss(params, model=model):
      logits, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                    x, train=True, mutable=["batch_stats"])
      onehot = jax.nn.one_hot(labels, 10)
      return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), -1)), updates
    results.append(jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"]))
  (loss, updates), grads = results[0]
  (expected_loss, expected_updates), expected_grads = results[1]
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
  chex.assert_trees_all_close(updates, expected_updates, rtol=1e-4, atol=1e-5)
  _assert_close_to_scale(grads, expected_grads)


# --- a preceding BatchNorm fused into the unit (ATAC(...)(x, norm=BatchNormVariables(...))) ---

class _NormThenATAC(nn.Module):
  """``ATAC(BN(x))``, either fused through ``norm=`` or composed with ``nn.BatchNorm``."""
  fused: bool
  inner_relu: bool = True
  use_bias: bool = False
  dtype: Any = None

  @nn.compact
  def __call__(self, x, *, train):
    unit = ATAC(inner_relu=self.inner_relu, use_bias=self.use_bias, dtype=self.dtype, name="act")
    if self.fused:
      return unit(x, train=train, norm=BatchNormVariables(x.shape[-1], momentum=0.8,
                                                          epsilon=1e-3, dtype=self.dtype,
                                                          name="bn"))
    bn = nn.BatchNorm(use_running_average=not train, momentum=0.8, epsilon=1e-3,
                      dtype=self.dtype, name="bn")
    return unit(bn(x), train=train)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("inner_relu,use_bias", [(True, False), (False, True)])
def test_fused_batch_norm_equals_batch_norm_then_unit(train, inner_relu, use_bias):
  """Same variables at init; same loss, batch_stats updates and gradients (input included)."""
  x = np.random.RandomState(7).normal(0.5, 3.0, size=(4, 5, 6, 8)).astype(np.float32)
  fused, composed = (_NormThenATAC(f, inner_relu, use_bias) for f in (True, False))
  init = lambda m: jax.jit(functools.partial(m.init, train=False))(jax.random.key(2), x)
  chex.assert_trees_all_equal(init(fused), init(composed))
  variables = randomize(init(composed), seed=8)
  value, stats, grads = _loss_and_grads(fused, variables, x, train=train)
  want_value, want_stats, want_grads = _loss_and_grads(composed, variables, x, train=train)
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  chex.assert_trees_all_close(stats, want_stats, rtol=1e-5, atol=1e-6)
  assert not np.allclose(stats["bn"]["mean"], variables["batch_stats"]["bn"]["mean"]) or not train
  for got, want in zip(grads, want_grads):  # parameters, running statistics, input
    _assert_close_to_scale(got, want)


@pytest.mark.parametrize("norm_kwargs,match", [
    ({"features": 4}, r"norm has features=4 but the input has 8 channels"),
    ({"features": 8, "momentum": 1.0}, r"BatchNormVariables: momentum must be in \[0, 1\)"),
    ({"features": 8, "epsilon": -1.0}, "BatchNormVariables: epsilon must be a number > 0"),
])
def test_fused_batch_norm_bad_input(norm_kwargs, match):
  class Pair(nn.Module):
    @nn.compact
    def __call__(self, x):
      return ATAC(name="act")(x, train=True, norm=BatchNormVariables(**norm_kwargs, name="bn"))
  with pytest.raises(ValueError, match=match):
    Pair().init(jax.random.key(0), jnp.zeros((2, 4, 4, 8)))


@pytest.mark.parametrize("platform", ["cpu", "tpu"])  # the ops' policy (tpu: 1x1 convolutions)
def test_fused_batch_norm_bfloat16_close_to_unfused(platform):
  x = np.random.RandomState(9).normal(0.5, 3.0, size=(4, 6, 6, 16)).astype(np.float32)
  fused, composed = (_NormThenATAC(f, dtype=jnp.bfloat16) for f in (True, False))
  variables = randomize(composed.init(jax.random.key(2), x, train=False), seed=10)
  with ops.policy.lowering_platform(platform):
    value, stats, grads = _loss_and_grads(fused, variables, x, train=True)
  want_value, want_stats, want_grads = _loss_and_grads(composed, variables, x, train=True)
  chex.assert_trees_all_equal_dtypes(grads, want_grads)
  np.testing.assert_allclose(value, want_value, rtol=0.02)
  chex.assert_trees_all_close(stats, want_stats, rtol=0.02, atol=0.02)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    scale = float(jnp.max(jnp.abs(want))) + 1e-6
    assert float(jnp.max(jnp.abs(got.astype(jnp.float32) - want))) <= 0.03 * scale


@pytest.mark.parametrize("one_device", [False, True])  # the CPU's "zeros" and "scalar" ties
def test_fused_batch_norm_keeps_only_its_input(one_device):
  """A chain of BN -> ATAC -> conv: fusing saves one activation-sized buffer per pair."""
  shape, depth = (16, 16, 16, 32), 4

  class Chain(nn.Module):
    fused: bool

    @nn.compact
    def __call__(self, x):
      for i in range(depth):
        x = _NormThenATAC(self.fused, name=f"pair{i}")(x, train=True)
        x = nn.Conv(shape[-1], (3, 3), use_bias=False, name=f"conv{i}")(x)
      return x

  x = jnp.ones(shape)
  temp = {}
  for fused in (True, False):
    model = Chain(fused)
    variables = model.init(jax.random.key(0), x)
    loss = lambda p, v=variables, m=model: jnp.sum(m.apply(
        {"params": p, "batch_stats": v["batch_stats"]}, x, mutable=["batch_stats"])[0] ** 2)
    with batch_on_one_device(one_device):
      compiled = jax.jit(jax.grad(loss)).lower(variables["params"]).compile()
    temp[fused] = compiled.memory_analysis().temp_size_in_bytes
  activation = 4 * int(np.prod(shape))
  assert temp[True] <= temp[False] - (depth - 1) * activation, (temp, activation)
