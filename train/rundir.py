"""Taking a workdir for a run: early checks, the lock, ``--fresh``, and the outputs on resume.

Order in :func:`atac_train.trainer.train_and_evaluate`: :func:`check` (a directory that can be
written) and the lock check happen before any work; :func:`hold` takes the lock (process 0) and
listens for SIGINT/SIGTERM; :func:`archive` moves an earlier run aside for ``--fresh``; once the
start step is known, :func:`prepare_outputs` writes ``config.json`` and trims the metrics.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from atac_jax import storage
from atac_jax.workdir import Layout, write_json
from atac_train import interrupts, metrics
from atac_train.errors import TrainingError, WorkdirError, describe
from atac_train.workdir_lock import WorkdirLock


def check(workdir: str) -> None:
  """Fails early for a ``--workdir`` that is a file or cannot be written.

  A local path is checked without writing; a URL (``gs://bucket/run``) must have a supported
  scheme and take a probe object, written and deleted here, so a wrong bucket or missing
  credentials stop the run before anything is compiled.

  Raises:
    WorkdirError: naming the path and the problem.
  """
  if storage.is_remote(workdir):
    _check_remote(workdir)
    return
  path = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"--workdir={workdir} is a file, not a directory; give a directory "
                       "(it is created if missing).")
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise WorkdirError(f"--workdir={workdir} cannot be created: {existing} is a file.")
  if not os.access(existing, os.W_OK | os.X_OK):
    what = "is not writable" if existing == path else f"cannot be created in {existing}"
    raise WorkdirError(f"--workdir={workdir} {what} (permission denied or read-only file "
                       "system); give a directory you can write to.")


def _check_remote(workdir: str) -> None:
  try:
    storage.check_scheme(workdir, what="--workdir")
  except storage.StorageError as e:
    raise WorkdirError(str(e)) from None
  probe = storage.join(storage.normalize(workdir),
                       f".atac-write-check-{socket.gethostname()}-{os.getpid()}")
  try:
    storage.write_atomic(probe, b"")
    storage.remove(probe)
  except Exception as e:  # pylint: disable=broad-except  # any client error means "cannot write"
    raise WorkdirError(f"--workdir={workdir} cannot be written ({describe(e)}); check the bucket "
                       "name, that it exists, and the credentials of this machine "
                       "(gcloud auth application-default login), or give a local path.") from None


def archive(layout: Layout) -> str | None:
  """Moves a run's outputs to ``DIR/archive/<time>/`` (``--fresh``); returns where, or None."""
  present = [p for p in layout.run_outputs() if storage.exists(p)]
  if not present:
    return None
  target = storage.join(layout.archive, time.strftime("%Y%m%dT%H%M%S", time.gmtime()))
  suffix = 0
  while storage.exists(target if not suffix else f"{target}-{suffix}"):
    suffix += 1
  target = target if not suffix else f"{target}-{suffix}"
  storage.makedirs(target)
  for path in present:
    storage.move(path, storage.join(target, storage.basename(path)))
  return target


def lead_only(fn: Callable[[], Any]) -> None:
  """Runs ``fn`` on process 0; a TrainingError there stops every process."""
  error = None
  if jax.process_index() == 0:
    try:
      fn()
    except TrainingError as e:
      error = e
  if jax.process_count() > 1:
    stopped = multihost_utils.process_allgather(np.array(error is not None))
    if np.any(stopped) and error is None:
      raise WorkdirError("Process 0 stopped; its error message says why.")
  if error is not None:
    raise error


@contextlib.contextmanager
def hold(layout: Layout) -> Iterator[None]:
  """Holds the workdir lock (process 0) and listens for SIGINT/SIGTERM inside the block."""
  lock = WorkdirLock(layout.lock)
  interrupts.add_cleanup(lock.release)  # an immediate exit (second Ctrl-C) releases it too
  try:
    with interrupts.listening():
      lead_only(lock.acquire)
      yield
  finally:
    interrupts.remove_cleanup(lock.release)
    lock.release()


def prepare_outputs(layout: Layout, *, start_step: int, config_dict: dict) -> None:
  """Process 0: config.json for this run; metrics, TensorBoard and PNG up to ``start_step``."""
  write_json(layout.config, config_dict)
  dropped = metrics.trim(layout.metrics, last_step=start_step)
  if dropped or (start_step == 0 and storage.isdir(layout.tensorboard)) or storage.isdir(
      layout.tensorboard + ".rebuild"):
    logging.warning("Dropped %d metrics.jsonl line(s) past step %d (they are trained again) and "
                    "rebuilt the TensorBoard events from metrics.jsonl.", dropped, start_step)
    metrics.rebuild_tensorboard(layout.root)
  metrics.plot(layout.root)
