"""Keeps the tracebacks of Orbax's and asyncio's background threads off the console.

When a checkpoint write fails (no space, a revoked permission), Orbax's save threads, tensorstore
and asyncio each log the same failure with a traceback: hundreds of lines that bury the one
error line the trainer prints (:class:`atac_train.errors.StorageFaultError`). :func:`divert`
sends their records to a log file instead; the error line names that file.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import sys
import tempfile
import warnings

# Loggers whose records go to the file: Orbax (save threads), asyncio ("exception was never
# retrieved" at exit), and the trainer's own record of a failed save.
DIVERTED = ("orbax", "asyncio", "atac_train.checkpointing")


class _Diverted(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    return not _diverted(record)


def _diverted(record: logging.LogRecord) -> bool:
  # Orbax logs through absl (logger "absl"), so its records are known by their source file.
  return record.levelno >= logging.WARNING and (
      any(record.name == n or record.name.startswith(n + ".") for n in DIVERTED) or
      f"{os.sep}orbax{os.sep}" in (record.pathname or ""))


class _FileHandler(logging.FileHandler):
  """Writes only the diverted records; a failing write (the disk that is full) is ignored."""

  def __init__(self, path: str):
    super().__init__(path, delay=True)
    self.addFilter(_diverted)
    self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

  def handleError(self, record: logging.LogRecord) -> None:
    del record


_path: str | None = None


def divert() -> str:
  """Routes the background loggers' warnings and errors to a local log file; returns its path.

  The file lives in the system's temporary folder, not the workdir: the workdir may be the disk
  that is full, or an object store.
  """
  global _path
  if _path is not None:
    return _path
  _path = os.path.join(tempfile.gettempdir(),
                       f"atac-train-{socket.gethostname()}-{os.getpid()}.log")
  root = logging.getLogger()
  for handler in root.handlers:
    handler.addFilter(_Diverted())
  root.addHandler(_FileHandler(_path))
  # tensorstore completes Orbax's futures from its own threads through the event loop; once a
  # failed save has closed the loop, each late completion reports "Event loop is closed" as an
  # unraisable exception (or through sys.excepthook), and the abandoned writes warn that their
  # coroutines were never awaited.
  sys.excepthook = functools.partial(_excepthook, sys.excepthook)
  sys.unraisablehook = functools.partial(_unraisablehook, sys.unraisablehook)
  warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited",
                          category=RuntimeWarning)
  return _path


def _closed_loop(exc: BaseException | None) -> bool:
  return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _excepthook(original, exc_type, exc, traceback) -> None:
  if _closed_loop(exc):
    logging.getLogger("asyncio").warning("Late completion after the event loop closed.",
                                         exc_info=(exc_type, exc, traceback))
    return
  original(exc_type, exc, traceback)


def _unraisablehook(original, unraisable) -> None:
  if _closed_loop(unraisable.exc_value):
    logging.getLogger("asyncio").warning(
        "Late completion after the event loop closed.",
        exc_info=(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback))
    return
  original(unraisable)


def written() -> str | None:
  """The log file's path if anything was written to it."""
  return _path if _path and os.path.exists(_path) and os.path.getsize(_path) else None
