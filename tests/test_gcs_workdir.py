"""Workdirs on Cloud Storage, end to end against the local GCS server (tests/gcs_server.py), and
storage faults (a full disk, an unwritable bucket) reported in one line with nothing lost."""

import json
import os
import shutil
import subprocess
import sys
import uuid

import jax
import numpy as np
import pytest

from atac_jax import checkpoint, storage
from atac_jax.workdir import Layout
from atac_train import rundir
from atac_train.hooks import KILL_AT_ENV
from conftest import cli_xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IGNORED = ("train/images_per_second",)  # wall-clock


def _command(workdir, *extra):
  """cifar_resnet8 on digits, one epoch of 44 steps, a checkpoint every 20 steps."""
  return [sys.executable, "-m", "atac_train", "train", "--config",
          os.path.join(REPO, "configs", "quickstart.py"), "--workdir", str(workdir),
          "--config.model.name=cifar_resnet8", "--config.global_batch_size=32",
          "--config.num_epochs=1", "--config.checkpoint_every_steps=20",
          "--config.progress_bar=False", *extra]


def _env(gcs_env=None, **extra):
  env = dict(os.environ, XLA_FLAGS=cli_xla_flags(1),
             JAX_PLATFORMS="cpu", **(gcs_env or {}), **extra)
  return env


def _run(command, env, **kwargs):
  return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                        **kwargs)


def _rows(workdir):
  return [{k: v for k, v in json.loads(line).items() if k not in IGNORED}
          for line in storage.read_text(Layout(workdir).metrics).splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The same run, uninterrupted, in a local workdir."""
  workdir = tmp_path_factory.mktemp("gcs_reference") / "run"
  result = _run(_command(workdir), _env())
  assert result.returncode == 0, result.stderr[-3000:]
  return str(workdir)


@pytest.mark.slow
def test_a_bucket_workdir_trains_resumes_after_sigkill_and_evaluates(gcs, reference):
  workdir = f"gs://bkt/run-{uuid.uuid4().hex[:8]}"
  killed = _run(_command(workdir), _env(gcs, **{KILL_AT_ENV: "checkpoint_saved:20"}))
  assert killed.returncode == -9, killed.stderr[-3000:]
  assert storage.exists(Layout(workdir).lock)  # the killed trainer could not release it
  assert checkpoint.available_steps(workdir) == [20]

  resumed = _run(_command(workdir), _env(gcs))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Taking over the lock" in resumed.stderr and "Resumed from step 20" in resumed.stderr
  assert "credentials" not in resumed.stderr  # gcsfs's warnings are not shown
  assert not storage.exists(Layout(workdir).lock)
  assert _rows(workdir) == _rows(reference)  # an exact resume, each step once
  for name in ("config.json", "learning_curve.png", "tensorboard", "checkpoints"):
    assert storage.exists(storage.join(workdir, name)), name
  assert storage.read_bytes(Layout(workdir).curve)[:8] == b"\x89PNG\r\n\x1a\n"

  evaluated = _run([sys.executable, "-m", "atac_train", "eval", "--workdir", workdir],
                   _env(gcs))
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  final = json.loads(evaluated.stdout.strip().splitlines()[-1])
  assert final["step"] == 44
  assert final["eval/accuracy"] == _rows(reference)[-1]["eval/accuracy"]

  # Loaded in this process from the bucket, the weights are the uninterrupted run's.
  _, from_bucket, config = checkpoint.load(workdir)
  _, from_disk, _ = checkpoint.load(reference)
  assert config["model"]["name"] == "cifar_resnet8"
  jax.tree.map(np.testing.assert_array_equal, from_bucket, from_disk)

  archived = rundir.archive(Layout(workdir))  # what --fresh does first
  assert archived.startswith(f"{workdir}/archive/")
  assert not any(storage.exists(p) for p in Layout(workdir).run_outputs())
  assert sorted(storage.listdir(archived)) == ["checkpoints", "config.json",
                                               "learning_curve.png", "metrics.jsonl",
                                               "tensorboard"]


def test_an_unwritable_bucket_or_scheme_is_refused_before_compiling(gcs):
  for workdir, expected in (("gs://no-such-bucket/run", "cannot be written"),
                            ("ftp://host/run", "the scheme ftp:// is not supported")):
    result = _run(_command(workdir), _env(gcs))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("atac-train: error: --workdir=") and expected in lines[-1]
    assert not any(line.startswith(("Traceback", "E1", "W1")) for line in lines), lines
  assert not os.path.exists(os.path.join(REPO, "gs:")) and not os.path.exists("gs:")


def _mount_tmpfs(path, size):
  os.makedirs(path, exist_ok=True)
  result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
  if result.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()})")


def _tree_bytes(path):
  """Bytes a tmpfs charges for the files under ``path`` (whole 4 KiB pages)."""
  return sum(-(-os.path.getsize(os.path.join(root, name)) // 4096) * 4096
             for root, _, names in os.walk(path) for name in names)


@pytest.mark.slow
def test_disk_full_at_a_checkpoint_is_one_line_and_loses_nothing(tmp_path, reference):
  """A disk with room for one checkpoint: the second save fails with one line naming the step,
  the folder and the last good step; after space is freed the same command resumes."""
  last = checkpoint.available_steps(reference)[-1]
  step_bytes = _tree_bytes(os.path.join(reference, "checkpoints", str(last)))
  assert step_bytes > 100_000
  mount = tmp_path / "small_disk"
  _mount_tmpfs(mount, 4096 * (int(1.5 * step_bytes) // 4096 + 64))  # + 256 KiB for the logs
  try:
    workdir = mount / "run"
    full = _run(_command(workdir), _env())
    assert full.returncode == 2
    lines = [line for line in full.stderr.splitlines() if line.strip()]
    error = lines[-1]
    assert error.startswith("atac-train: error: Could not save checkpoint step 40 to "
                            f"{workdir}/checkpoints: no space left"), error
    assert "the last good checkpoint is step 20; re-run the same command" in error
    assert len(lines) <= 3, lines  # the error, and at most the curve's and TensorBoard's warnings
    details = error.rsplit("(details: ", 1)[1].rstrip(")")
    with open(details) as f:
      assert "No space left on device" in f.read()  # the background tracebacks went here
    os.remove(details)
    assert checkpoint.available_steps(str(workdir)) == [20]

    subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
    resumed = _run(_command(workdir), _env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from step 20" in resumed.stderr
    assert _rows(str(workdir)) == _rows(reference)
  finally:
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)
    shutil.rmtree(mount, ignore_errors=True)
