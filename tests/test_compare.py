"""atac-compare: learning curves of several runs in one PNG, per-run summaries, clear errors."""

import json
import os
import subprocess
import sys

import jax
import pytest

from atac_train import compare, plots, trainer
from conftest import check_png, small_quickstart_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A hand-written run: eval accuracy peaks at epoch 2 (ties at 3), then drops.
HAND_RECORDS = [
    {"step": 5, "epoch": 0.5, "train/loss": 2.0, "train/accuracy": 0.2,
     "train/images_per_second": 10.0},
    {"step": 10, "epoch": 1.0, "train/loss": 1.5, "train/accuracy": 0.4,
     "train/images_per_second": 30.0},
    {"step": 10, "epoch": 1.0, "eval/loss": 1.4, "eval/accuracy": 0.5},
    {"step": 20, "epoch": 2.0, "train/loss": 1.0, "train/accuracy": 0.6,
     "train/images_per_second": 20.0},
    {"step": 20, "epoch": 2.0, "eval/loss": 1.1, "eval/accuracy": 0.7},
    {"step": 30, "epoch": 3.0, "train/loss": 0.8, "train/accuracy": 0.7,
     "train/images_per_second": 1000.0},
    {"step": 30, "epoch": 3.0, "eval/loss": 1.0, "eval/accuracy": 0.7},
    {"step": 40, "epoch": 4.0, "train/loss": 0.7, "train/accuracy": 0.75,
     "train/images_per_second": 25.0},
    {"step": 40, "epoch": 4.0, "eval/loss": 1.2, "eval/accuracy": 0.65},
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """One tiny trained run: ATAC cifar_resnet8, one epoch of the digits (on one device)."""
  config = small_quickstart_config(num_epochs=1)
  path = str(tmp_path_factory.mktemp("compare") / "atac_run")
  trainer.train_and_evaluate(config, path, devices=jax.devices()[:1])
  return path


@pytest.fixture
def hand_run(tmp_path):
  path = tmp_path / "relu_run"
  path.mkdir()
  with open(path / "metrics.jsonl", "w") as f:
    for record in HAND_RECORDS:
      f.write(json.dumps(record) + "\n")
    f.write('{"step": 41, "epo')  # a torn last line (killed mid-write) is skipped
  with open(path / "config.json", "w") as f:
    json.dump({"model": {"name": "cifar_resnet8", "act": "relu"}, "dataset": {"name": "digits"}},
              f)
  return str(path)


def test_summary_of_known_records(hand_run):
  summary = compare.summarize_run(hand_run)
  assert summary == {
      "label": "relu_run", "workdir": hand_run, "model": "cifar_resnet8", "act": "relu",
      "dataset": "digits", "final_step": 40, "final_epoch": 4.0, "final_eval_accuracy": 0.65,
      "best_eval_accuracy": 0.7, "best_epoch": 2.0, "final_eval_loss": 1.2,
      "final_train_loss": 0.7, "median_images_per_second": 25.0}


def test_cli_plots_runs_on_shared_axes(workdir, hand_run, tmp_path, capsys):
  out = str(tmp_path / "curves.png")
  assert compare.main([workdir, hand_run, "--labels", "atac,relu", "--out", out,
                       "--width", "9", "--height", "3.5", "--dpi", "80"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 2
  trained, hand = (json.loads(line) for line in lines)
  check_png(out, (720, 280))  # 9 x 3.5 inches at 80 dpi

  # The trained run's summary agrees with its metrics.jsonl, read independently.
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  evals = [r for r in records if "eval/accuracy" in r]
  assert trained["label"] == "atac" and trained["act"] == "atac"
  assert trained["model"] == "cifar_resnet8" and trained["workdir"] == workdir
  assert trained["final_step"] == 1437 // 32 == records[-1]["step"]
  assert trained["final_eval_accuracy"] == evals[-1]["eval/accuracy"]
  assert trained["best_eval_accuracy"] == max(r["eval/accuracy"] for r in evals)
  assert trained["final_train_loss"] == [r for r in records if "train/loss" in r][-1][
      "train/loss"]
  assert trained["median_images_per_second"] > 0
  assert hand["label"] == "relu" and hand["best_epoch"] == 2.0


def test_default_labels_and_size_of_plot_learning_curves(workdir, hand_run, tmp_path, capsys):
  out = str(tmp_path / "default.png")
  assert compare.main([workdir, hand_run, "--out", out]) == 0
  labels = [json.loads(line)["label"] for line in capsys.readouterr().out.splitlines()]
  assert labels == ["atac_run", "relu_run"]
  check_png(out, (1000, 400))  # plots.plot_learning_curves' default 10 x 4 inches, 100 dpi
  assert compare.run_labels(["a/run", "b/run"], None) == ["a/run", "b/run"]
  assert plots.read_metrics(hand_run) == HAND_RECORDS


def test_errors_are_clear(workdir, tmp_path, capsys):
  empty = str(tmp_path / "not_trained")
  os.makedirs(empty)
  out = str(tmp_path / "x.png")
  assert compare.main([workdir, empty, "--out", out]) == 2
  err = capsys.readouterr().err
  assert "No metrics.jsonl" in err and empty in err and "atac-train" in err
  assert compare.main([workdir, "--labels", "a,b", "--out", out]) == 2
  assert "one label per workdir" in capsys.readouterr().err
  assert not os.path.exists(out)


def test_command_exit_status(tmp_path):
  """The real process: a non-zero exit status and the message on stderr."""
  result = subprocess.run([sys.executable, "-m", "atac_train", "compare", str(tmp_path / "nothing"),
                           "--out", str(tmp_path / "x.png")], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
  assert result.returncode == 2
  assert "No metrics.jsonl" in result.stderr


def test_skipped_and_unreadable_lines_are_named(hand_run, tmp_path, capsys):
  metrics = os.path.join(hand_run, "metrics.jsonl")
  with open(metrics, "a") as f:  # after the torn line 10: a valid row, binary junk, a list
    f.write('\n{"step": 50, "epoch": 5.0, "train/loss": 0.6}\n')
  with open(metrics, "ab") as f:
    f.write(b"\xff\xfe\n[1, 2]\n")
  out = str(tmp_path / "x.png")
  assert compare.main([hand_run, "--out", out]) == 0
  err = capsys.readouterr().err.splitlines()
  assert err[0].startswith(f"atac-compare: warning: skipped {metrics} line 10: Invalid control")
  assert err[1:] == [f"atac-compare: warning: skipped {metrics} line 12: not UTF-8 text",
                     f"atac-compare: warning: skipped {metrics} line 13: not a JSON object "
                     "with 'step' and 'epoch'"]
  config = os.path.join(hand_run, "config.json")
  with open(config, "w") as f:
    f.write('{"model": {"name": "cifar_resnet8",\n "act": }}')
  assert compare.main([hand_run, "--out", out]) == 2
  assert f"atac-compare: error: {config} line 2: not valid JSON" in capsys.readouterr().err
