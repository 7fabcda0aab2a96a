"""The training loop: sharding invariance, exact eval, bad input, and the quickstart end to end."""

import json
import os

import chex
import flax.linen as nn
import jax
import numpy as np
import pytest

from atac_jax import models

from atac_jax.layers import AReLU
from conftest import small_quickstart_config
from atac_train.configs import quickstart
from atac_train import checkpointing, data, parallel, trainer
from atac_train.data.device import DeviceTransform
from atac_train.trainer import NonFiniteLossError


def _small_config(**overrides):
  return small_quickstart_config(**overrides)


def _run_steps(config, devices, num_steps):
  s = trainer.setup(config, devices=devices)
  state = jax.jit(s.init_fn, out_shardings=s.state_sharding)(jax.random.PRNGKey(config.seed))
  train_step, _ = trainer.compile_steps(config, s)
  iterator = data.create_train_iterator(config.dataset, global_batch_size=config.global_batch_size,
                                        seed=config.seed)
  losses = []
  for _ in range(num_steps):
    state, metrics = train_step(state, parallel.global_batch(next(iterator), s.batch_sharding))
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state)


def test_eight_devices_match_one():
  assert jax.device_count() == 8
  config = _small_config()
  losses_1, state_1 = _run_steps(config, jax.devices()[:1], 3)
  losses_8, state_8 = _run_steps(config, jax.devices(), 3)
  np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
  chex.assert_trees_all_close(state_8.batch_stats, state_1.batch_stats, rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(state_8.params, state_1.params, rtol=1e-4, atol=1e-5)
  assert int(state_8.step) == 3


def test_sharded_state_and_batch_layout():
  config = _small_config()
  s = trainer.setup(config)
  state = jax.jit(s.init_fn, out_shardings=s.state_sharding)(jax.random.PRNGKey(0))
  leaf = jax.tree.leaves(state.params)[0]
  assert leaf.sharding.is_fully_replicated
  batch = parallel.global_batch({"image": np.zeros((32, 8, 8, 1), np.float32)}, s.batch_sharding)
  assert batch["image"].sharding.spec == jax.sharding.PartitionSpec("data")
  assert {shard.data.shape[0] for shard in batch["image"].addressable_shards} == {4}


@pytest.mark.parametrize("num_devices", [1, 8])
def test_eval_counts_every_example_once(num_devices):
  """360 test digits with a batch of 48 (7.5 batches): padded rows never count."""
  config = _small_config(eval_batch_size=48)
  s = trainer.setup(config, devices=jax.devices()[:num_devices])
  state = jax.jit(s.init_fn, out_shardings=s.state_sharding)(jax.random.PRNGKey(3))
  variables = trainer.eval_variables(state)
  result = trainer.evaluate(trainer.compile_eval_step(s), variables, config, s)
  assert result["eval/num_examples"] == 360
  # Independent expectation: the whole split in one unsharded, unpadded forward pass.
  full = next(iter(data.create_eval_iterable(config.dataset, global_batch_size=360)))
  assert full["mask"].all()
  images = DeviceTransform.from_info(s.info).normalize(full["image"])  # eval images: uint8
  logits = np.asarray(s.model.apply(jax.device_get(variables), images, train=False))
  np.testing.assert_allclose(result["eval/accuracy"], np.mean(logits.argmax(-1) == full["label"]))
  log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                                 keepdims=True)) \
      - logits.max(-1, keepdims=True)
  np.testing.assert_allclose(result["eval/loss"],
                             -np.mean(log_probs[np.arange(360), full["label"]]), rtol=1e-4)


def test_batch_that_does_not_divide_over_devices():
  with pytest.raises(ValueError, match="multiple of the device count"):
    trainer.setup(_small_config(global_batch_size=12))


