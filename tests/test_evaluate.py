"""atac-eval: one JSON line for a checkpoint, clear errors without one."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _atac_eval(*args):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "train.evaluate", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_prints_one_json_line_matching_training(trained_workdir):
  workdir, reference = trained_workdir
  result = _atac_eval("--workdir", workdir, "--split", "test")
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 1
  record = json.loads(lines[0])
  assert record["step"] == reference["step"] and record["split"] == "test"
  assert record["eval/num_examples"] == 360
  assert record["eval/accuracy"] == reference["eval/accuracy"]


def test_without_checkpoints_fails_clearly(tmp_path):
  result = _atac_eval("--workdir", str(tmp_path))
  assert result.returncode == 2
  assert "No checkpoint" in result.stderr and str(tmp_path) in result.stderr
