"""atac_jax.storage: one set of file operations for local workdirs and object stores (gs://)."""

import json
import os

import pytest

from atac_jax import storage
from atac_jax.workdir import Layout, read_json, write_json


def test_urls_stay_urls_and_local_paths_become_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert storage.normalize("gs://bkt/run/") == "gs://bkt/run"
  assert storage.normalize("runs/a") == str(tmp_path / "runs" / "a")
  layout = Layout("gs://bkt/run1")
  assert layout.root == "gs://bkt/run1"
  assert layout.checkpoints == "gs://bkt/run1/checkpoints"
  assert layout.step_dir(22) == "gs://bkt/run1/checkpoints/22"
  assert storage.dirname(layout.lock) == "gs://bkt/run1"
  assert storage.basename("gs://bkt/run1/checkpoints/22/") == "22"
  assert storage.scheme("GS://x/y") == "gs" and storage.scheme("/tmp/x") is None


@pytest.mark.parametrize("path", ["foo://bkt/run", "file:///tmp/run", "az://c/run"])
def test_unsupported_schemes_are_refused_with_what_is_accepted(path):
  with pytest.raises(storage.StorageError, match=r"not supported; accepted: a local path, gs://"):
    storage.check_scheme(path, what="--workdir")


def test_a_missing_filesystem_package_names_the_install_command(monkeypatch):
  monkeypatch.setitem(storage.SCHEMES, "s3", "no_such_package_for_s3")
  with pytest.raises(storage.StorageError, match="pip install no_such_package_for_s3"):
    storage.check_scheme("s3://bkt/run")


def _roots(tmp_path, request):
  if request.param == "local":
    return str(tmp_path / "w")
  request.getfixturevalue("gcs")
  return f"gs://bkt/{request.node.name.replace('[', '-').rstrip(']')}"


@pytest.fixture(params=["local", "gs"])
def root(tmp_path, request):
  return _roots(tmp_path, request)


def test_files_round_trip(root):
  storage.makedirs(root)
  path = storage.join(root, "metrics.jsonl")
  assert not storage.exists(path)
  storage.append_text(path, "a\n")
  storage.append_text(path, "b\n")  # object stores cannot append: the object is rewritten
  assert storage.read_text(path) == "a\nb\n"
  write_json(storage.join(root, "config.json"), {"x": [1, 2]})
  assert read_json(storage.join(root, "config.json")) == {"x": [1, 2]}
  assert storage.listdir(root) == ["config.json", "metrics.jsonl"]
  storage.write_atomic(path, b"c\n")
  assert storage.read_bytes(path) == b"c\n"
  storage.remove(path)
  storage.remove(path)  # a missing file is not an error
  assert not storage.exists(path)
  with pytest.raises(FileNotFoundError):
    storage.read_bytes(path)


def test_folders_move_and_delete(root):
  step = storage.join(root, "checkpoints", "22")
  storage.makedirs(storage.join(step, "sub"))
  storage.write_atomic(storage.join(step, "state"), b"s")
  storage.write_atomic(storage.join(step, "sub", "data"), b"d")
  target = storage.join(root, "damaged", "22-x")
  storage.makedirs(storage.dirname(target))
  storage.move(step, target)
  assert not storage.exists(step)
  assert storage.read_bytes(storage.join(target, "sub", "data")) == b"d"
  assert storage.isdir(target) and not storage.isfile(target)
  storage.rmtree(storage.join(root, "damaged"))
  assert not storage.exists(target)
  storage.rmtree(storage.join(root, "damaged"))  # a missing folder is not an error


def test_invalid_json_names_the_file(root):
  storage.makedirs(root)
  path = storage.join(root, "config.json")
  storage.write_atomic(path, b'{"a": ')
  with pytest.raises(ValueError, match=r"config.json is not valid JSON \(line 1"):
    read_json(path)
  storage.write_atomic(path, b"\xff\xfe")
  with pytest.raises(ValueError, match="not UTF-8"):
    read_json(path)


def test_a_local_atomic_write_leaves_no_temporary_file(tmp_path):
  path = str(tmp_path / "config.json")
  storage.write_atomic(path, json.dumps({"a": 1}))
  assert os.listdir(tmp_path) == ["config.json"]
