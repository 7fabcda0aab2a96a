"""Train/eval step pieces: mixup, label smoothing, masked eval sums, device-side input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from atac_train import steps
from atac_train.data import device
from atac_train.data.config import DatasetInfo
from atac_train.state import create_train_state


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


class _Linear(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    del train
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


def test_steps_finish_the_input_recipe_on_the_device():
  """uint8 batch + draws through the step's transform == the transformed floats without one."""
  info = DatasetInfo(num_classes=3, image_shape=(8, 8, 3), num_train=4, num_eval=4,
                     augment="alexnet", mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
  transform = device.DeviceTransform.from_info(info)
  assert transform.rotate and transform.max_value == 255.0
  batch = device.example_batch(info, 4, seed=1)
  state = create_train_state(jax.random.key(0), model=_Linear(), tx=optax.sgd(0.1),
                             image_shape=info.image_shape)
  options = dict(base_rng=jax.random.key(1), num_classes=3, learning_rate_fn=lambda _: 0.1,
                 mixup_alpha=0.4)
  on_device, metrics = steps.train_step(state, batch, transform=transform, **options)
  floats = {"image": transform(batch), "label": batch["label"]}
  assert floats["image"].dtype == jnp.float32
  reference, expected = steps.train_step(state, floats, **options)
  np.testing.assert_allclose(metrics["loss"], expected["loss"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), on_device.params,
               reference.params)
  # Eval: uint8 images are only normalised.
  eval_batch = {"image": batch["image"], "label": batch["label"], "mask": np.ones(4, bool)}
  variables = {"params": state.params}
  sums = steps.eval_step(variables, eval_batch, apply_fn=state.apply_fn, num_classes=3,
                         transform=transform)
  normalised = {**eval_batch, "image": transform.normalize(batch["image"])}
  expected_sums = steps.eval_step(variables, normalised, apply_fn=state.apply_fn, num_classes=3)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), sums, expected_sums)
