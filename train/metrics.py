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
import tempfile
import time
from typing import Any, Mapping

from absl import logging

from atac_jax import storage
from atac_jax.workdir import Layout
from atac_train import plots
from atac_train.errors import StorageFaultError, describe, storage_reason


class MetricWriter:
  """Writes metric records on process 0 only; other processes get a no-op writer.

  Each record goes to ``metrics.jsonl`` (one JSON object per line, always with ``step`` and
  ``epoch``) and to TensorBoard (tensorboardX, no TensorFlow needed). For a workdir on an object
  store the events are written to a local folder and each flush uploads them
  (:class:`_TensorBoard`).
  """

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.workdir = workdir
    self.enabled = enabled
    self._tb = _TensorBoard(Layout(workdir).tensorboard) if enabled else None

  def write(self, step: int, epoch: float, scalars: Mapping[str, Any]) -> None:
    """Appends one record (flushed, so a kill loses at most the line being written)."""
    if not self.enabled:
      return
    record = {"step": int(step), "epoch": round(float(epoch), 4)}
    record.update({k: _plain(v) for k, v in scalars.items()})
    path = Layout(self.workdir).metrics
    try:
      storage.append_text(path, json.dumps(record) + "\n")
    except OSError as error:
      raise StorageFaultError(
          f"Could not write {path} at step {step}: {storage_reason(error)} ({describe(error)}). "
          "Checkpoints already saved are intact; fix the cause and re-run the same command to "
          "resume.") from None
    self._tb.add(record)
    self._tb.flush()

  def plot(self) -> None:
    """Redraws ``learning_curve.png`` from ``metrics.jsonl``; a failure is only a warning (the
    curve is derived, and its error must not hide the one that matters)."""
    if self.enabled:
      plot(self.workdir)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class _TensorBoard:
  """A tensorboardX writer for a local or remote ``tensorboard`` folder.

  tensorboardX writes only local files (and a few object stores of its own, with their own
  credentials), so for a remote folder it writes into a local staging folder and
  :meth:`flush` uploads the event file whole (event files are small: one scalar per key and log
  step).
  """

  def __init__(self, folder: str):
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self.folder = folder
    self._staging = tempfile.mkdtemp(prefix="atac_tb_") if storage.is_remote(folder) else None
    if self._staging is None:
      os.makedirs(folder, exist_ok=True)
    self._writer = SummaryWriter(self._staging or folder, filename_suffix=_unique_suffix())
    self._warned = False

  def add(self, record: Mapping[str, Any]) -> None:
    _add_scalars(self._writer, record)

  def flush(self) -> None:
    """Writes the events out; a failure is one warning (the events are derived from metrics)."""
    try:
      self._writer.flush()
      if self._staging is not None:
        for name in os.listdir(self._staging):
          with open(os.path.join(self._staging, name), "rb") as f:
            storage.write_atomic(storage.join(self.folder, name), f.read())
    except Exception as error:  # pylint: disable=broad-except
      if not self._warned:
        self._warned = True
        logging.warning("Could not write TensorBoard events to %s (%s); they are rebuilt from "
                        "metrics.jsonl on resume.", self.folder, describe(error))

  def close(self) -> None:
    self.flush()
    try:
      self._writer.close()
    except Exception:  # pylint: disable=broad-except  # flush() has warned already
      pass
    if self._staging is not None:
      shutil.rmtree(self._staging, ignore_errors=True)


def _unique_suffix() -> str:
  """Event files are named by the second they were opened in; two writers opened within one
  second (a rebuild, then the resumed run's writer) would otherwise overwrite each other."""
  return f".{os.getpid()}.{time.time_ns()}"


def plot(workdir: str) -> None:
  """Draws ``workdir/learning_curve.png`` from ``workdir/metrics.jsonl`` (if there is one).

  A failure (e.g. no space left) is logged as one warning line and not raised: the curve is
  derived from metrics.jsonl, and its error must never mask the one that stops a run.
  """
  layout = Layout(workdir)
  try:
    if storage.exists(layout.metrics):
      plots.plot_learning_curves(
          {storage.basename(layout.root): plots.read_metrics(layout.metrics)}, layout.curve)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("Could not draw %s (%s); training goes on.", layout.curve, describe(e))


def _add_scalars(tb: Any, record: Mapping[str, Any]) -> None:
  for key, value in record.items():
    if key not in ("step", "epoch") and isinstance(value, (int, float)) and math.isfinite(value):
      tb.add_scalar(key, value, record["step"])


def _read_lines(path: str) -> list[str]:
  try:
    return storage.read_text(path).splitlines(keepends=True)
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
    storage.write_atomic(path, "".join(kept))
  return dropped


def rebuild_tensorboard(workdir: str) -> None:
  """Rewrites ``workdir/tensorboard`` from ``metrics.jsonl`` (each step once).

  The new events are written beside the old (``tensorboard.rebuild``) and swapped in, so a kill
  leaves either folder complete.
  """
  target = Layout(workdir).tensorboard
  fresh, old = target + ".rebuild", target + ".old"
  for leftover in (fresh, old):  # of an earlier rebuild that was killed
    storage.rmtree(leftover)
  tb = _TensorBoard(fresh)
  path = Layout(workdir).metrics
  for record in (plots.read_metrics(path) if storage.exists(path) else []):
    tb.add(record)
  tb.close()
  if storage.exists(target):
    storage.move(target, old)
  storage.move(fresh, target)
  storage.rmtree(old)


def final_record(path: str, *, step: int) -> dict[str, Any]:
  """The metrics logged at ``step`` (train and eval rows merged), for a run that is finished."""
  record: dict[str, Any] = {}
  for row in plots.read_metrics(path) if storage.exists(path) else []:
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
