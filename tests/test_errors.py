"""Bad settings are rejected before any compute, in one line; Ctrl-C exits cleanly at any moment."""

import json
import os
import signal
import subprocess
import sys

import jax
import pytest

from atac_train import trainer, validation
from atac_train.errors import ConfigError, WorkdirError
from atac_train.hooks import INTERRUPT_AT_ENV
from conftest import cli_xla_flags, small_quickstart_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BAD_VALUES = [
    ("schedule.learning_rate", -0.1, "a finite number > 0"),
    ("num_epochs", 0, "a finite number > 0"),
    ("eval_every_epochs", 0, "an integer >= 1"),
    ("log_every_steps", 0, "an integer >= 1"),
    ("label_smoothing", 1.5, "a number in [0, 1)"),
    ("mixup_alpha", -1.0, "a finite number >= 0"),
    ("keep_checkpoints", -1, "an integer >= 1"),
    ("checkpoint_every_steps", -5, "an integer >= 0"),
    ("optimizer.momentum", 1.5, "a number in [0, 1)"),
    ("optimizer.name", "lamb", "'sgd', 'adam', 'adamw'"),
    ("model.act", "relu6", "'arelu', 'atac'"),
    ("model.name", "resnet9", "'alexnet_cifar'"),
    ("seed", -1, "an integer in [0, 2**32)"),
    ("dataset.std", (0.0,), "numbers > 0"),
    ("dataset.prefetch_buffer", 0, "an integer >= 1"),
    ("schedule.warmup_epochs", 5.0, "[0, num_epochs=2]"),
]


@pytest.mark.parametrize("key,value,accepted", BAD_VALUES, ids=[k for k, _, _ in BAD_VALUES])
def test_bad_value_is_refused_before_anything_is_written(tmp_path, key, value, accepted):
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError) as error:
    trainer.train_and_evaluate(small_quickstart_config(**{key: value}), str(workdir))
  message = str(error.value)
  shown = list(value) if isinstance(value, tuple) else value
  assert message.startswith(f"config.{key}={shown!r} is not accepted") and accepted in message
  assert "\n" not in message
  assert not workdir.exists()


def test_every_recipe_passes_validation():
  from atac_train import config_file  # pylint: disable=g-import-not-at-top
  import runpy  # pylint: disable=g-import-not-at-top
  for name in config_file.packaged_configs():
    validation.validate(runpy.run_path(config_file.resolve(name))["get_config"]())


def test_one_table_covers_every_config_key():
  """validation.settings() has exactly the keys of defaults.base_config(), and the keys resume
  accepts changes of are among them."""
  from atac_train import defaults, resume  # pylint: disable=g-import-not-at-top

  def leaves(tree, prefix=""):
    for key, value in tree.items():
      if isinstance(value, dict) and value and key != "options":
        yield from leaves(value, f"{prefix}{key}.")
      else:
        yield f"{prefix}{key}"

  keys = set(leaves(defaults.base_config().to_dict()))
  assert set(validation.settings()) == keys
  assert set(resume.RESUMABLE) < keys and "num_epochs" not in resume.RESUMABLE
  assert "dataset.num_workers" not in resume.RESUMABLE  # it shapes the saved iterator state


def test_workdir_that_is_a_file_or_not_writable(tmp_path):
  a_file = tmp_path / "notes.txt"
  a_file.write_text("x")
  with pytest.raises(WorkdirError, match="is a file, not a directory"):
    trainer.train_and_evaluate(small_quickstart_config(), str(a_file))
  with pytest.raises(WorkdirError, match="cannot be created: .*notes.txt is a file"):
    trainer.train_and_evaluate(small_quickstart_config(), str(a_file / "run"))
  # /proc/sys refuses new entries to everyone, root included.
  with pytest.raises(WorkdirError, match="cannot be created in /proc/sys"):
    trainer.train_and_evaluate(small_quickstart_config(), "/proc/sys/atac-run")


def test_unknown_tfds_name_is_one_line_with_suggestions():
  config = small_quickstart_config(**{"dataset.source": "tfds", "dataset.name": "cifar11"})
  with pytest.raises(ValueError) as error:
    trainer.setup(config, devices=jax.devices()[:1])
  message = str(error.value)
  assert "config.dataset.name='cifar11' is not a tfds dataset" in message
  assert "'cifar10'" in message and "\n" not in message and len(message) < 400


