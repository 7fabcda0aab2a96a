"""Resuming never gets stuck and never mixes runs: damaged steps, refusals, --fresh, --extend,
changed settings, and metrics.jsonl / TensorBoard holding each step once."""

import json
import os
import shutil

import jax
import pytest

from atac_jax.workdir import Layout
from atac_train import checkpointing, data, optim, parallel, resume, trainer
from atac_train.errors import ResumeError
from conftest import (damage_checkpoint, metric_rows, small_quickstart_config,
                      tensorboard_scalars)

COMPARED = ("train/loss", "train/accuracy", "train/learning_rate", "eval/loss", "eval/accuracy",
            "eval/num_examples")


def _config(**overrides):
  """One epoch (44 steps), a checkpoint every 10 steps, the latest 3 kept: 30, 40 and 44."""
  settings = {"num_epochs": 1, "checkpoint_every_steps": 10, "keep_checkpoints": 3}
  settings.update(overrides)
  return small_quickstart_config(**settings)


def _train(workdir, config=None, **kwargs):
  return trainer.train_and_evaluate(config or _config(), workdir, devices=jax.devices()[:1],
                                    **kwargs)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """The uninterrupted reference run (one device: the fastest to compile on 2 CPU cores)."""
  workdir = str(tmp_path_factory.mktemp("resume") / "reference")
  return workdir, _train(workdir)


