"""atac_jax.checkpoint: loading a trained model in other JAX code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atac_jax import checkpoint
from train import data


def test_load_evaluates_to_the_training_runs_last_eval(trained_workdir):
  workdir, reference = trained_workdir
  model, variables, config = checkpoint.load(workdir)
  assert set(variables) == {"params", "batch_stats"}
  assert config["model"]["num_classes"] == 10 and config["model"]["act"] == "atac"
  from ml_collections import ConfigDict  # pylint: disable=g-import-not-at-top
  split = next(iter(data.create_eval_iterable(ConfigDict(config["dataset"]),
                                              global_batch_size=360)))
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, split["image"])
  correct = int(jnp.sum(jnp.argmax(logits, -1) == split["label"]))
  assert correct / 360 == reference["eval/accuracy"]


def test_load_accepts_step_folder_and_checkpoints_folder(trained_workdir):
  workdir, reference = trained_workdir
  step_dir = checkpoint.resolve_step_dir(workdir)
  assert step_dir.endswith(f"/checkpoints/{reference['step']}")
  assert checkpoint.resolve_step_dir(step_dir) == step_dir
  assert checkpoint.resolve_step_dir(workdir + "/checkpoints") == step_dir
  _, by_step, _ = checkpoint.load(step_dir)
  _, latest, _ = checkpoint.load(workdir, step=reference["step"])
  jax.tree.map(np.testing.assert_array_equal, by_step, latest)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="No checkpoint .*atac-train"):
    checkpoint.load(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="step 7"):
    checkpoint.resolve_step_dir(str(tmp_path), step=7)


def test_merge_matching_keeps_mismatched_leaves():
  target = {"a": jnp.zeros((2, 3)), "head": {"kernel": jnp.zeros((4, 3))}, "new": jnp.ones(2)}
  source = {"a": jnp.full((2, 3), 7.0), "head": {"kernel": jnp.full((4, 10), 7.0)}}
  merged = checkpoint.merge_matching(target, source)
  np.testing.assert_array_equal(merged["a"], 7.0)
  np.testing.assert_array_equal(merged["head"]["kernel"], 0.0)
  np.testing.assert_array_equal(merged["new"], 1.0)
