"""CIFAR python tarballs: the official layout read without TF, downloads, checksums, errors."""

import hashlib
import io
import pickle
import tarfile

import numpy as np
import pytest

from atac_train import data
from atac_train.data import cifar_tarball, sources


def _split(rng, n, *, coarse):
  return cifar_tarball.CifarSplit(
      images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
      labels=rng.integers(0, 100 if coarse else 10, n),
      coarse_labels=rng.integers(0, 20, n) if coarse else None)


@pytest.fixture(name="cifar10")
def _cifar10(tmp_path):
  rng = np.random.default_rng(0)
  splits = {"train": _split(rng, 10, coarse=False), "test": _split(rng, 3, coarse=False)}
  return cifar_tarball.write(tmp_path / "cifar-10-python.tar.gz", "cifar10", splits), splits


@pytest.fixture(name="cifar100")
def _cifar100(tmp_path):
  rng = np.random.default_rng(1)
  splits = {"train": _split(rng, 7, coarse=True), "test": _split(rng, 4, coarse=True)}
  return cifar_tarball.write(tmp_path / "cifar-100-python.tar.gz", "cifar100", splits), splits


def _config(name, path, **overrides):
  config = data.default_config()
  config.update(name=name, source="tarball", path=str(path), **overrides)
  return config


def test_official_layout(cifar10):
  path, _ = cifar10
  with tarfile.open(path) as tar:
    names = sorted(tar.getnames())
    batch = pickle.loads(tar.extractfile("cifar-10-batches-py/data_batch_1").read(),
                         encoding="bytes")
  assert names == sorted([f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)] +
                         ["cifar-10-batches-py/test_batch", "cifar-10-batches-py/batches.meta"])
  assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape == (2, 3072)


def test_cifar10_pixels_are_chw_rows(cifar10):
  path, splits = cifar10
  read = cifar_tarball.read(path, "cifar10")
  for split in ("train", "test"):
    np.testing.assert_array_equal(read[split].images, splits[split].images)
    np.testing.assert_array_equal(read[split].labels, splits[split].labels)
    assert read[split].coarse_labels is None
  # Independent check of the layout: row = R plane, then G, then B, each 32x32 row-major.
  with tarfile.open(path) as tar:
    row = pickle.loads(tar.extractfile("cifar-10-batches-py/data_batch_1").read(),
                       encoding="bytes")[b"data"][1]
  image = read["train"].images[1]
  assert row[0] == image[0, 0, 0] and row[1] == image[0, 1, 0] and row[32] == image[1, 0, 0]
  assert row[1024] == image[0, 0, 1] and row[2048 + 33] == image[1, 1, 2]


@pytest.mark.parametrize("label_mode,classes", [("fine", 100), ("coarse", 20)])
def test_cifar100_fine_and_coarse(cifar100, label_mode, classes):
  path, splits = cifar100
  config = _config("cifar100", path, label_mode=label_mode)
  source = sources.open_source(config, "test")
  expected = splits["test"].labels if label_mode == "fine" else splits["test"].coarse_labels
  assert source.num_classes == classes and len(source) == 4
  assert [source[i]["label"] for i in range(4)] == expected.tolist()
  np.testing.assert_array_equal(source[2]["image"], splits["test"].images[2])
  info = data.get_info(config)
  assert (info.num_classes, info.image_shape, info.num_train, info.num_eval) == (
      classes, (32, 32, 3), 7, 4)


def test_split_slices(cifar10):
  path, splits = cifar10
  source = sources.open_source(_config("cifar10", path), "train[2:5]+test[:1]")
  assert len(source) == 4
  assert [source[i]["label"] for i in range(4)] == (
      splits["train"].labels[2:5].tolist() + splits["test"].labels[:1].tolist())


def test_coarse_labels_need_cifar100(cifar10):
  with pytest.raises(ValueError, match="coarse"):
    sources.open_source(_config("cifar10", cifar10[0], label_mode="coarse"), "train")


def test_missing_tarball_names_file_and_fix(tmp_path):
  missing = tmp_path / "nope.tar.gz"
  with pytest.raises(FileNotFoundError, match=r"nope\.tar\.gz(.|\n)*atac-prepare cifar10"):
    sources.open_source(_config("cifar10", missing), "train")


def test_corrupt_tarball(tmp_path):
  bad = tmp_path / "cifar-10-python.tar.gz"
  bad.write_bytes(b"not a tarball at all" * 10)
  with pytest.raises(ValueError, match=r"cifar-10-python\.tar\.gz is not a valid cifar10"):
    cifar_tarball.read(bad, "cifar10")


def test_tarball_of_the_other_dataset(cifar100):
  with pytest.raises(ValueError, match="data_batch_1"):
    cifar_tarball.read(cifar100[0], "cifar10")


def test_truncated_tarball(cifar10, tmp_path):
  cut = tmp_path / "cut.tar.gz"
  cut.write_bytes(cifar10[0].read_bytes()[:600])
  with pytest.raises(ValueError, match="not a valid cifar10"):
    cifar_tarball.read(cut, "cifar10")


def test_pickle_with_code_is_refused(tmp_path):
  class Evil:
    def __reduce__(self):
      return (print, ("pwned",))
  payload = pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2)
  path = tmp_path / "evil.tar.gz"
  with tarfile.open(path, "w:gz") as tar:
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
      info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
      info.size = len(payload)
      tar.addfile(info, io.BytesIO(payload))
  with pytest.raises(ValueError, match=r"refusing to load (__builtin__|builtins)\.print"):
    cifar_tarball.read(path, "cifar10")


def _serve(monkeypatch, tarball, md5):
  _, _, folder, members = cifar_tarball.TARBALLS["cifar10"]
  monkeypatch.setitem(cifar_tarball.TARBALLS, "cifar10",
                      (tarball.as_uri(), md5, folder, members))


def test_download_verifies_checksum(cifar10, tmp_path, monkeypatch):
  source_file = cifar10[0]
  monkeypatch.setenv("ATAC_JAX_CACHE", str(tmp_path / "cache"))
  _serve(monkeypatch, source_file, "0" * 32)
  with pytest.raises(ValueError, match=r"has md5 [0-9a-f]{32}, but the official cifar10"):
    cifar_tarball.download("cifar10")
  assert not list((tmp_path / "cache").iterdir())  # The bad download is removed.

  md5 = hashlib.md5(source_file.read_bytes()).hexdigest()
  assert cifar_tarball.md5sum(source_file) == md5
  _serve(monkeypatch, source_file, md5)
  # dataset.path='' downloads into the cache, then reads it from there.
  source = sources.open_source(_config("cifar10", ""), "test")
  assert len(source) == 3
  cached = tmp_path / "cache" / source_file.name
  assert cached.read_bytes() == source_file.read_bytes()

  cached.write_bytes(b"truncated")  # A damaged cached file is reported, not silently used.
  with pytest.raises(ValueError, match=r"Delete it and download it again"):
    sources.open_source(_config("cifar10", ""), "test")


def test_unknown_tarball_name():
  with pytest.raises(ValueError, match=r"accepted: \['cifar10', 'cifar100'\]"):
    cifar_tarball.download("mnist")
