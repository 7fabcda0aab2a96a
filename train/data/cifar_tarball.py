"""The official CIFAR-10/100 python tarballs: download with md5 verification, read without TF.

The archives are read in place (``tarfile``; nothing is extracted) and their pickles are loaded
with an unpickler that only builds plain containers and NumPy arrays. Images come back as
uint8 NHWC arrays; the files store them as rows of 3072 bytes in CHW order.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import os
import pathlib
import pickle
import tarfile
import urllib.request

import numpy as np

# name -> (url, md5, the folder inside the archive, {split: [member files]}).
TARBALLS = {
    "cifar10": (
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        "cifar-10-batches-py",
        {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
    ),
    "cifar100": (
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        "cifar-100-python",
        {"train": ["train"], "test": ["test"]},
    ),
}
NUM_CLASSES = {("cifar10", "fine"): 10, ("cifar100", "fine"): 100, ("cifar100", "coarse"): 20}
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


@dataclasses.dataclass(frozen=True)
class CifarSplit:
  """One split of a CIFAR tarball.

  Attributes:
    images: uint8 array (N, 32, 32, 3).
    labels: int64 array (N,) of the fine labels (CIFAR-10: its only labels).
    coarse_labels: int64 array (N,) of the CIFAR-100 superclasses; None for CIFAR-10.
  """
  images: np.ndarray
  labels: np.ndarray
  coarse_labels: np.ndarray | None


def _check_name(name: str) -> None:
  if name not in TARBALLS:
    raise ValueError(f"No official tarball for dataset {name!r}; accepted: {sorted(TARBALLS)}.")


def cache_dir() -> pathlib.Path:
  """Where downloaded tarballs live: $ATAC_JAX_CACHE or ~/.cache/atac_jax."""
  return pathlib.Path(os.environ.get("ATAC_JAX_CACHE") or
                      pathlib.Path.home() / ".cache" / "atac_jax").expanduser()


def md5sum(path: str | os.PathLike) -> str:
  """Returns the hex md5 digest of a file, read in 1 MiB chunks."""
  digest = hashlib.md5()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def verify(path: str | os.PathLike, name: str) -> None:
  """Raises ValueError unless ``path`` has the official md5 of ``name``'s tarball."""
  _check_name(name)
  url, expected = TARBALLS[name][:2]
  actual = md5sum(path)
  if actual != expected:
    raise ValueError(f"{path} has md5 {actual}, but the official {name} tarball ({url}) has "
                     f"{expected}: the file is corrupt or incomplete. Delete it and download it "
                     "again (`atac-prepare " f"{name} --source tarball`).")


def download(name: str, *, path: str | os.PathLike | None = None) -> pathlib.Path:
  """Downloads ``name``'s official tarball (unless already there) and verifies its md5.

  Args:
    name: 'cifar10' or 'cifar100'.
    path: where the file goes; None = ``cache_dir()/<official file name>``.

  Returns:
    The path of the verified tarball.

  Raises:
    ValueError: on an unknown name or a checksum mismatch (a fresh download that fails the
      check is deleted).
  """
  _check_name(name)
  url = TARBALLS[name][0]
  target = pathlib.Path(path) if path else cache_dir() / url.rsplit("/", 1)[-1]
  if not target.exists():
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.part")  # Hosts may share the dir.
    print(f"Downloading {url} to {target} ...", flush=True)
    try:
      urllib.request.urlretrieve(url, partial)
      verify(partial, name)
    except BaseException:
      partial.unlink(missing_ok=True)
      raise
    partial.replace(target)
  else:
    verify(target, name)
  return target


def resolve(name: str, path: str | os.PathLike | None) -> pathlib.Path:
  """Returns the tarball to read: ``path`` as given, or the md5-verified cached download."""
  _check_name(name)
  if not path:
    return download(name)
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise FileNotFoundError(
        f"CIFAR tarball {path} does not exist. Download the official file with "
        f"`atac-prepare {name} --source tarball --path {path}`, or set dataset.path='' to use "
        f"the cached download in {cache_dir()}.")
  return path


class _SafeUnpickler(pickle.Unpickler):

  def find_class(self, module: str, name: str):
    if (module, name) not in _SAFE_GLOBALS:
      raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR pickle")
    return super().find_class(module, name)