def test_batch_larger_than_dataset():
  with pytest.raises(ValueError, match="larger than the 1437 training examples"):
    trainer.setup(_small_config(global_batch_size=2048))


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  """The learning rate warms up towards 1e6: the first steps train, then the loss overflows."""
  workdir = str(tmp_path)
  config = _small_config(**{"schedule.learning_rate": 1e6, "schedule.warmup_epochs": 2.0,
                            "checkpoint_every_steps": 1, "keep_checkpoints": 100})
  with pytest.raises(NonFiniteLossError, match="Non-finite training loss .* ending at step") as e:
    trainer.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  failed_at = int(str(e.value).split("ending at step ")[1].split(";")[0])
  ckpt = checkpointing.Checkpointer(workdir)
  steps = ckpt.all_steps()
  assert steps and max(steps) < failed_at  # nothing saved at or after the bad step
  s = trainer.setup(config, devices=jax.devices()[:1])
  abstract = checkpointing.abstract_with_sharding(s.abstract_state,
                                                  lambda _: parallel.replicated(s.mesh))
  step, state = ckpt.restore(abstract)
  ckpt.close()
  assert step == max(steps)
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(jax.device_get(state.params)))


@pytest.mark.slow
def test_quickstart_reaches_95_percent(tmp_path):
  """The README's main job, in process: the full quickstart recipe on one device, as the README's
  command runs it on a CPU machine (the same run on 8 devices is held to the 1-device one by
  ``test_eight_devices_match_one``; compiling for 8 fake devices took it from ~50 s to ~140 s)."""
  config = quickstart.get_config()
  config.progress_bar = False
  result = trainer.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
  assert result["eval/accuracy"] >= 0.95
  assert result["eval/num_examples"] == 360
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert all("step" in r and "epoch" in r for r in records)
  assert records[-1]["eval/accuracy"] == result["eval/accuracy"]
  assert {"config.json", "learning_curve.png", "checkpoints", "tensorboard"} <= set(
      os.listdir(tmp_path))


class _Decoys(nn.Module):
  """Two AReLU units beside modules whose parameters are merely *named* alpha/beta."""

  @nn.compact
  def __call__(self, x):
    x = AReLU(name="act1")(x)
    x = x * self.param("alpha", nn.initializers.constant(2.0), (1,))  # not an AReLU
    block = _Scaled(name="block")
    x = block(x)
    return AReLU(alpha_init=0.3, beta_init=-1.0, name="act2")(x)


class _Scaled(nn.Module):
  @nn.compact
  def __call__(self, x):
    alpha = self.param("alpha", nn.initializers.constant(0.5), (1,))
    beta = self.param("beta", nn.initializers.constant(0.1), (1,))
    gamma = self.param("gamma", nn.initializers.constant(1.0), (1,))
    return x * alpha + beta * gamma


def test_learned_scalars_reports_only_arelu_units():
  params = _Decoys().init(jax.random.key(0), np.ones((2, 3), np.float32))["params"]
  assert models.learned_scalars(params) == {
      "arelu/act1/alpha": pytest.approx(0.9), "arelu/act1/beta": pytest.approx(2.0),
      "arelu/act2/alpha": pytest.approx(0.3), "arelu/act2/beta": pytest.approx(-1.0)}
  assert models.learned_scalars({}) == {}


def test_pallas_backward_step_matches_xla_on_four_devices(monkeypatch):
  """The CLI's step with ``backward_kernel='pallas'`` (kernels per device under the trainer's
  ``data_parallel``; Pallas' interpreter here) trains like the XLA backward."""
  from atac_jax.ops import pallas_backward  # pylint: disable=g-import-not-at-top
  calls = []
  original = pallas_backward.backward

  def counted(*args, parallel=None, **kwargs):
    calls.append(parallel)
    return original(*args, parallel=parallel, **kwargs)

  monkeypatch.setattr(pallas_backward, "backward", counted)
  runs = []
  for options in ({}, {"backward_kernel": "pallas"}):
    config = _small_config()
    config.model.options.act_options = options
    runs.append(_run_steps(config, jax.devices()[:4], 2))
    if options:  # every ATAC unit of ResNet-8, per device over the trainer's data axis
      assert len(calls) >= 7 and all(p is not None and p.axes == (parallel.DATA_AXIS,)
                                     for p in calls)
    else:
      assert not calls
  (losses_xla, state_xla), (losses_pallas, state_pallas) = runs
  np.testing.assert_allclose(losses_pallas, losses_xla, rtol=1e-5)
  chex.assert_trees_all_close(state_pallas.params, state_xla.params, rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(state_pallas.batch_stats, state_xla.batch_stats, rtol=1e-4,
                              atol=1e-5)
