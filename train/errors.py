"""The errors ``atac-train`` reports as one line (``atac-train: error: ...``, exit status 2).

Each message names what is wrong (the key, the value, the path) and what is accepted or what to do.
"""

from __future__ import annotations


class TrainingError(Exception):
  """Base class: a problem with the user's settings or workdir, not a bug (no traceback)."""


class ConfigError(TrainingError, ValueError):
  """A config value, key or file that is not accepted."""


class WorkdirError(TrainingError):
  """A ``--workdir`` that cannot be used: a file, not writable, or in use by another trainer."""


class ResumeError(TrainingError):
  """The workdir holds a run this invocation must not silently continue or overwrite."""


class NonFiniteLossError(TrainingError, RuntimeError):
  """The training loss became NaN or infinite; no checkpoint is written after it."""
