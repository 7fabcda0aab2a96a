"""Metric writers for the workdir: metrics.jsonl, TensorBoard events, learning curve, progress."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

from train import plots


class MetricWriter:
  """Writes metric records on process 0 only; other processes get a no-op writer.

  Each record goes to ``metrics.jsonl`` (one JSON object per line, always with ``step`` and
  ``epoch``) and to TensorBoard (tensorboardX, no TensorFlow needed).
  """

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.workdir = workdir
    self.enabled = enabled
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      os.makedirs(workdir, exist_ok=True)
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, epoch: float, scalars: Mapping[str, Any]) -> None:
    """Appends one record (flushed, so a kill loses at most the line being written)."""
    if not self.enabled:
      return
    record = {"step": int(step), "epoch": round(float(epoch), 4)}
    record.update({k: _plain(v) for k, v in scalars.items()})
    with open(os.path.join(self.workdir, "metrics.jsonl"), "a") as f:
      f.write(json.dumps(record) + "\n")
    for key, value in record.items():
      if key not in ("step", "epoch") and isinstance(value, (int, float)) and math.isfinite(value):
        self._tb.add_scalar(key, value, step)
    self._tb.flush()

  def plot(self) -> None:
    """Redraws ``learning_curve.png`` from ``metrics.jsonl``."""
    if self.enabled and os.path.exists(os.path.join(self.workdir, "metrics.jsonl")):
      plots.plot_learning_curves({os.path.basename(os.path.normpath(self.workdir)):
                                  plots.read_metrics(self.workdir)},
                                 os.path.join(self.workdir, "learning_curve.png"))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _plain(value: Any) -> Any:
  if hasattr(value, "item"):
    value = value.item()
  return value


class Progress:
  """A tqdm progress bar with loss, accuracy and images/s (ETA from tqdm), on process 0."""

  def __init__(self, *, total: int, initial: int, enabled: bool):
    self._bar = None
    if enabled:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                       file=sys.stderr, mininterval=1.0)

  def update(self, steps: int, **postfix: Any) -> None:
    if self._bar is not None:
      self._bar.update(steps)
      if postfix:
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


class Throughput:
  """Images per second between successive calls of :meth:`measure`."""

  def __init__(self):
    self._time = time.perf_counter()

  def measure(self, images: int) -> float:
    now = time.perf_counter()
    rate = images / max(now - self._time, 1e-9)
    self._time = now
    return rate
