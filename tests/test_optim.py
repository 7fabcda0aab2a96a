"""Schedules, optimizers and weight-decay masks against closed-form expectations."""

import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from atac_train import optim
from atac_train.defaults import base_config


def _schedule(**fields):
  config = base_config().schedule
  config.update(fields)
  return config


def test_cosine_with_warmup_matches_formula():
  fn = optim.create_schedule(_schedule(name="cosine", learning_rate=0.075, warmup_epochs=5),
                             steps_per_epoch=10, num_epochs=160)
  assert float(fn(0)) == 0.0
  np.testing.assert_allclose(fn(25), 0.075 * 25 / 50, rtol=1e-6)
  for step in (50, 800, 1599):
    expected = 0.075 * 0.5 * (1 + math.cos(math.pi * (step - 50) / 1550))
    np.testing.assert_allclose(fn(step), expected, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(fn(1600), 0.0, atol=1e-9)


def test_step_schedule_cifar_recipe():
  fn = optim.create_schedule(_schedule(name="step", learning_rate=0.2, decay_epochs=(300, 350),
                                       decay_factor=0.1), steps_per_epoch=390, num_epochs=400)
  np.testing.assert_allclose([fn(0), fn(300 * 390 - 1), fn(300 * 390), fn(350 * 390)],
                             [0.2, 0.2, 0.02, 0.002], rtol=1e-6)


def test_unknown_names_list_accepted():
  with pytest.raises(ValueError, match="'constant', 'step', 'cosine'"):
    optim.create_schedule(_schedule(name="poly"), steps_per_epoch=1, num_epochs=1)
  config = base_config().optimizer
  config.name = "lamb"
  with pytest.raises(ValueError, match="'sgd', 'adam', 'adamw'"):
    optim.create_optimizer(config, optax.constant_schedule(0.1))


def test_weight_decay_mask_skips_bn_and_biases():
  params = {"conv": {"kernel": jnp.ones((3, 3, 2, 4))}, "bn": {"scale": jnp.ones(4),
                                                               "bias": jnp.ones(4)},
            "dense": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)},
            "act": {"alpha": jnp.ones(1)}}
  mask = optim.weight_decay_mask(params, "no_bn_bias")
  assert mask == {"conv": {"kernel": True}, "bn": {"scale": False, "bias": False},
                  "dense": {"kernel": True, "bias": False}, "act": {"alpha": False}}
  assert all(optim.weight_decay_mask(params, "all")["bn"].values())


def test_sgd_nesterov_with_coupled_weight_decay_one_step():
  config = ml_collections.ConfigDict(base_config().optimizer.to_dict())
  config.update(name="sgd", momentum=0.9, nesterov=True, weight_decay=0.1,
                weight_decay_mask="all")
  tx = optim.create_optimizer(config, optax.constant_schedule(0.5))
  params = {"w": jnp.array([1.0, -2.0])}
  grads = {"w": jnp.array([0.3, 0.1])}
  updates, _ = tx.update(grads, tx.init(params), params)
  g = np.array([0.3, 0.1]) + 0.1 * np.array([1.0, -2.0])  # L2 added to the gradient
  momentum = g  # first step: m = g; Nesterov update = -lr * (g + 0.9 m)
  np.testing.assert_allclose(updates["w"], -0.5 * (g + 0.9 * momentum), rtol=1e-6)
