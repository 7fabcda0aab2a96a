"""The errors ``atac-train`` reports as one line (``atac-train: error: ...``, exit status 2).

Each message names what is wrong (the key, the value, the path) and what is accepted or what to do.
"""

from __future__ import annotations

from atac_jax import storage


class TrainingError(Exception):
  """Base class: a problem with the user's settings or workdir, not a bug (no traceback)."""


class ConfigError(TrainingError, ValueError):
  """A config value, key or file that is not accepted."""


class WorkdirError(TrainingError):
  """A ``--workdir`` that cannot be used: a file, not writable, or in use by another trainer."""


class ResumeError(TrainingError):
  """The workdir holds a run this invocation must not silently continue or overwrite."""


class StorageFaultError(TrainingError):
  """Writing to the workdir failed (no space, quota, permission); what was saved is intact."""


class NonFiniteLossError(TrainingError, RuntimeError):
  """The training loss became NaN or infinite; no checkpoint is written after it."""


def describe(error: BaseException) -> str:
  """``Type: message`` on one line, shortened (see :func:`atac_jax.storage.describe_error`)."""
  return storage.describe_error(error)


# Substrings of OS, tensorstore and cloud-client errors -> what the user should fix.
_STORAGE_REASONS = (
    (("no space left", "resource_exhausted", "enospc", "disk quota"), "no space left"),
    (("quota", "429", "rate limit"), "storage quota or rate limit exceeded"),
    (("permission", "forbidden", "403", "401", "read-only file system", "access denied"),
     "permission denied"),
)


def storage_reason(error: BaseException) -> str:
  """A short cause for a failed write: 'no space left', 'permission denied', ... or the error."""
  text = str(error).lower()
  for needles, reason in _STORAGE_REASONS:
    if any(n in text for n in needles):
      return reason
  return describe(error)