@pytest.fixture
def copy(run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(run[0], workdir)
  return workdir


def _comparable(rows):
  """The rows without wall-clock numbers (images/s)."""
  return [{k: v for k, v in r.items() if k != "train/images_per_second"} for r in rows]


def _steps(workdir):
  return checkpointing.Checkpointer(workdir).all_steps()


def test_damaged_latest_step_is_moved_aside_and_reruns_are_idempotent(run, copy):
  reference_dir, reference = run
  assert _steps(copy) == [30, 40, 44]
  damage_checkpoint(copy, 44)
  resumed = _train(copy)  # falls back to 40, trains 41..44 again and saves 44 anew
  for key in COMPARED:
    assert resumed[key] == reference[key], key
  (aside,) = os.listdir(Layout(copy).damaged)
  assert aside.startswith("44-") and os.path.isdir(os.path.join(Layout(copy).damaged, aside,
                                                                "state"))
  assert _steps(copy) == [30, 40, 44]
  assert _comparable(metric_rows(copy)) == _comparable(metric_rows(reference_dir))
  # Every later rerun of the same command: nothing to train, the same result, nothing appended.
  again = _train(copy)
  assert again["step"] == 44 and not again["preempted"]
  for key in COMPARED:
    assert again[key] == reference[key], key
  assert _comparable(metric_rows(copy)) == _comparable(metric_rows(reference_dir))
  assert len(os.listdir(Layout(copy).damaged)) == 1


def test_rows_past_the_restored_step_are_dropped_everywhere(run, copy):
  """A kill while step 44 was being saved: its rows were written, its checkpoint never was."""
  reference_dir, reference = run
  os.rename(os.path.join(copy, "checkpoints", "44"),
            os.path.join(copy, "checkpoints", "44.orbax-checkpoint-tmp-1700000000"))
  curve_before = os.path.getmtime(Layout(copy).curve)
  resumed = _train(copy)
  assert resumed["eval/accuracy"] == reference["eval/accuracy"]
  rows = metric_rows(copy)
  assert _comparable(rows) == _comparable(metric_rows(reference_dir))
  steps = [r["step"] for r in rows]
  assert steps == sorted(steps)
  # TensorBoard holds exactly the rows of metrics.jsonl, each (tag, step) once.
  scalars = tensorboard_scalars(Layout(copy).tensorboard)
  expected = {(k, r["step"]) for r in rows for k in r if k not in ("step", "epoch")}
  assert set(scalars) == expected
  assert all(len(values) == 1 for values in scalars.values())
  assert os.path.getmtime(Layout(copy).curve) > curve_before


def test_no_restorable_checkpoint_is_refused_then_fresh_starts_over(run, copy):
  reference_dir, reference = run
  for step in (30, 40, 44):
    damage_checkpoint(copy, step)
  before = sorted(os.listdir(copy))
  with open(Layout(copy).metrics) as f:
    metrics_before = f.read()
  with pytest.raises(ResumeError) as error:
    _train(copy)
  message = str(error.value)
  assert copy in message and "--fresh" in message and "step 44" in message
  assert "\n" not in message
  assert sorted(os.listdir(copy)) == before  # nothing moved, nothing written
  assert _steps(copy) == [30, 40, 44]
  with open(Layout(copy).metrics) as f:
    assert f.read() == metrics_before
  fresh = _train(copy, fresh=True)
  for key in COMPARED:
    assert fresh[key] == reference[key], key
  (archived,) = os.listdir(Layout(copy).archive)
  old = os.path.join(Layout(copy).archive, archived)
  assert {"checkpoints", "metrics.jsonl", "config.json", "tensorboard"} <= set(os.listdir(old))
  with open(os.path.join(old, "metrics.jsonl")) as f:
    assert f.read() == metrics_before
  assert _comparable(metric_rows(copy)) == _comparable(metric_rows(reference_dir))


def test_data_iterator_is_never_restored_from_a_step_whose_state_failed(copy):
  config = _config()
  s = trainer.setup(config, devices=jax.devices()[:1])
  abstract = checkpointing.abstract_with_sharding(s.abstract_state,
                                                  lambda _: parallel.replicated(s.mesh))
  iterator = data.create_train_iterator(config.dataset, global_batch_size=32, seed=0)
  fresh_position = iterator.get_state()
  for step in (30, 40, 44):
    damage_checkpoint(copy, step)
  ckpt = checkpointing.Checkpointer(copy)
  assert ckpt.restore(abstract, data_iterator=iterator) is None
  ckpt.close()
  assert iterator.get_state() == fresh_position


def test_changed_config_is_refused_with_a_diff(copy):
  with open(Layout(copy).config) as f:
    config_before = f.read()
  files_before = sorted(os.listdir(copy))
  changed = _config(**{"model.act": "relu", "schedule.learning_rate": 0.05,
                       "global_batch_size": 16})
  with pytest.raises(ResumeError) as error:
    _train(copy, changed)
  message = str(error.value)
  assert "model.act: 'atac' -> 'relu'" in message
  assert "schedule.learning_rate: 0.1 -> 0.05" in message
  assert "global_batch_size: 32 -> 16" in message
  assert "--fresh" in message and copy in message and "\n" not in message
  with open(Layout(copy).config) as f:
    assert f.read() == config_before  # config.json still describes the checkpoints
  assert sorted(os.listdir(copy)) == files_before
  assert _steps(copy) == [30, 40, 44]


@pytest.mark.parametrize("damage", [b'{"model": {"name": "cifar_res', b"\xff\xfe\x00", b""])
def test_unreadable_config_json_is_restored_from_the_checkpoint(copy, damage):
  """The refusal points at config.json, so that file is first rewritten from the checkpoint's own
  copy of the config (the one the run was trained with)."""
  with open(Layout(copy).config) as f:
    good = json.load(f)
  with open(Layout(copy).config, "wb") as f:
    f.write(damage)
  with pytest.raises(ResumeError) as error:
    _train(copy, _config(**{"model.act": "relu"}))
  assert Layout(copy).config in str(error.value)
  with open(Layout(copy).config) as f:
    assert json.load(f) == checkpointing.Checkpointer(copy).restore_config(44) == good


def test_settings_that_cannot_change_the_result_may_change_on_resume(run, copy):
  _, reference = run
  neutral = {"log_every_steps": 7, "eval_every_epochs": 3, "checkpoint_every_steps": 0,
             "keep_checkpoints": 5, "eval_batch_size": 40, "dataset.prefetch_buffer": 3}
  assert {k.split(".")[-1] for k in neutral} <= {k.split(".")[-1] for k in resume.RESUMABLE}
  again = _train(copy, _config(**neutral))
  assert again["step"] == 44
  for key in COMPARED:  # the finished run reports its result again
    assert again[key] == reference[key], key
  with open(Layout(copy).config) as f:
    saved = json.load(f)
  assert saved["log_every_steps"] == 7 and saved["dataset"]["prefetch_buffer"] == 3


def test_num_workers_is_not_a_neutral_setting(copy):
  with pytest.raises(ResumeError, match="dataset.num_workers: 0 -> 1"):
    _train(copy, _config(**{"dataset.num_workers": 1}))


def test_extend_trains_a_finished_run_for_more_epochs(copy):
  with pytest.raises(ResumeError, match=r"num_epochs: 1 -> 2.*--extend"):
    _train(copy, _config(num_epochs=2))
  extended = _train(copy, _config(num_epochs=2), extend=True)
  assert extended["step"] == 88 and extended["epoch"] == 2.0
  rows = metric_rows(copy)
  steps = [r["step"] for r in rows]
  assert steps == sorted(steps) and steps[-1] == 88
  # From the restored step on, the learning rate follows the 2-epoch schedule.
  schedule = optim.create_schedule(_config(num_epochs=2).schedule, steps_per_epoch=44,
                                   num_epochs=2)
  (row_50,) = [r for r in rows if r["step"] == 50]
  assert row_50["train/learning_rate"] == pytest.approx(float(schedule(49)), rel=1e-6)
  assert all(r["epoch"] == round(r["step"] / 44, 4) for r in rows)
  with open(Layout(copy).config) as f:
    assert json.load(f)["num_epochs"] == 2
  with pytest.raises(ResumeError, match="can only grow"):
    _train(copy, _config(num_epochs=1), extend=True)