def _load_pickle(data: bytes) -> dict:
  obj = _SafeUnpickler(io.BytesIO(data), encoding="latin1").load()
  if not isinstance(obj, dict):
    raise pickle.UnpicklingError(f"expected a dict, got {type(obj).__name__}")
  return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _to_split(batches: list[dict], name: str) -> CifarSplit:
  data = np.concatenate([np.asarray(b["data"], np.uint8).reshape(-1, 3072) for b in batches])
  images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
  fine_key = "labels" if name == "cifar10" else "fine_labels"
  labels = np.concatenate([np.asarray(b[fine_key], np.int64) for b in batches])
  coarse = None
  if name == "cifar100":
    coarse = np.concatenate([np.asarray(b["coarse_labels"], np.int64) for b in batches])
  if len(labels) != len(images):
    raise ValueError(f"{len(images)} images but {len(labels)} labels")
  return CifarSplit(images, labels, coarse)


@functools.lru_cache(maxsize=2)
def _read_cached(path: str, name: str, size: int, mtime_ns: int) -> dict[str, CifarSplit]:
  del size, mtime_ns  # Only part of the cache key: a rewritten file is read again.
  folder, members = TARBALLS[name][2:]
  try:
    with tarfile.open(path, "r:*") as tar:
      raw = {}
      for split, files in members.items():
        for file in files:
          member = tar.extractfile(f"{folder}/{file}")
          if member is None:
            raise KeyError(f"{folder}/{file} is not a file")
          raw[file] = _load_pickle(member.read())
      return {split: _to_split([raw[f] for f in files], name) for split, files in members.items()}
  except (tarfile.TarError, KeyError, EOFError, OSError, pickle.UnpicklingError, ValueError,
          TypeError) as e:
    raise ValueError(
        f"{path} is not a valid {name} python tarball ({type(e).__name__}: {e}). Expected the "
        f"official {TARBALLS[name][0]} with {folder}/ and "
        f"{sum(members.values(), [])}; delete the file and run `atac-prepare {name} --source "
        "tarball` to download it again.") from e


def read(path: str | os.PathLike, name: str) -> dict[str, CifarSplit]:
  """Reads every split of a CIFAR python tarball (cached for repeated calls).

  Args:
    path: the .tar.gz (or plain .tar) file.
    name: 'cifar10' or 'cifar100'.

  Returns:
    {'train': CifarSplit, 'test': CifarSplit}.

  Raises:
    FileNotFoundError: if the file is missing.
    ValueError: if the file is not a readable tarball of that dataset.
  """
  _check_name(name)
  path = pathlib.Path(path).expanduser().resolve()
  if not path.is_file():
    raise FileNotFoundError(f"CIFAR tarball {path} does not exist.")
  stat = path.stat()
  return _read_cached(str(path), name, stat.st_size, stat.st_mtime_ns)


def write(path: str | os.PathLike, name: str, splits: dict[str, CifarSplit]) -> pathlib.Path:
  """Writes splits as a tarball in the official layout (small test fixtures, custom data).

  Each split goes into one member (CIFAR-10: the train split is divided over data_batch_1..5),
  as a pickled dict with b'data' uint8 (N, 3072) rows in CHW order and b'labels' (CIFAR-10) or
  b'fine_labels' and b'coarse_labels' (CIFAR-100), plus the meta file.
  """
  _check_name(name)
  folder, members = TARBALLS[name][2:]
  path = pathlib.Path(path)

  def add(tar: tarfile.TarFile, file: str, obj: dict) -> None:
    data = pickle.dumps(obj, protocol=2)
    info = tarfile.TarInfo(f"{folder}/{file}")
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))

  with tarfile.open(path, "w:gz") as tar:
    for split, files in members.items():
      s = splits[split]
      for file, idx in zip(files, np.array_split(np.arange(len(s.labels)), len(files))):
        obj = {b"data": s.images[idx].transpose(0, 3, 1, 2).reshape(len(idx), 3072),
               b"batch_label": f"{split} {file}".encode()}
        if name == "cifar10":
          obj[b"labels"] = s.labels[idx].tolist()
        else:
          obj[b"fine_labels"] = s.labels[idx].tolist()
          obj[b"coarse_labels"] = s.coarse_labels[idx].tolist()
        add(tar, file, obj)
    meta_file, meta_key = ("batches.meta", b"label_names") if name == "cifar10" else (
        "meta", b"fine_label_names")
    add(tar, meta_file, {meta_key: [b"class"]})
  return path
