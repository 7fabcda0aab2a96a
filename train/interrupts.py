"""Ctrl-C and SIGTERM without tracebacks or crashes, for the CLIs and the training loop.

A ``KeyboardInterrupt`` that unwinds through JAX (say, mid-compile) while Orbax or grain threads
still run can end the interpreter in a segmentation fault at shutdown. So signals never raise:

- While a training loop is :func:`listening`, the first SIGINT/SIGTERM only sets a flag; the loop
  checks it at step boundaries, saves a checkpoint and returns with ``preempted``. A second signal
  exits at once.
- Otherwise (or on the second signal) the process exits at once with status ``128 + signal``
  (130 for Ctrl-C) after running the registered cleanups (the workdir lock): ``os._exit`` skips
  the interpreter's teardown, which is safe because Orbax writes checkpoints atomically.

The CLIs call :func:`install` before they import JAX (see :mod:`atac_train.cli`); code that calls
``train_and_evaluate`` directly gets the flag behaviour for the duration of the call.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _State:
  requested = False  # a signal arrived while listening
  listeners = 0  # nesting depth of listening()
  cleanups: list[Callable[[], None]] = []


def _run_cleanups() -> None:
  for cleanup in reversed(list(_State.cleanups)):
    try:
      cleanup()
    except Exception:  # pylint: disable=broad-except  # exiting anyway
      pass


def _exit_now(signum: int) -> None:
  _run_cleanups()
  name = signal.Signals(signum).name
  try:
    sys.stdout.flush()
    sys.stderr.write(f"{os.path.basename(sys.argv[0] or 'atac')}: interrupted ({name}); "
                     "exiting.\n")
    sys.stderr.flush()
  finally:
    os._exit(128 + signum)  # pylint: disable=protected-access


def _handle(signum: int, frame) -> None:  # pylint: disable=unused-argument
  if _State.listeners and not _State.requested:
    _State.requested = True
    sys.stderr.write(f"\n{signal.Signals(signum).name} received: stopping at the next step "
                     "boundary and saving a checkpoint; send it again to exit now without "
                     "saving.\n")
    sys.stderr.flush()
    return
  _exit_now(signum)


def install() -> None:
  """Routes SIGINT and SIGTERM to this module for the whole process (CLIs call it first)."""
  for sig in SIGNALS:
    signal.signal(sig, _handle)


def installed() -> bool:
  """Whether :func:`install` (or an enclosing :func:`listening`) handles SIGINT now."""
  return signal.getsignal(signal.SIGINT) is _handle


@contextlib.contextmanager
def listening() -> Iterator[None]:
  """Within the block, the first SIGINT/SIGTERM sets :func:`requested` instead of exiting.

  Installs the handler for the duration of the block when called on the main thread and it is not
  installed yet (then the previous handlers come back afterwards); elsewhere signals keep
  whatever handling the process has.
  """
  previous = {}
  if threading.current_thread() is threading.main_thread() and not installed():
    previous = {sig: signal.signal(sig, _handle) for sig in SIGNALS}
  _State.listeners += 1
  _State.requested = False
  try:
    yield
  finally:
    _State.listeners -= 1
    for sig, handler in previous.items():
      signal.signal(sig, handler)


def requested() -> bool:
  """Whether a SIGINT/SIGTERM arrived since the current :func:`listening` block began."""
  return _State.requested


def add_cleanup(cleanup: Callable[[], None]) -> None:
  """Runs ``cleanup`` before an immediate exit (e.g. to release the workdir lock)."""
  _State.cleanups.append(cleanup)


def remove_cleanup(cleanup: Callable[[], None]) -> None:
  if cleanup in _State.cleanups:
    _State.cleanups.remove(cleanup)
