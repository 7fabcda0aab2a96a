"""atac_jax.checkpoint: loading a trained model in other JAX code, its preprocessing, plain Orbax."""

import io
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from atac_jax import checkpoint
from atac_train import data
from atac_train.data import sources
from atac_train.data.device import DeviceTransform

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_load_evaluates_to_the_training_runs_last_eval(trained_workdir):
  workdir, reference = trained_workdir
  model, variables, config = checkpoint.load(workdir)
  assert set(variables) == {"params", "batch_stats"}
  assert config["model"]["num_classes"] == 10 and config["model"]["act"] == "atac"
  from ml_collections import ConfigDict  # pylint: disable=g-import-not-at-top
  split = next(iter(data.create_eval_iterable(ConfigDict(config["dataset"]),
                                              global_batch_size=360)))
  normalize = DeviceTransform.from_info(data.get_info(ConfigDict(config["dataset"]))).normalize
  logits = jax.jit(lambda v, x: model.apply(v, normalize(x), train=False))(variables,
                                                                          split["image"])
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


def test_load_logs_no_warnings(trained_workdir, caplog, capfd):
  workdir, _ = trained_workdir
  capfd.readouterr()
  with caplog.at_level(logging.INFO):
    checkpoint.load(workdir)
    checkpoint.load(checkpoint.resolve_step_dir(workdir))
  assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
  assert capfd.readouterr().err == ""


def test_saved_config_carries_the_preprocessing(trained_workdir):
  workdir, _ = trained_workdir
  _, _, config = checkpoint.load(workdir)
  dataset = config["dataset"]
  assert dataset["image_shape"] == [8, 8, 1] and dataset["max_value"] == 16.0
  np.testing.assert_allclose(dataset["mean"], [0.3053]) and np.testing.assert_allclose(
      dataset["std"], [0.3760])
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["dataset"] == dataset  # config.json matches the checkpoint


def test_preprocess_gives_exactly_the_eval_inputs(trained_workdir):
  workdir, reference = trained_workdir
  model, variables, config = checkpoint.load(workdir)
  images, labels = sources.digits_splits()["test"]  # raw uint8 digits, pixels 0..16
  x = checkpoint.preprocess(images, config)
  from ml_collections import ConfigDict  # pylint: disable=g-import-not-at-top
  batch = next(iter(data.create_eval_iterable(ConfigDict(config["dataset"]),
                                              global_batch_size=360)))
  transform = DeviceTransform.from_info(data.get_info(ConfigDict(config["dataset"])))
  np.testing.assert_array_equal(x, transform.normalize(batch["image"]))  # uint8 -> normalised
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  assert int(np.sum(np.argmax(logits, -1) == labels)) / 360 == reference["eval/accuracy"]
  # One image, as an array or as PNG bytes, gives the same row.
  png = io.BytesIO()
  Image.fromarray(images[3][..., 0]).save(png, format="PNG")
  np.testing.assert_array_equal(checkpoint.preprocess(images[3], config), x[3:4])
  np.testing.assert_array_equal(checkpoint.preprocess(png.getvalue(), config), x[3:4])


def _readme_block(marker):
  """The python code block of docs/checkpoints.md that follows the line containing ``marker``."""
  with open(os.path.join(REPO, "docs", "checkpoints.md")) as f:
    text = f.read()
  block = text[text.index(marker):].split("```python\n", 1)[1].split("```", 1)[0]
  return block


def test_readme_plain_orbax_restore_works(trained_workdir, caplog):
  workdir, reference = trained_workdir
  code = _readme_block("With plain Orbax").replace('"workdirs/quickstart', f'"{workdir}')
  namespace = {}
  with caplog.at_level(logging.WARNING):
    exec(code, namespace)  # pylint: disable=exec-used
  assert namespace["step"] == reference["step"]
  assert set(namespace["params"]) == set(checkpoint.load(workdir)[1]["params"])
  assert namespace["config"]["model"]["act"] == "atac"
  assert [r.getMessage() for r in caplog.records] == []


def test_one_module_owns_the_layout_and_the_model():
  from atac_jax import workdir  # pylint: disable=g-import-not-at-top
  from atac_train import trainer  # pylint: disable=g-import-not-at-top
  assert trainer.build_model is workdir.build_model is checkpoint.build_model
  names = ('"config.json"', '"metrics.jsonl"', '"checkpoints"', '"tensorboard"',
           '"learning_curve.png"', '"damaged_checkpoints"', '"atac-train.lock"')
  for folder in ("atac_jax", "train"):
    for root, _, files in os.walk(os.path.join(REPO, folder)):
      for name in files:
        path = os.path.join(root, name)
        if not name.endswith(".py") or path.endswith(os.path.join("atac_jax", "workdir.py")):
          continue
        with open(path) as f:
          source = f.read()
        assert not [n for n in names if n in source], path
