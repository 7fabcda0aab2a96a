"""Test session set-up, before JAX starts: 8 fake CPU devices (for the sharding tests), LLVM at
optimisation level 1 (below), and one persistent compilation cache for the whole session.

The cache is a fresh temporary folder made by the first process that loads this file (pytest
itself, or xdist's controller), inherited through the environment by every xdist worker and by
every ``atac-train``/``atac-eval`` process a test starts, and removed when that process exits.
Many tests start the same small training run more than once (resume after SIGKILL, SIGTERM,
disk full, a bucket workdir, ...); from the second start on its train, eval and init steps load
from the cache instead of compiling (a ResNet-8 CLI run: 21 s -> 8 s on 2 cores). Only programs
that took at least half a second to compile are stored: the few large steps, each written once
right after it compiles, not the many tiny helpers. A cached executable is
XLA's own serialized result for the same program and flags, so results are bit-identical (checked:
the metrics of a cold and a warm run are equal). Set ``JAX_COMPILATION_CACHE_DIR`` yourself to
use another folder (it is then kept); ``JAX_ENABLE_COMPILATION_CACHE=false`` turns it off.
"""

import atexit
import contextlib
import os
import shutil
import tempfile

# 8 fake CPU devices, and LLVM's optimisation level 1 for the CPU code XLA compiles: most tests
# compile far more than they run, and level 1 took a set of model transform tests from 116 to
# 81 s (CPU 165 -> 109 s) while the quickstart training run kept its time (63 s at both levels;
# level 0 made it 255 s). The CLI processes tests start take the same level (cli_xla_flags).
LLVM_LEVEL = "--xla_backend_optimization_level=1"
for _flag in ("--xla_force_host_platform_device_count=8", LLVM_LEVEL):
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE_DIR = tempfile.mkdtemp(prefix="atac-jax-test-compile-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
  atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


import pytest  # noqa: E402  (after the XLA flags above)

# The test files that take longest, heaviest first (worker seconds in a full run on the 2-core VM,
# 2026-12-06: test_transforms.py ~430 s ... test_bench.py ~40 s; the other files take under 35 s).
# pytest-xdist hands whole files to workers in collection order (``--dist loadfile
# --no-loadscope-reorder``, pyproject.toml), so these go first and the many short files fill in
# at the end: otherwise a few-test file of minutes (GCS workdirs, two processes) started last and
# ran alone for minutes while the other worker sat idle.
SLOWEST_FILES = (
    "test_transforms.py", "test_trainer.py", "test_pallas_backward.py",
    "test_atac_in_user_code.py", "test_ops.py", "test_fault_tolerance.py", "test_atac.py",
    "test_gcs_workdir.py", "test_main.py", "test_docs.py", "test_errors.py", "test_nnx.py",
    "test_viz.py", "test_export.py", "test_registry.py", "test_activations.py",
    "test_conventions.py", "test_cifar_resnet.py", "test_checkpoint.py", "test_resume.py",
    "test_atac_fusion.py", "test_bench.py", "test_pallas_gpu.py")


def pytest_collection_modifyitems(items):
  """The files of ``SLOWEST_FILES`` first, in that order; each file's tests keep their order."""
  rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest as collected


def cli_xla_flags(devices: int) -> str:
  """XLA_FLAGS for a CLI process a test starts: ``devices`` fake CPU devices, and the test
  processes' LLVM level, so a run in a child compiles the same program as one in the test."""
  return f"--xla_force_host_platform_device_count={devices} {LLVM_LEVEL}"


def small_quickstart_config(**overrides):
  """The quickstart recipe shrunk for tests: ResNet-8, batch 32, 2 epochs (88 steps)."""
  from atac_train.configs import quickstart  # pylint: disable=g-import-not-at-top
  config = quickstart.get_config()
  config.model.name = "cifar_resnet8"
  config.global_batch_size = 32
  config.num_epochs = 2
  config.progress_bar = False
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png(path, expected_size):
  """``path`` is a valid PNG of ``expected_size`` (width, height) pixels and under 300 kB."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as f:
    assert f.read(8) == PNG_SIGNATURE
  with Image.open(path) as img:
    img.verify()
  with Image.open(path) as img:
    assert img.size == expected_size
  assert os.path.getsize(path) < 300_000


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
  """One small ATAC run on 8 fake devices, shared by the checkpoint/eval/viz tests (read-only):
  ``(workdir, the result train_and_evaluate returned)``.

  Trained once per test session, not once per xdist worker: the first worker that needs it trains
  it under a file lock in the session's temporary folder (the parent of each worker's own), the
  others wait for it and read the result it left beside it."""
  import fcntl  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  from atac_train import trainer  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # this session's folder, shared by its workers
  workdir, done = root / "trained_workdir", root / "trained_workdir.json"
  with open(root / "trained_workdir.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if not done.exists():
      shutil.rmtree(workdir, ignore_errors=True)  # what a failed attempt left
      result = trainer.train_and_evaluate(small_quickstart_config(), str(workdir))
      done.write_text(json.dumps(result))
  return str(workdir), json.loads(done.read_text())


def tensorboard_scalars(directory):
  """(tag, step) -> [values] of every scalar in the TensorBoard event files under ``directory``."""
  import collections  # pylint: disable=g-import-not-at-top
  import glob  # pylint: disable=g-import-not-at-top
  import struct  # pylint: disable=g-import-not-at-top
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  scalars = collections.defaultdict(list)
  for path in glob.glob(os.path.join(directory, "**", "events.out.tfevents*"), recursive=True):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):  # TFRecord: length (8), crc (4), payload, crc (4)
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        scalars[(value.tag, event.step)].append(value.simple_value)
  return dict(scalars)


def metric_rows(workdir):
  """The records of ``workdir/metrics.jsonl``."""
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def damage_checkpoint(workdir, step):
  """Truncates the largest file of a checkpoint step's state (a disk that filled up, say)."""
  state_dir = os.path.join(workdir, "checkpoints", str(step), "state")
  files = [os.path.join(root, name) for root, _, names in os.walk(state_dir) for name in names]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)


