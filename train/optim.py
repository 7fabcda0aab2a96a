"""Optax optimizers, learning-rate schedules and weight-decay masks from the config."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine")
DECAY_MASKS = ("all", "no_bn_bias")


def create_schedule(config: ml_collections.ConfigDict, *, steps_per_epoch: int,
                    num_epochs: int) -> optax.Schedule:
  """Learning rate as a function of the step: linear warmup, then constant, step or cosine decay.

  Args:
    config: the ``schedule`` sub-config.
    steps_per_epoch: optimizer steps per epoch.
    num_epochs: training length; cosine decays to 0 at ``num_epochs * steps_per_epoch``.
  """
  if config.name not in SCHEDULES:
    raise ValueError(f"schedule.name must be one of {SCHEDULES}, got {config.name!r}.")
  total = num_epochs * steps_per_epoch
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  peak = config.learning_rate
  if config.name == "constant":
    main = optax.constant_schedule(peak)
  elif config.name == "step":
    boundaries = {int(e * steps_per_epoch) - warmup: config.decay_factor
                  for e in config.decay_epochs}
    main = optax.piecewise_constant_schedule(peak, boundaries)
  else:
    main = optax.cosine_decay_schedule(peak, decay_steps=max(total - warmup, 1))
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def weight_decay_mask(params: Any, mode: str) -> Any:
  """Pytree of bools: which parameters get weight decay.

  ``'all'`` decays everything (the CIFAR recipe, BN included); ``'no_bn_bias'`` skips BatchNorm
  scale/bias and every bias (the ImageNet recipe; ATAC's BNs included): only leaves named
  ``kernel`` (and other weights of rank >= 2) are decayed.
  """
  if mode not in DECAY_MASKS:
    raise ValueError(f"optimizer.weight_decay_mask must be one of {DECAY_MASKS}, got {mode!r}.")
  if mode == "all":
    return jax.tree.map(lambda _: True, params)

  def decayed(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    return name == "kernel" or (leaf.ndim >= 2 and name not in ("scale", "bias"))
  return jax.tree_util.tree_map_with_path(decayed, params)


def create_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule
                     ) -> optax.GradientTransformation:
  """Optax transformation for the ``optimizer`` sub-config.

  ``sgd`` and ``adam`` add ``weight_decay * w`` to the gradient (coupled L2, as the MXNet and
  Paddle references do); ``adamw`` uses decoupled decay.
  """
  if config.name not in OPTIMIZERS:
    raise ValueError(f"optimizer.name must be one of {OPTIMIZERS}, got {config.name!r}.")
  mask = lambda params: weight_decay_mask(params, config.weight_decay_mask)
  parts = []
  if config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if config.name == "adamw":
    parts.append(optax.adamw(schedule, b1=config.b1, b2=config.b2,
                             weight_decay=config.weight_decay, mask=mask))
    return optax.chain(*parts)
  if config.weight_decay > 0:
    parts.append(optax.add_decayed_weights(config.weight_decay, mask=mask))
  if config.name == "sgd":
    parts.append(optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov))
  else:
    parts.append(optax.adam(schedule, b1=config.b1, b2=config.b2))
  return optax.chain(*parts)
