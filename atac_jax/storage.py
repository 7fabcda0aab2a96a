"""Workdir paths on any filesystem Orbax writes to: local paths, ``gs://`` and ``s3://``.

Every file the project writes into a workdir (``config.json``, ``metrics.jsonl``, the lock,
TensorBoard events, the learning curve, moved-aside checkpoints) goes through these functions,
which use ``etils.epath`` (the path library Orbax itself uses) for object stores and the ``os``
module for local paths. Paths stay strings: a local path is made absolute, a URL is kept as it
is (``os.path.abspath`` would turn ``gs://b/run`` into ``<cwd>/gs:/b/run``).

Object stores have no append and no rename: an append rewrites the object, a move copies and
deletes. A single object write is atomic there, so :func:`write_atomic` needs no temporary file.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil

# Schemes both etils.epath (the project's files) and tensorstore (Orbax's arrays) can write, with
# the package epath needs for each.
SCHEMES = {"gs": "gcsfs", "s3": "s3fs"}
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class StorageError(ValueError):
  """A path whose scheme is not supported, or whose filesystem package is missing."""


def describe_error(error: BaseException, *, limit: int = 200) -> str:
  """``Type: message`` on one line, shortened (tensorstore's spec and source dumps cut off)."""
  text = " ".join(str(error).split()).split(" See full TensorStore details")[0]
  text = text.split(" [source locations=")[0]
  return f"{type(error).__name__}: {text[:limit]}"


def scheme(path: str | os.PathLike) -> str | None:
  """The URL scheme of ``path`` (``'gs'`` for ``gs://b/x``), or None for a local path."""
  match = _URL.match(os.fspath(path))
  return match.group(1).lower() if match else None


def is_remote(path: str | os.PathLike) -> bool:
  """Whether ``path`` is a URL (an object store) rather than a local path."""
  return scheme(path) is not None


def check_scheme(path: str | os.PathLike, *, what: str = "path") -> None:
  """Raises StorageError for a URL scheme nothing here can write, or a missing package.

  Args:
    path: the path or URL.
    what: how the message names it (e.g. ``--workdir``).
  """
  name = scheme(path)
  if name is None:
    return
  accepted = ", ".join(f"{s}:// (needs {p})" for s, p in SCHEMES.items())
  if name not in SCHEMES:
    raise StorageError(f"{what}={os.fspath(path)}: the scheme {name}:// is not supported; "
                       f"accepted: a local path, {accepted}.")
  package = SCHEMES[name]
  try:
    __import__(package)
  except ImportError:
    extra = ' (or pip install "atac-jax[gcs]")' if name == "gs" else ""
    raise StorageError(f"{what}={os.fspath(path)} needs the {package} package to reach "
                       f"{name}://: pip install {package}{extra}.") from None


def normalize(path: str | os.PathLike) -> str:
  """An absolute local path, or the URL without a trailing slash."""
  path = os.fspath(path)
  if is_remote(path):
    return path.rstrip("/") if not path.endswith("://") else path
  return os.path.abspath(os.path.expanduser(path))


def join(root: str, *parts: str) -> str:
  return (posixpath if is_remote(root) else os.path).join(root, *parts)


def dirname(path: str) -> str:
  return (posixpath if is_remote(path) else os.path).dirname(path)


def basename(path: str) -> str:
  return (posixpath if is_remote(path) else os.path).basename(path.rstrip("/"))


def epath(path: str | os.PathLike):
  """The ``etils.epath.Path`` of ``path`` (checked: a supported scheme and its package)."""
  check_scheme(path)
  from etils import epath as epath_lib  # pylint: disable=g-import-not-at-top
  return epath_lib.Path(os.fspath(path))


def _fresh(path: str):
  """``epath(path)`` with fsspec's cached listings of it and its parents dropped: another process
  (a trainer, another host) may have written there since this one last looked."""
  p = epath(path)
  import fsspec  # pylint: disable=g-import-not-at-top  # a dependency of gcsfs and s3fs
  from etils.epath import backend  # pylint: disable=g-import-not-at-top
  for filesystem in (fsspec.filesystem(scheme(path)), backend.fsspec_backend.fs(path)):
    filesystem.invalidate_cache(path)  # epath's own instance and the default one (move, lock)
  return p


def exists(path: str) -> bool:
  return _fresh(path).exists() if is_remote(path) else os.path.lexists(path)


def isdir(path: str) -> bool:
  return _fresh(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
  return _fresh(path).is_file() if is_remote(path) else os.path.isfile(path)


def listdir(path: str) -> list[str]:
  """Names in a folder (an empty list where there is none)."""
  if is_remote(path):
    p = _fresh(path)
    return sorted(child.name for child in p.iterdir()) if p.is_dir() else []
  return sorted(os.listdir(path)) if os.path.isdir(path) else []


def makedirs(path: str) -> None:
  """Creates a folder and its parents (object stores need none: a no-op there)."""
  if is_remote(path):
    epath(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def read_bytes(path: str) -> bytes:
  """The file's bytes (FileNotFoundError where there is none)."""
  if is_remote(path):
    p = _fresh(path)
    if not p.exists():
      raise FileNotFoundError(path)
    return p.read_bytes()
  with open(path, "rb") as f:
    return f.read()


def read_text(path: str) -> str:
  return read_bytes(path).decode("utf-8")


def write_atomic(path: str, data: bytes | str) -> None:
  """Writes the whole file so that a reader sees the old or the new contents, never a part.

  Locally a temporary file is synced and renamed over ``path``; an object store replaces an
  object in one request.
  """
  data = data.encode("utf-8") if isinstance(data, str) else data
  if is_remote(path):
    epath(path).write_bytes(data)
    return
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.remove(tmp)
    except OSError:
      pass
    raise


def append_text(path: str, text: str) -> None:
  """Appends ``text`` (flushed); on an object store the object is rewritten with it."""
  if is_remote(path):
    try:
      old = read_bytes(path)
    except FileNotFoundError:
      old = b""
    epath(path).write_bytes(old + text.encode("utf-8"))
    return
  with open(path, "a") as f:
    f.write(text)
    f.flush()


def remove(path: str) -> None:
  """Deletes a file; a missing one is not an error."""
  try:
    if is_remote(path):
      epath(path).unlink()
    else:
      os.remove(path)
  except FileNotFoundError:
    pass


def rmtree(path: str) -> None:
  """Deletes a folder and everything in it; a missing one is not an error."""
  if is_remote(path):
    p = epath(path)
    if p.exists():
      p.rmtree()
  else:
    shutil.rmtree(path, ignore_errors=True)


def move(source: str, target: str) -> None:
  """Moves a file or folder (on an object store: copy, then delete)."""
  if is_remote(source):
    check_scheme(source)
    import fsspec  # pylint: disable=g-import-not-at-top  # a dependency of gcsfs and s3fs
    # Object by object with fsspec: epath's rename wants the target's parent folder to exist
    # (object stores have no empty folders), and gcsfs's mv tries a move API first that not
    # every GCS-compatible server has.
    filesystem, source_name = fsspec.core.url_to_fs(source)
    target_name = fsspec.core.url_to_fs(target)[1]
    for name in filesystem.find(source_name):
      filesystem.cp_file(name, target_name + name[len(source_name):])
    filesystem.rm(source_name, recursive=True)
  else:
    shutil.move(source, target)

