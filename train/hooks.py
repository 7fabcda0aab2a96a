"""Named points of a run at which tests stop it, instead of timing a signal from outside.

A test sets one of these in the trainer's environment; nothing happens without them:

- ``ATAC_TRAIN_KILL_AT=NAME:STEP``: SIGKILL at point NAME of step STEP (``checkpoint_saving``:
  the save of STEP was handed to Orbax's background writer and is not finished;
  ``checkpoint_saved``: it is finished).
- ``ATAC_TRAIN_INTERRUPT_AT=NAME`` or ``NAME*N``: SIGINT, N times (default once), at point NAME
  (``import``: before the command's modules import JAX; ``setup``: loading data and tracing the
  model, before the workdir lock; ``locked``: right after taking the lock; ``compile``: before
  the first step compiles).
"""

from __future__ import annotations

import os
import signal
from typing import Callable

KILL_AT_ENV = "ATAC_TRAIN_KILL_AT"
INTERRUPT_AT_ENV = "ATAC_TRAIN_INTERRUPT_AT"


def reached(name: str, step: int | None = None, *,
            before_kill: Callable[[], None] | None = None) -> None:
  """Signals this process if the environment names this point (see the module docstring)."""
  kill = os.environ.get(KILL_AT_ENV)
  if kill and kill == (name if step is None else f"{name}:{step}"):
    if before_kill is not None:
      before_kill()
    os.kill(os.getpid(), signal.SIGKILL)
  point, _, count = os.environ.get(INTERRUPT_AT_ENV, "").partition("*")
  if point == name:
    for _ in range(int(count or 1)):
      os.kill(os.getpid(), signal.SIGINT)