def _cli(*args, env=None, timeout=120):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", **(env or {}))
  return subprocess.run([sys.executable, "-m", "atac_train", "train", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _assert_one_line_error(result, *fragments):
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("atac-train: error: "), result.stderr[-2000:]
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


def test_config_file_errors_print_no_traceback(tmp_path):
  workdir = str(tmp_path / "run")
  _assert_one_line_error(_cli("--config", "configs/nope.py", "--workdir", workdir),
                         "configs/nope.py does not exist", "quickstart")
  syntax = tmp_path / "syntax.py"
  syntax.write_text("def get_config(:\n  pass\n")
  _assert_one_line_error(_cli("--config", str(syntax), "--workdir", workdir),
                         f"config file {syntax}, line 1", "invalid syntax")
  raising = tmp_path / "raising.py"
  raising.write_text("def get_config():\n  raise RuntimeError('no GPU quota')\n")
  _assert_one_line_error(_cli("--config", str(raising), "--workdir", workdir),
                         f"config file {raising}", "RuntimeError: no GPU quota")
  _assert_one_line_error(
      _cli("--config", "configs/quickstart.py", "--workdir", workdir, "--config.modle.act=relu"),
      "unknown key 'modle' in config", "Did you mean config.model?",
      "Valid keys of config: checkpoint_every_steps, dataset,")
  _assert_one_line_error(
      _cli("--config", "quickstart", "--workdir", workdir, "--config.model.actt=relu"),
      "unknown key 'actt' in config.model", "Did you mean config.model.act?",
      "Valid keys of config.model: act, name, options.")
  _assert_one_line_error(
      _cli("--config", "quickstart", "--workdir", workdir, "--config.eval_every_epochs=0"),
      "config.eval_every_epochs=0 is not accepted; accepted: an integer >= 1")
  assert not os.path.exists(workdir)


def test_bad_workdir_fails_before_training(tmp_path):
  a_file = tmp_path / "file"
  a_file.write_text("")
  _assert_one_line_error(_cli("--config", "quickstart", "--workdir", str(a_file)),
                         f"--workdir={a_file} is a file")


def _start(workdir, *, interrupt_at):
  """The trainer, told to send itself SIGINT at a named point (atac_train.hooks)."""
  # One CPU device, spelt as test_gcs_workdir.py's runs spell it: the same XLA flags make the same
  # programs, so the session's compilation cache serves both (see conftest.py).
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=cli_xla_flags(1),
             **{INTERRUPT_AT_ENV: interrupt_at})
  command = [sys.executable, "-m", "atac_train", "train", "--config", "quickstart", "--workdir",
             str(workdir), "--config.model.name=cifar_resnet8", "--config.global_batch_size=32",
             "--config.num_epochs=1", "--config.progress_bar=False"]
  return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


# moment -> the trainer's named point and how many SIGINTs arrive there
MOMENTS = {"importing": "import", "setup": "setup", "restore": "locked", "compile": "compile",
           "twice": "compile*2"}


@pytest.mark.slow  # starts trainer processes, two of which train a step
@pytest.mark.parametrize("moment", list(MOMENTS))
def test_ctrl_c_at_any_moment_exits_cleanly(tmp_path, moment):
  """SIGINT while importing, while loading data and tracing the model (before the workdir lock),
  right after taking the lock, before the first compile, and twice in a row."""
  workdir = tmp_path / "run"
  process = _start(workdir, interrupt_at=MOMENTS[moment])
  out, err = process.communicate(timeout=300)
  assert process.returncode in (0, 130), err[-3000:]  # never a crash (-11) or a traceback (1)
  assert "Traceback" not in err and "Segmentation" not in err and "Fatal" not in err
  if process.returncode == 0:  # stopped at a step boundary: the preempted record
    assert json.loads(out.strip().splitlines()[-1])["preempted"] is True
  else:
    assert err.strip().splitlines()[-1] == "atac-train: interrupted (SIGINT); exiting."
  assert not (workdir / "atac-train.lock").exists()
  # Before the lock nothing is listening yet, and a second Ctrl-C exits at once: 130. Once the
  # trainer listens, it stops at the next step boundary with the preempted record: 0.
  assert process.returncode == (130 if moment in ("importing", "setup", "twice") else 0)
