"""Test session set-up: 8 fake CPU devices (for the sharding tests), before JAX starts."""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # noqa: E402  (after the XLA flags above)


def small_quickstart_config(**overrides):
  """The quickstart recipe shrunk for tests: ResNet-8, batch 32, 2 epochs (88 steps)."""
  from configs import quickstart  # pylint: disable=g-import-not-at-top
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
  """One small ATAC run on 8 fake devices, shared by the checkpoint/eval/viz tests (read-only)."""
  from train import trainer  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("trained")
  result = trainer.train_and_evaluate(small_quickstart_config(), str(workdir))
  return str(workdir), result
