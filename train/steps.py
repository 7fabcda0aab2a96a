"""The jitted train and eval steps (pure functions of state and a global batch).

With a ``transform`` (`atac_train.data.device.DeviceTransform`) the batch holds the host
pipeline's uint8 pixels and per-example ``augment`` draws, and the step finishes the input recipe
(colour jitter, PCA lighting, rotation, normalisation) on the device; without one, ``image`` is
the model input already.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from atac_train.data.device import DeviceTransform
from atac_train.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def mixup(rng: jax.Array, images: jax.Array, targets: jax.Array, *, alpha: float
          ) -> tuple[jax.Array, jax.Array]:
  """Mixes each example with a permuted partner: one ``lambda ~ Beta(alpha, alpha)`` per batch."""
  lam_rng, perm_rng = jax.random.split(rng)
  lam = jax.random.beta(lam_rng, alpha, alpha)
  perm = jax.random.permutation(perm_rng, images.shape[0])
  images = lam * images + (1 - lam) * images[perm]
  targets = lam * targets + (1 - lam) * targets[perm]
  return images, targets


def train_step(state: TrainState, batch: Batch, *, base_rng: jax.Array, num_classes: int,
               learning_rate_fn: optax.Schedule, label_smoothing: float = 0.0,
               mixup_alpha: float = 0.0, transform: DeviceTransform | None = None
               ) -> tuple[TrainState, Metrics]:
  """One optimizer step on a global batch; returns the new state and per-step metrics.

  Randomness (dropout, mixup) comes from ``fold_in(base_rng, step)``, so a resumed run draws the
  same numbers as an uninterrupted one, on any device count; the input augmentation's draws come
  with the batch (see the module docstring).
  """
  rng = jax.random.fold_in(base_rng, state.step)
  mix_rng, dropout_rng = jax.random.split(rng)
  images = transform(batch) if transform is not None else batch["image"]
  targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], num_classes), label_smoothing) \
      if label_smoothing else jax.nn.one_hot(batch["label"], num_classes)
  if mixup_alpha > 0:
    images, targets = mixup(mix_rng, images, targets, alpha=mixup_alpha)

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, images, train=True,
        mutable=["batch_stats"], rngs={"dropout": dropout_rng})
    logits = logits.astype(jnp.float32)
    loss = optax.softmax_cross_entropy(logits, targets).mean()
    return loss, (logits, updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", {}))
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
  metrics = {"loss": loss, "accuracy": accuracy, "learning_rate": learning_rate_fn(state.step),
             "grad_norm": optax.tree_utils.tree_norm(grads)}
  return new_state, metrics


def eval_step(variables: dict, batch: Batch, *, apply_fn: Any, num_classes: int,
              transform: DeviceTransform | None = None) -> Metrics:
  """Sums of loss and correct predictions over the rows of ``batch`` whose ``mask`` is True.

  ``transform`` normalises uint8 images (no augmentation); None = ``image`` is the model input.
  """
  images = transform.normalize(batch["image"]) if transform is not None else batch["image"]
  logits = apply_fn(variables, images, train=False).astype(jnp.float32)
  mask = batch["mask"].astype(jnp.float32)
  loss = optax.softmax_cross_entropy(logits, jax.nn.one_hot(batch["label"], num_classes))
  correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
  return {"loss_sum": jnp.sum(loss * mask), "correct_sum": jnp.sum(correct * mask),
          "count": jnp.sum(mask)}


def accumulate(total: Metrics | None, new: Metrics) -> Metrics:
  """Element-wise sum of two metric dicts (``total`` may be None)."""
  return new if total is None else jax.tree.map(jnp.add, total, new)


def summarize_eval(sums: dict[str, Any]) -> dict[str, float]:
  """``eval/loss``, ``eval/accuracy`` and ``eval/num_examples`` from summed eval metrics."""
  count = float(sums["count"])
  return {"eval/loss": float(sums["loss_sum"]) / count,
          "eval/accuracy": float(sums["correct_sum"]) / count,
          "eval/num_examples": int(round(count))}
