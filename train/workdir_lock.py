"""One trainer per workdir: ``DIR/atac-train.lock`` names the process that is writing ``DIR``.

The lock file is created with ``O_EXCL`` and holds the holder's host, pid, process start time and
command. A second trainer finds it and stops at once with a message naming the holder. A lock
left by a process that is gone (a kill, a crash, a reboot) is taken over with a warning when the
holder was on this host (its pid is not running, or now belongs to a process that started at
another time); a lock of another host cannot be checked, so the message says how to remove it.
In multi-host runs process 0 holds it for all.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

from absl import logging

from atac_train.errors import WorkdirError


class WorkdirLockedError(WorkdirError):
  """The workdir is in use by another trainer."""


def _start_time(pid: int) -> str | None:
  """The process's start time in clock ticks since boot (Linux), or None where unknown."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive(pid: int, start_time: str | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    pass
  current = _start_time(pid)
  return start_time is None or current is None or current == start_time


def _describe(holder: dict) -> str:
  started = holder.get("started")
  since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
  return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {since}: "
          f"{holder.get('command', '?')}")


class WorkdirLock:
  """The lock of one workdir.

  Args:
    path: the lock file (``Layout(workdir).lock``).
  """

  def __init__(self, path: str):
    self.path = path
    self.held = False

  def holder(self) -> dict | None:
    """The recorded holder, ``{}`` for an unreadable lock file, or None when there is none."""
    try:
      with open(self.path) as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}

  def _stale(self, holder: dict) -> bool:
    if not holder:  # empty or torn: a writer that died between create and write
      try:
        return time.time() - os.path.getmtime(self.path) > 10
      except FileNotFoundError:
        return True
    if holder.get("host") != socket.gethostname():
      return False
    return not _alive(int(holder.get("pid", -1)), holder.get("start_time"))

  def check(self) -> None:
    """Raises WorkdirLockedError if a live trainer holds the lock (writes nothing)."""
    holder = self.holder()
    if holder is not None and not self._stale(holder):
      raise self._locked_error(holder)

  def _locked_error(self, holder: dict) -> WorkdirLockedError:
    workdir = os.path.dirname(self.path)
    if holder and holder.get("host") != socket.gethostname():
      hint = (f"if that process is gone, delete {self.path} (a lock of another host cannot be "
              "checked from here)")
    else:
      hint = "wait for it to finish, stop it, or use another --workdir"
    return WorkdirLockedError(f"{workdir} is in use by another atac-train ({_describe(holder)})"
                              f"; {hint}.")

  def acquire(self) -> None:
    """Takes the lock (creating the workdir), taking over a stale one with a warning.

    Raises:
      WorkdirLockedError: if a live trainer holds it.
      WorkdirError: if the lock file cannot be created.
    """
    record = {"host": socket.gethostname(), "pid": os.getpid(),
              "start_time": _start_time(os.getpid()), "started": time.time(),
              "command": " ".join(sys.argv)}
    try:
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
    except OSError as e:
      raise WorkdirError(f"Cannot create the workdir {os.path.dirname(self.path)}: "
                         f"{e.strerror}.") from e
    for _ in range(10):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self.holder()
        if holder is None:
          continue  # released meanwhile
        if not self._stale(holder):
          raise self._locked_error(holder) from None
        logging.warning("Taking over the lock of %s left by a trainer that is no longer running "
                        "(%s).", os.path.dirname(self.path), _describe(holder))
        stale = f"{self.path}.stale-{os.getpid()}"
        try:
          os.rename(self.path, stale)  # atomic: of two trainers taking over, one wins
          os.remove(stale)
        except FileNotFoundError:
          pass
        continue
      except OSError as e:
        raise WorkdirError(f"Cannot create the lock file {self.path}: {e.strerror}.") from e
      with os.fdopen(fd, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
      self.held = True
      self._record = record
      return
    raise WorkdirError(f"Could not take the lock {self.path}; another trainer keeps taking it.")

  def release(self) -> None:
    """Removes the lock file if this process holds it."""
    if not self.held:
      return
    self.held = False
    holder = self.holder()
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass
