"""Conventions every unit shares: flax's output-dtype rule, pickling, picklable initialisers."""

import functools
import pickle

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atac_jax import models
from atac_jax.layers import (AWConv, Elementwise, KernelAttention, PointwiseConv,
                             activation_options, available_activations, get_activation,
                             initializers)

# Every unit with parameters: the registered ones plus AW-conv and the point-wise convolution.
UNITS = {
    **{name: functools.partial(get_activation, name)
       for name in available_activations() if "param_dtype" in activation_options(name)},
    "awconv": functools.partial(AWConv, 6, 3, reduction=2),
    "pointwise": functools.partial(PointwiseConv, 6),
    "kernel_attention": functools.partial(KernelAttention, 6, (3, 3), reduction=2),
}
OPTIONS = {"atac": {"reduction": 2}, "atac_global": {"reduction": 2}, "se": {"reduction": 2}}


def _unit_params():
  return list(UNITS)


def _output(name, x, **options):
  unit = UNITS[name](**OPTIONS.get(name, {}), **options)
  # The point-wise convolution and the kernel-attention generator are not activations: no train.
  train = {} if isinstance(unit, (PointwiseConv, KernelAttention)) else {"train": True}
  variables = unit.init(jax.random.key(0), jnp.zeros(x.shape, jnp.float32), **train)
  y, _ = unit.apply(variables, x, mutable=["batch_stats"], **train)
  return y


def test_every_unit_is_covered():
  assert {"arelu", "prelu", "se", "xunit", "atac", "atac_global"} <= set(UNITS)


@pytest.mark.parametrize("name", _unit_params())
def test_output_dtype_is_the_promotion_of_input_and_params(name):
  """Flax's rule (``nn.Dense`` does the same): ``dtype=None`` promotes input and parameters."""
  x = jnp.asarray(np.random.RandomState(0).normal(size=(2, 4, 4, 8)), jnp.bfloat16)
  chex.assert_type(_output(name, x), jnp.float32)
  reference = nn.Dense(3).apply(nn.Dense(3).init(jax.random.key(0), x), x)
  chex.assert_type(reference, jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("name", list(UNITS))
def test_dtype_sets_the_output_dtype(name, dtype):
  other = jnp.float32 if dtype == jnp.bfloat16 else jnp.bfloat16
  x = jnp.asarray(np.random.RandomState(0).normal(size=(2, 4, 4, 8)), other)
  chex.assert_type(_output(name, x, dtype=dtype), dtype)


@pytest.mark.parametrize("name", [n for n in available_activations()
                                  if "param_dtype" not in activation_options(n)])
def test_parameter_free_activations_keep_the_input_dtype(name):
  x = jnp.linspace(-3, 3, 8, dtype=jnp.bfloat16)
  chex.assert_type(get_activation(name)(x), jnp.bfloat16)


def _roundtrip(obj):
  return pickle.loads(pickle.dumps(obj))


@pytest.mark.parametrize("name", available_activations())
def test_every_activation_pickles(name):
  act = get_activation(name, **OPTIONS.get(name, {}))
  loaded = _roundtrip(act)
  x = jnp.asarray(np.random.RandomState(0).normal(size=(2, 4, 4, 8)), jnp.float32)
  if isinstance(act, Elementwise):
    assert loaded == act
    np.testing.assert_array_equal(loaded(x, train=True), act(x, train=True))
    return
  assert loaded == act
  variables = act.init(jax.random.key(0), x, train=False)
  np.testing.assert_array_equal(loaded.apply(variables, x, train=False),
                                act.apply(variables, x, train=False))


@pytest.mark.parametrize("unit", [AWConv(6, 3), PointwiseConv(4), KernelAttention(4, (3, 3)),
                                  AWConv(6, 3, kernel_init=initializers.he_normal)])
def test_units_pickle(unit):
  loaded = _roundtrip(unit)
  assert loaded == unit
  x = jnp.ones((1, 5, 5, 3))
  chex.assert_trees_all_equal(loaded.init(jax.random.key(0), x), unit.init(jax.random.key(0), x))


def test_models_pickle():
  model = models.create("resnet18", num_classes=10, act="arelu", awconv_stages=(3,),
                        name="backbone")
  assert _roundtrip(model) == model


@pytest.mark.parametrize("ours,flax_init", [
    (initializers.lecun_normal, nn.initializers.lecun_normal()),
    (initializers.he_normal, nn.initializers.variance_scaling(2.0, "fan_in", "normal")),
])
def test_picklable_initializers_draw_what_flax_draws(ours, flax_init):
  """Same values for the same key, so defaults changed to them keep checkpoints reproducible."""
  for shape in [(3, 3, 4, 8), (1, 1, 16, 8), (5, 7)]:
    np.testing.assert_array_equal(ours(jax.random.key(3), shape),
                                  flax_init(jax.random.key(3), shape))
  assert _roundtrip(ours) == ours
