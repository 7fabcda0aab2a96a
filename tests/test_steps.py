"""Train/eval step pieces: mixup, label smoothing, masked eval sums."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from atac_train import steps


def test_mixup_is_a_convex_combination_with_one_lambda():
  rng = np.random.RandomState(0)
  images = jnp.asarray(rng.normal(size=(6, 2, 2, 1)), jnp.float32)
  targets = jax.nn.one_hot(jnp.arange(6), 6)  # example i is class i: targets reveal the mixing
  mixed_images, mixed_targets = steps.mixup(jax.random.key(0), images, targets, alpha=0.4)
  weights = np.asarray(mixed_targets)
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(mixed_images).reshape(6, -1),
                             weights @ np.asarray(images).reshape(6, -1), rtol=1e-5, atol=1e-6)
  lam = weights[np.arange(6), np.arange(6)]
  mixed_rows = weights.max(-1) < 1  # rows whose partner is another example
  assert mixed_rows.any()
  np.testing.assert_allclose(lam[mixed_rows], lam[mixed_rows][0], rtol=1e-6)  # one lambda


def test_eval_step_masks_padding():
  def apply_fn(variables, images, train):
    del train
    return images.reshape(images.shape[0], -1)[:, :3] * variables["scale"]
  images = jnp.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [5.0, 0, 0]]).reshape(4, 1, 1, 3)
  batch = {"image": images, "label": jnp.array([0, 2, 2, 1]),
           "mask": jnp.array([True, True, True, False])}
  sums = steps.eval_step({"scale": 2.0}, batch, apply_fn=apply_fn, num_classes=3)
  result = steps.summarize_eval(jax.device_get(sums))
  assert result["eval/num_examples"] == 3
  np.testing.assert_allclose(result["eval/accuracy"], 2 / 3)
  logits = np.asarray(images).reshape(4, 3)[:3] * 2.0
  log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  np.testing.assert_allclose(result["eval/loss"], -np.mean(log_softmax[[0, 1, 2], [0, 2, 2]]),
                             rtol=1e-6)


def test_label_smoothing_targets():
  smoothed = optax.smooth_labels(jax.nn.one_hot(jnp.array([1]), 4), 0.1)
  np.testing.assert_allclose(smoothed, [[0.025, 0.925, 0.025, 0.025]], rtol=1e-6)
