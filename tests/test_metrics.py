"""Workdir writers: metrics.jsonl records, TensorBoard events, the learning-curve PNG."""

import json
import os

import pytest
from PIL import Image

from atac_train import metrics, plots
from atac_train.metrics import MetricWriter
from conftest import tensorboard_scalars


def test_writer_records_and_curve(tmp_path):
  writer = MetricWriter(str(tmp_path))
  writer.write(10, 0.5, {"train/loss": 2.0, "train/accuracy": 0.3})
  writer.write(20, 1.0, {"eval/loss": 1.5, "eval/accuracy": 0.6, "eval/num_examples": 360})
  writer.plot()
  writer.close()
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert records == [{"step": 10, "epoch": 0.5, "train/loss": 2.0, "train/accuracy": 0.3},
                     {"step": 20, "epoch": 1.0, "eval/loss": 1.5, "eval/accuracy": 0.6,
                      "eval/num_examples": 360}]
  assert any(name.startswith("events.out.tfevents") for name in
             os.listdir(tmp_path / "tensorboard"))
  with Image.open(tmp_path / "learning_curve.png") as image:
    assert image.format == "PNG" and image.size == (1000, 400)


def test_disabled_writer_writes_nothing(tmp_path):
  writer = MetricWriter(str(tmp_path / "w"), enabled=False)
  writer.write(1, 0.1, {"train/loss": 1.0})
  writer.plot()
  writer.close()
  assert not os.path.exists(tmp_path / "w")


def test_read_metrics_skips_a_torn_last_line(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "epoch": 0.1}\n{"step": 2, "ep')
  assert plots.read_metrics(str(tmp_path)) == [{"step": 1, "epoch": 0.1}]


def test_trim_and_rebuild_keep_each_step_once(tmp_path):
  """Resume at step 30: rows 40 and 50 (and a torn line) go, TensorBoard follows, and the
  resumed run's writer (opened within the same second) adds to the rebuilt events."""
  workdir = str(tmp_path)
  writer = MetricWriter(workdir)
  for step in (10, 20, 30, 40, 50):
    writer.write(step, step / 20, {"train/loss": 1.0 / step})
  writer.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 60, "ep')
  assert metrics.trim(str(tmp_path / "metrics.jsonl"), last_step=30) == 3
  assert [r["step"] for r in plots.read_metrics(workdir)] == [10, 20, 30]
  metrics.rebuild_tensorboard(workdir)
  writer = MetricWriter(workdir)
  writer.write(40, 2.0, {"train/loss": 0.5})
  writer.close()
  scalars = tensorboard_scalars(str(tmp_path / "tensorboard"))
  assert scalars == {("train/loss", 10): [pytest.approx(0.1)],
                     ("train/loss", 20): [pytest.approx(0.05)],
                     ("train/loss", 30): [pytest.approx(1 / 30)], ("train/loss", 40): [0.5]}
  assert metrics.trim(str(tmp_path / "metrics.jsonl"), last_step=40) == 0  # nothing to drop
