"""`atac-prepare`: tfds builds as array_record, ImageNet's manual files, CIFAR tarball fetches."""

import hashlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from atac_train import prepare
from atac_train.data import cifar_tarball


@pytest.fixture(name="tarball")
def _tarball(tmp_path, monkeypatch):
  """A small CIFAR-10 tarball in the official layout, served as the official URL."""
  rng = np.random.default_rng(0)
  splits = {s: cifar_tarball.CifarSplit(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                                        rng.integers(0, 10, n), None)
            for s, n in (("train", 5), ("test", 2))}
  path = cifar_tarball.write(tmp_path / "served.tar.gz", "cifar10", splits)
  md5 = hashlib.md5(path.read_bytes()).hexdigest()
  _, _, folder, members = cifar_tarball.TARBALLS["cifar10"]
  monkeypatch.setitem(cifar_tarball.TARBALLS, "cifar10", (path.as_uri(), md5, folder, members))
  return path


def test_without_tensorflow_points_to_the_prepare_extra(monkeypatch):
  monkeypatch.setattr(prepare, "_have_tensorflow", lambda: False)
  with pytest.raises(SystemExit, match=r"pip install 'atac-jax\[prepare\]'(.|\n)*--source tarball"):
    prepare.main(["cifar10", "--data-dir", "/tmp/x"])


def test_imagenet_explains_the_manual_download(tmp_path, monkeypatch):
  monkeypatch.setattr(prepare, "_have_tensorflow", lambda: True)
  (tmp_path / "downloads" / "manual").mkdir(parents=True)
  (tmp_path / "downloads" / "manual" / "ILSVRC2012_img_val.tar").write_bytes(b"")
  with pytest.raises(SystemExit, match=(
      f"ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar into\n    {tmp_path}/downloads/"
      r"manual/\n\(missing: ILSVRC2012_img_train.tar\)")):
    prepare.main(["imagenet2012", "--data-dir", str(tmp_path)])


def test_tfds_builds_array_record(tmp_path, monkeypatch):
  calls = {}

  class FakeBuilder:
    data_dir = str(tmp_path / "mnist" / "3.0.1")

    def download_and_prepare(self, **kwargs):
      calls.update(kwargs)

  monkeypatch.setattr(prepare, "_have_tensorflow", lambda: True)
  monkeypatch.setattr(tfds, "builder", lambda name, data_dir: calls.update(
      name=name, data_dir=data_dir) or FakeBuilder())
  message = prepare.main(["mnist", "--data-dir", str(tmp_path)])
  assert calls == {"name": "mnist", "data_dir": str(tmp_path), "file_format": "array_record",
                   "download_config": None}
  assert f"--config.dataset.data_dir={tmp_path}" in message


def test_tarball_download_to_path_is_verified(tarball, tmp_path):
  target = tmp_path / "got" / "cifar10.tar.gz"
  message = prepare.main(["cifar10", "--source", "tarball", "--path", str(target)])
  assert target.read_bytes() == tarball.read_bytes()
  assert "--config.dataset.source=tarball" in message and str(target) in message
  # Already there: verified again, not downloaded.
  assert "verified" in prepare.main(["cifar10", "--source", "tarball", "--path", str(target)])


def test_tarball_download_to_the_cache(tarball, tmp_path, monkeypatch):
  monkeypatch.setenv("ATAC_JAX_CACHE", str(tmp_path / "cache"))
  prepare.main(["cifar10", "--source", "tarball"])
  assert (tmp_path / "cache" / "served.tar.gz").read_bytes() == tarball.read_bytes()


def test_tarball_with_wrong_checksum_fails(tarball, tmp_path):
  del tarball
  wrong = tmp_path / "wrong.tar.gz"
  wrong.write_bytes(b"something else")
  with pytest.raises(SystemExit, match=r"wrong\.tar\.gz has md5 .*corrupt or incomplete"):
    prepare.main(["cifar10", "--source", "tarball", "--path", str(wrong)])


def test_tarball_for_an_unknown_dataset():
  with pytest.raises(SystemExit, match=r"No official tarball for dataset 'mnist'"):
    prepare.main(["mnist", "--source", "tarball"])


def test_bundled_datasets_need_nothing():
  assert "needs no preparation" in prepare.main(["digits"])
