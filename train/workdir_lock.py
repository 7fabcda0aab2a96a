"""One trainer per workdir: ``DIR/atac-train.lock`` names the process that is writing ``DIR``.

The lock holds the holder's host, pid, process start time and command. A second trainer finds it
and stops at once with a message naming the holder. In multi-host runs process 0 holds it for all.

- Local filesystems: the file is created with ``O_EXCL``. A lock left by a process that is gone
  (a kill, a crash, a reboot) is taken over with a warning when the holder was on this host (its
  pid is not running, or now belongs to a process that started at another time); a lock of
  another host cannot be checked, so the message says how to remove it.
- Object stores (``gs://``): the object is created only if absent (fsspec's exclusive mode,
  which GCS enforces with an ``ifGenerationMatch=0`` precondition) and read back. The holder
  renews a lease in it every :data:`RENEW_SECONDS`; a lock of another host whose lease is older
  than :data:`LEASE_SECONDS` belongs to a trainer that is gone (a preempted VM) and is taken over
  with a warning, so a rescheduled job resumes by itself after at most that long.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

from absl import logging

from atac_jax import storage
from atac_train.errors import WorkdirError

# A remote holder rewrites its lock this often; a lock not renewed for LEASE_SECONDS is stale.
RENEW_SECONDS = 60.0
LEASE_SECONDS = 300.0


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
    self.remote = storage.is_remote(path)
    self._stop_renewing = threading.Event()
    self._renewer: threading.Thread | None = None

  def holder(self) -> dict | None:
    """The recorded holder, ``{}`` for an unreadable lock file, or None when there is none."""
    try:
      holder = json.loads(storage.read_text(self.path))
      return holder if isinstance(holder, dict) else {}
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}

  def _stale(self, holder: dict) -> bool:
    if not holder:  # empty or torn: a local writer that died between create and write
      if self.remote:
        return True  # an object is written whole: an unreadable one is no trainer's record
      try:
        return time.time() - os.path.getmtime(self.path) > 10
      except FileNotFoundError:
        return True
    if holder.get("host") != socket.gethostname():
      renewed = holder.get("renewed")
      return self.remote and renewed is not None and time.time() - renewed > LEASE_SECONDS
    return not _alive(int(holder.get("pid", -1)), holder.get("start_time"))

  def check(self) -> None:
    """Raises WorkdirLockedError if a live trainer holds the lock (writes nothing)."""
    holder = self.holder()
    if holder is not None and not self._stale(holder):
      raise self._locked_error(holder)

  def _locked_error(self, holder: dict) -> WorkdirLockedError:
    workdir = storage.dirname(self.path)
    if holder and holder.get("host") != socket.gethostname() and self.remote:
      left = LEASE_SECONDS - (time.time() - holder.get("renewed", time.time()))
      hint = (f"if that process is gone (e.g. a preempted VM), its lease expires in {left:.0f} s "
              "and the lock is then taken over: re-run the command then, or delete "
              f"{self.path} now")
    elif holder and holder.get("host") != socket.gethostname():
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
    if self.remote:
      self._acquire_remote(record)
      return
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
                        "(%s).", storage.dirname(self.path), _describe(holder))
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

  def _acquire_remote(self, record: dict) -> None:
    """Object stores: create-if-absent, read back, take over an expired lease, then renew."""
    for _ in range(10):
      holder = self.holder()
      if holder is not None:
        if not self._stale(holder):
          raise self._locked_error(holder)
        logging.warning("Taking over the lock of %s left by a trainer that is no longer running "
                        "(%s).", storage.dirname(self.path), _describe(holder))
        storage.remove(self.path)
      record["renewed"] = time.time()
      try:
        _create_exclusive(self.path, json.dumps(record).encode())
      except FileExistsError:
        continue  # another trainer created it first: look at it again
      except Exception as e:  # pylint: disable=broad-except  # the client's own error types
        raise WorkdirError(f"Cannot create the lock {self.path}: "
                           f"{' '.join(str(e).split())[:200]}.") from e
      if self._mine(self.holder()):
        self.held, self._record = True, record
        self._stop_renewing.clear()
        self._renewer = threading.Thread(target=self._renew, name="atac-lock-lease", daemon=True)
        self._renewer.start()
        return
    raise WorkdirError(f"Could not take the lock {self.path}; another trainer keeps taking it.")

  def _mine(self, holder: dict | None) -> bool:
    return bool(holder) and holder.get("pid") == os.getpid() and (
        holder.get("host") == socket.gethostname())

  def _renew(self) -> None:
    while not self._stop_renewing.wait(RENEW_SECONDS):
      try:
        if not self._mine(self.holder()):
          logging.error("The lock %s no longer names this trainer (another took it over).",
                        self.path)
          return
        self._record["renewed"] = time.time()
        storage.write_atomic(self.path, json.dumps(self._record))
      except Exception as e:  # pylint: disable=broad-except  # retried at the next renewal
        logging.warning("Could not renew the lock %s: %s", self.path,
                        " ".join(str(e).split())[:200])

  def release(self) -> None:
    """Removes the lock file if this process holds it."""
    if not self.held:
      return
    self.held = False
    self._stop_renewing.set()
    if self._renewer is not None:
      self._renewer.join()
      self._renewer = None
    if self._mine(self.holder()):
      storage.remove(self.path)


def _create_exclusive(path: str, data: bytes) -> None:
  """Writes an object only if none exists (FileExistsError otherwise, where the store checks)."""
  import fsspec  # pylint: disable=g-import-not-at-top  # a dependency of gcsfs / s3fs
  filesystem, name = fsspec.core.url_to_fs(path)
  if filesystem.exists(name):
    raise FileExistsError(path)
  with filesystem.open(name, "xb") as f:
    f.write(data)
