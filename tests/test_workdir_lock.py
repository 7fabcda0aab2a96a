"""One trainer per workdir: a live holder stops a second trainer at once; a dead one's lock is
taken over with a warning."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from absl import logging

from atac_train import trainer, workdir_lock
from atac_train.workdir_lock import WorkdirLock, WorkdirLockedError
from conftest import small_quickstart_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def live_process():
  """Another live process on this host (it stands in for a running trainer)."""
  process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
  yield process
  process.kill()
  process.wait()


def _write_lock(workdir, pid, **extra):
  os.makedirs(workdir, exist_ok=True)
  record = {"host": socket.gethostname(), "pid": pid,
            "start_time": workdir_lock._start_time(pid), "started": time.time(),  # pylint: disable=protected-access
            "command": "atac-train --config quickstart --workdir w"}
  record.update(extra)
  with open(os.path.join(workdir, "atac-train.lock"), "w") as f:
    json.dump(record, f)


def test_second_trainer_stops_at_once_naming_the_holder(tmp_path, live_process):
  workdir = str(tmp_path / "run")
  _write_lock(workdir, live_process.pid)
  start = time.time()
  with pytest.raises(WorkdirLockedError) as error:
    trainer.train_and_evaluate(small_quickstart_config(), workdir)
  assert time.time() - start < 5  # before loading data or tracing the model
  message = str(error.value)
  assert f"pid {live_process.pid} on {socket.gethostname()}" in message
  assert workdir in message and "atac-train --config quickstart" in message
  assert os.listdir(workdir) == ["atac-train.lock"]  # nothing else written


def test_cli_second_trainer_exits_with_status_2(tmp_path, live_process):
  workdir = str(tmp_path / "run")
  _write_lock(workdir, live_process.pid)
  result = subprocess.run(
      [sys.executable, "-m", "atac_train", "train", "--config", "quickstart", "--workdir",
       workdir], cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""),
      capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  (line,) = result.stderr.strip().splitlines()
  assert line.startswith(f"atac-train: error: {workdir} is in use by another atac-train (pid "
                         f"{live_process.pid}")


def test_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, monkeypatch):
  finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                            capture_output=True, text=True, check=True)
  dead_pid = int(finished.stdout)
  workdir = str(tmp_path / "run")
  _write_lock(workdir, dead_pid, start_time=None)
  warnings = []
  monkeypatch.setattr(logging, "warning", lambda msg, *args: warnings.append(msg % args))
  lock = WorkdirLock(os.path.join(workdir, "atac-train.lock"))
  lock.acquire()
  assert any("no longer running" in w and f"pid {dead_pid}" in w for w in warnings)
  assert lock.holder()["pid"] == os.getpid()
  lock.release()
  assert not os.path.exists(lock.path)


def test_a_reused_pid_does_not_keep_a_stale_lock(tmp_path):
  """The recorded pid runs again, but it is another process (another start time)."""
  workdir = str(tmp_path / "run")
  _write_lock(workdir, os.getpid(), start_time="1")
  lock = WorkdirLock(os.path.join(workdir, "atac-train.lock"))
  lock.acquire()
  assert lock.holder()["start_time"] == workdir_lock._start_time(os.getpid())  # pylint: disable=protected-access
  lock.release()


def test_lock_of_another_host_is_not_taken_over(tmp_path):
  workdir = str(tmp_path / "run")
  _write_lock(workdir, 12345, host="gpu-node-7")
  lock = WorkdirLock(os.path.join(workdir, "atac-train.lock"))
  with pytest.raises(WorkdirLockedError, match="pid 12345 on gpu-node-7.*delete .*atac-train.lock"):
    lock.acquire()
  assert lock.holder()["host"] == "gpu-node-7"


def test_release_leaves_another_holders_lock_alone(tmp_path, live_process):
  path = str(tmp_path / "atac-train.lock")
  lock = WorkdirLock(path)
  lock.acquire()
  _write_lock(str(tmp_path), live_process.pid)  # (someone removed ours and took it)
  lock.release()
  assert WorkdirLock(path).holder()["pid"] == live_process.pid


def _remote_record(**extra):
  record = {"host": "another-vm", "pid": 12345, "start_time": None, "started": time.time(),
            "renewed": time.time(), "command": "atac-train --workdir gs://bkt/x"}
  record.update(extra)
  return json.dumps(record)


def test_remote_lock_is_created_once_renewed_and_released(gcs, monkeypatch):
  from atac_jax import storage  # pylint: disable=g-import-not-at-top
  path = "gs://bkt/lock-own/atac-train.lock"
  monkeypatch.setattr(workdir_lock, "RENEW_SECONDS", 0.05)
  lock = WorkdirLock(path)
  lock.acquire()
  first = json.loads(storage.read_text(path))
  assert first["pid"] == os.getpid() and first["host"] == socket.gethostname()
  # Renewal rewrites the lease; wait on the condition (bounded), not on a fixed delay.
  def renewed_after(previous):
    deadline = time.monotonic() + 30
    while (current := json.loads(storage.read_text(path))["renewed"]) == previous:
      assert time.monotonic() < deadline, "the lease was never renewed"
      time.sleep(0.05)
    return current

  second = renewed_after(first["renewed"])
  # Park the renewer (its next wait is an hour) once it has renewed again, so the check below
  # never reads the object while the renewer rewrites it.
  monkeypatch.setattr(workdir_lock, "RENEW_SECONDS", 3600.0)
  renewed_after(second)
  with pytest.raises(WorkdirLockedError, match="in use by another atac-train"):
    WorkdirLock(path).check()  # same host, live pid: a second trainer stops
  lock.release()
  assert not storage.exists(path)


def test_remote_lock_of_another_host_waits_for_its_lease(gcs):
  from atac_jax import storage  # pylint: disable=g-import-not-at-top
  path = "gs://bkt/lock-lease/atac-train.lock"
  storage.write_atomic(path, _remote_record())
  with pytest.raises(WorkdirLockedError, match=r"another-vm.*lease expires in \d+ s"):
    WorkdirLock(path).acquire()
  expired = time.time() - workdir_lock.LEASE_SECONDS - 1
  storage.write_atomic(path, _remote_record(renewed=expired))  # a preempted VM's lock
  lock = WorkdirLock(path)
  lock.acquire()  # taken over
  assert json.loads(storage.read_text(path))["pid"] == os.getpid()
  lock.release()


def test_exclusive_create_refuses_an_existing_object(gcs):
  """The local GCS server enforces ifGenerationMatch=0 as GCS does (tests/gcs_server.py)."""
  from atac_jax import storage  # pylint: disable=g-import-not-at-top
  import fsspec  # pylint: disable=g-import-not-at-top
  path = "gs://bkt/lock-x/atac-train.lock"
  storage.write_atomic(path, b"first")
  filesystem, name = fsspec.core.url_to_fs(path)
  with pytest.raises(Exception):  # gcsfs reports the 412 with its own error type
    with filesystem.open(name, "xb") as f:
      f.write(b"second")
  assert storage.read_bytes(path) == b"first"
