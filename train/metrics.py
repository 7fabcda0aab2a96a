"""Metric writers for the workdir: metrics.jsonl, TensorBoard events, learning curve, progress.

``metrics.jsonl`` is the record of a run; the TensorBoard events and ``learning_curve.png`` are
derived from it. On resume, :func:`trim` drops the rows past the restored step (rows of steps
that will be trained again), and :func:`rebuild_tensorboard` rewrites the events from what is
left, so every output holds each step once.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from typing import Any, Mapping

from atac_jax.workdir import Layout
from atac_train import plots


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
      self._tb = SummaryWriter(Layout(workdir).tensorboard, filename_suffix=_unique_suffix())

  def write(self, step: int, epoch: float, scalars: Mapping[str, Any]) -> None:
    """Appends one record (flushed, so a kill loses at most the line being written)."""
    if not self.enabled:
      return
    record = {"step": int(step), "epoch": round(float(epoch), 4)}
    record.update({k: _plain(v) for k, v in scalars.items()})
    with open(Layout(self.workdir).metrics, "a") as f:
      f.write(json.dumps(record) + "\n")
    _add_scalars(self._tb, record)
    self._tb.flush()

  def plot(self) -> None:
    """Redraws ``learning_curve.png`` from ``metrics.jsonl``."""
    if self.enabled:
      plot(self.workdir)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _unique_suffix() -> str:
  """Event files are named by the second they were opened in; two writers opened within one
  second (a rebuild, then the resumed run's writer) would otherwise overwrite each other."""
  return f".{os.getpid()}.{time.time_ns()}"


def plot(workdir: str) -> None:
  """Draws ``workdir/learning_curve.png`` from ``workdir/metrics.jsonl`` (if there is one)."""
  layout = Layout(workdir)
  if os.path.exists(layout.metrics):
    plots.plot_learning_curves({os.path.basename(layout.root): plots.read_metrics(layout.metrics)},
                               layout.curve)


def _add_scalars(tb: Any, record: Mapping[str, Any]) -> None:
  for key, value in record.items():
    if key not in ("step", "epoch") and isinstance(value, (int, float)) and math.isfinite(value):
      tb.add_scalar(key, value, record["step"])


def _read_lines(path: str) -> list[str]:
  try:
    with open(path) as f:
      return f.readlines()
  except FileNotFoundError:
    return []


def trim(path: str, *, last_step: int) -> int:
  """Keeps the rows of ``metrics.jsonl`` up to ``last_step``; the file is replaced atomically.

  Rows past ``last_step`` (written after the checkpoint that was restored) and unreadable lines
  (a line torn by a kill) are dropped.

  Returns:
    The number of lines dropped (0: the file was left untouched).
  """
  lines = _read_lines(path)
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
      if isinstance(record, dict) and int(record["step"]) <= last_step:
        kept.append(line if line.endswith("\n") else line + "\n")
    except (ValueError, KeyError, TypeError):
      continue
  dropped = len(lines) - len(kept)
  if dropped:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  return dropped


def rebuild_tensorboard(workdir: str) -> None:
  """Rewrites ``workdir/tensorboard`` from ``metrics.jsonl`` (each step once)."""
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  target = Layout(workdir).tensorboard
  fresh, old = target + ".rebuild", target + ".old"
  for leftover in (fresh, old):  # of an earlier rebuild that was killed
    shutil.rmtree(leftover, ignore_errors=True)
  tb = SummaryWriter(fresh, filename_suffix=_unique_suffix())
  path = Layout(workdir).metrics
  for record in (plots.read_metrics(path) if os.path.exists(path) else []):
    _add_scalars(tb, record)
  tb.close()
  if os.path.exists(target):
    os.rename(target, old)
  os.rename(fresh, target)
  shutil.rmtree(old, ignore_errors=True)


def final_record(path: str, *, step: int) -> dict[str, Any]:
  """The metrics logged at ``step`` (train and eval rows merged), for a run that is finished."""
  record: dict[str, Any] = {}
  for row in plots.read_metrics(path) if os.path.exists(path) else []:
    if row.get("step") == step:
      record.update({k: v for k, v in row.items() if k not in ("step", "epoch")})
  return record


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
