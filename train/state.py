"""Train state: parameters, BatchNorm statistics and optimizer state in one pytree."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state


class TrainState(train_state.TrainState):
  """``flax.training.train_state.TrainState`` plus the models' ``batch_stats`` collection."""
  batch_stats: Any


def create_train_state(rng: jax.Array, *, model: nn.Module, tx: optax.GradientTransformation,
                       image_shape: tuple[int, int, int]) -> TrainState:
  """Initialises the model on a one-image batch and the optimizer on its parameters."""
  variables = model.init({"params": rng, "dropout": rng}, jnp.zeros((1, *image_shape), jnp.float32),
                         train=False)
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           batch_stats=variables.get("batch_stats", {}), tx=tx)