def randomize(variables, seed):
  """Random parameters and positive running variances, so nothing sits at a special value."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(seed)

  def draw(path, leaf):
    if getattr(path[-1], "key", "") == "var":
      return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), leaf.dtype)
    return jnp.asarray(rng.normal(0, 0.5, leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, variables)


@contextlib.contextmanager
def batch_on_one_device(one: bool = True):
  """Traces inside as a step whose batch lies on one device (a ``data_parallel`` declaration
  over a one-device mesh: the CPU's ``"scalar"`` tie); with ``one`` False, undeclared among the
  session's 8 devices (the ``"zeros"`` tie)."""
  if not one:
    yield
    return
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from atac_jax import ops  # pylint: disable=g-import-not-at-top
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  with ops.pallas_backward.data_parallel(mesh, ("data",)):
    yield


GCS_ENV = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING")


@pytest.fixture(scope="session")
def gcs_server():
  """A local GCS server (tests/gcs_server.py) for the session; yields the environment that points
  gcsfs, the Google clients and tensorstore at it. Bucket ``bkt`` exists. No network is used."""
  import socket  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  pytest.importorskip("gcp_storage_emulator")
  pytest.importorskip("gcsfs")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = subprocess.Popen(
      [sys.executable, os.path.join(os.path.dirname(__file__), "gcs_server.py"), "--port",
       str(port), "--bucket", "bkt"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
      text=True)
  line = server.stdout.readline()  # printed once the server accepts connections
  assert "listening" in line, f"the GCS server did not start: {line!r}"
  url = f"http://127.0.0.1:{port}"
  env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token"}
  yield env
  server.terminate()
  server.wait(timeout=30)


@pytest.fixture
def gcs(gcs_server, monkeypatch):
  """This process talks to the local GCS server; returns its environment for subprocesses."""
  for key, value in gcs_server.items():
    monkeypatch.setenv(key, value)
  return gcs_server
