"""Fault tolerance: exact resume after SIGTERM and SIGKILL, damaged-checkpoint fallback,
restore on other device counts, fine-tuning into a new head."""

import functools
import json
import os
import shutil
import signal
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from atac_jax import checkpoint
from atac_jax.workdir import Layout
from conftest import cli_xla_flags, metric_rows, small_quickstart_config
from atac_train import checkpointing, parallel, trainer
from atac_train.hooks import KILL_AT_ENV
from atac_train.evaluate import evaluate_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPARED = ("train/loss", "train/accuracy", "eval/loss", "eval/accuracy", "eval/num_examples")


def _assert_same_run(workdir, reference_dir, result, reference):
  for key in COMPARED:
    assert result[key] == reference[key], key
  _, variables, _ = checkpoint.load(workdir)
  _, reference_variables, _ = checkpoint.load(reference_dir)
  chex.assert_trees_all_equal(variables, reference_variables)


def test_sigterm_saves_and_resume_equals_uninterrupted(trained_workdir, tmp_path, monkeypatch):
  reference_dir, reference = trained_workdir
  workdir = str(tmp_path)
  calls = {"n": 0}
  original = parallel.global_batch

  def global_batch_then_sigterm(local, sharding):
    calls["n"] += 1
    if calls["n"] == 30:  # during step 30 of 88: the scheduler's preemption notice
      os.kill(os.getpid(), signal.SIGTERM)
    return original(local, sharding)

  monkeypatch.setattr(parallel, "global_batch", global_batch_then_sigterm)
  interrupted = trainer.train_and_evaluate(small_quickstart_config(), workdir)
  monkeypatch.undo()
  assert interrupted["preempted"] and interrupted["step"] == 30
  assert 30 in checkpointing.Checkpointer(workdir).all_steps()
  assert signal.getsignal(signal.SIGTERM) is not None  # handler restored afterwards
  resumed = trainer.train_and_evaluate(small_quickstart_config(), workdir)
  assert resumed["step"] == 88 and not resumed["preempted"]
  _assert_same_run(workdir, reference_dir, resumed, reference)


@pytest.mark.slow
def test_sigkill_mid_save_resumes_exactly(trained_workdir, tmp_path):
  """SIGKILL while Orbax's background thread writes the last checkpoint (a named point of the
  trainer, not a timed signal): the run resumes from the one before and ends as if never killed."""
  reference_dir, reference = trained_workdir
  # The same XLA program as the in-process reference run: no CLI CPU-flag defaults.
  env = dict(os.environ, XLA_FLAGS=cli_xla_flags(8),
             JAX_PLATFORMS="cpu", ATAC_JAX_CPU_DEFAULTS="0")
  workdir = tmp_path / "run"
  run = [sys.executable, "-m", "atac_train", "train", "--config",
         os.path.join(REPO, "configs", "quickstart.py"), "--workdir", str(workdir),
         "--config.model.name=cifar_resnet8", "--config.global_batch_size=32",
         "--config.num_epochs=2", "--config.progress_bar=False"]
  killed = subprocess.run(run, cwd=REPO, env=dict(env, **{KILL_AT_ENV: "checkpoint_saving:88"}),
                          capture_output=True, text=True, timeout=600)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert os.path.exists(Layout(str(workdir)).lock)
  assert checkpoint.available_steps(str(workdir)) == [44]  # 88 was being written
  result = subprocess.run(run, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  final = json.loads(result.stdout.strip().splitlines()[-1])
  assert final["step"] == 88
  _assert_same_run(str(workdir), reference_dir, final, reference)
  # The killed trainer's lock was taken over, and metrics.jsonl holds each step once: the rows
  # of the uninterrupted run, in order (the rows past the restored step were dropped).
  assert "Taking over the lock" in result.stderr and "Resumed from step 44" in result.stderr
  wall_clock = "train/images_per_second"
  rows = [{k: v for k, v in r.items() if k != wall_clock} for r in metric_rows(str(workdir))]
  assert rows == [{k: v for k, v in r.items() if k != wall_clock}
                  for r in metric_rows(reference_dir)]


def test_damaged_latest_checkpoint_falls_back_to_previous(trained_workdir, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(trained_workdir[0], workdir)
  ckpt = checkpointing.Checkpointer(workdir)
  steps = ckpt.all_steps()
  assert len(steps) >= 2
  state_dir = os.path.join(workdir, "checkpoints", str(steps[-1]), "state")
  files = [os.path.join(root, name) for root, _, names in os.walk(state_dir) for name in names]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)
  s = trainer.setup(small_quickstart_config())
  abstract = checkpointing.abstract_with_sharding(s.abstract_state,
                                                  lambda _: parallel.replicated(s.mesh))
  step, state = ckpt.restore(abstract)
  ckpt.close()
  assert step == steps[-2]
  assert int(state.step) == steps[-2]
  with pytest.raises(Exception):
    checkpointing.Checkpointer(workdir).restore(abstract, step=steps[-1])


@pytest.mark.parametrize("num_devices", [1, 4])
def test_checkpoint_from_8_devices_restores_on_fewer(trained_workdir, num_devices):
  workdir, reference = trained_workdir
  result = evaluate_checkpoint(workdir, devices=jax.devices()[:num_devices])
  assert result["step"] == reference["step"]
  assert result["eval/num_examples"] == 360
  assert result["eval/accuracy"] == reference["eval/accuracy"]
  np.testing.assert_allclose(result["eval/loss"], reference["eval/loss"], rtol=1e-5)
  # The trainer's own restore path onto a 4-device mesh.
  s = trainer.setup(small_quickstart_config(), devices=jax.devices()[:num_devices])
  abstract = checkpointing.abstract_with_sharding(s.abstract_state,
                                                  lambda _: parallel.replicated(s.mesh))
  ckpt = checkpointing.Checkpointer(workdir)
  step, state = ckpt.restore(abstract)
  ckpt.close()
  leaf = jax.tree.leaves(state.params)[0]
  assert step == reference["step"] and len(leaf.sharding.device_set) == num_devices


def test_fine_tune_into_a_new_head(trained_workdir):
  workdir, _ = trained_workdir
  config = small_quickstart_config(**{
      "dataset.name": "synthetic", "dataset.source": "synthetic", "dataset.augment": "none",
      "dataset.synthetic_shape": (8, 8, 1), "dataset.synthetic_num_classes": 3,
      "init_from": workdir})
  s = trainer.setup(config)
  fresh = jax.jit(s.init_fn, out_shardings=s.state_sharding)(jax.random.PRNGKey(5))
  tuned = trainer.init_from_checkpoint(config, fresh, s)
  _, source, _ = checkpoint.load(workdir)
  flat_source = dict(jax.tree_util.tree_leaves_with_path(source["params"]))
  copied = fresh_kept = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(tuned.params):
    if path in flat_source and flat_source[path].shape == leaf.shape:
      np.testing.assert_array_equal(leaf, flat_source[path])
      copied += 1
    else:
      fresh_leaf = functools.reduce(lambda t, k: t[k.key], path, fresh.params)
      np.testing.assert_array_equal(leaf, fresh_leaf)
      fresh_kept += 1
  assert fresh_kept == 2 and copied == len(flat_source) - 2  # only the head kernel + bias differ
  assert int(tuned.step) == 0
