"""Workdir writers: metrics.jsonl records, TensorBoard events, the learning-curve PNG."""

import json
import os

from PIL import Image

from atac_train import plots
from atac_train.metrics import MetricWriter


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
