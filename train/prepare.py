"""`atac-prepare DATASET`: build a tfds dataset as array_record, or fetch a CIFAR tarball.

    atac-prepare cifar10 --data-dir ~/tensorflow_datasets     # tfds; needs atac-jax[prepare]
    atac-prepare imagenet2012 --data-dir /data/tfds            # after the manual download
    atac-prepare cifar100 --source tarball [--path FILE]       # official tarball, md5-checked

Training reads the result without TensorFlow (`tfds.data_source` / the tarball reader).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import sys
from collections.abc import Sequence

from atac_train.data import cifar_tarball

_IMAGENET_FILES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
_BUNDLED = ("digits", "synthetic")


def _have_tensorflow() -> bool:
  return importlib.util.find_spec("tensorflow") is not None


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="atac-prepare", description=__doc__.split("\n", 1)[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
  parser.add_argument("dataset", help="tfds name (cifar10, cifar100, mnist, imagenet2012, ...)")
  parser.add_argument("--source", choices=("tfds", "tarball"), default="tfds",
                      help="tfds: build array_record files (default); tarball: download the "
                      "official CIFAR python tarball")
  parser.add_argument("--data-dir", default="",
                      help="tfds data dir (default: tfds's, ~/tensorflow_datasets)")
  parser.add_argument("--path", default="",
                      help="tarball file (default: ~/.cache/atac_jax/<official name>)")
  return parser


def _prepare_tarball(name: str, path: str) -> str:
  target = cifar_tarball.download(name, path=path or None)
  flags = f"--config.dataset.source=tarball --config.dataset.name={name}"
  if path:
    flags += f" --config.dataset.path={target}"
  return f"{target} is the verified official {name} tarball. Train on it with: {flags}"


def _prepare_tfds(name: str, data_dir: str) -> str:
  if not _have_tensorflow():
    raise SystemExit(
        "atac-prepare: building tfds datasets needs TensorFlow (only for this one-off step; "
        "training reads the array_record files without it). Install it with:\n"
        "    pip install 'atac-jax[prepare]'\n"
        + ("or use the official CIFAR tarball without TensorFlow: "
           f"atac-prepare {name} --source tarball" if name in cifar_tarball.TARBALLS else ""))
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(data_dir or tfds.core.constants.DATA_DIR).expanduser()
  download_config = None
  if name.split(":")[0].split("/")[0] == "imagenet2012":
    manual = root / "downloads" / "manual"
    missing = [f for f in _IMAGENET_FILES if not (manual / f).is_file()]
    if missing:
      raise SystemExit(
          f"atac-prepare: ImageNet cannot be downloaded automatically. Register at "
          f"https://image-net.org, download {' and '.join(_IMAGENET_FILES)} into\n    {manual}/\n"
          f"(missing: {', '.join(missing)}) and run this command again. Preparing takes a few "
          "hours and ~300 GB of disk.")
    download_config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual))
  builder = tfds.builder(name, data_dir=os.fspath(root))
  builder.download_and_prepare(file_format="array_record", download_config=download_config)
  return (f"Prepared {name} as array_record in {builder.data_dir}. Train on it with: "
          f"--config.dataset.source=tfds --config.dataset.name={name}"
          + (f" --config.dataset.data_dir={root}" if data_dir else ""))


def main(argv: Sequence[str] | None = None) -> str:
  """Prepares the dataset the command line names and returns what to tell the user.

  Raises:
    SystemExit: with an explanation when the step cannot run (no TensorFlow, ImageNet files
      not downloaded, unknown tarball, checksum mismatch).
  """
  args = _parser().parse_args(argv)
  if args.dataset in _BUNDLED:
    return (f"{args.dataset} needs no preparation: it is bundled with scikit-learn "
            "(digits) or generated (synthetic).")
  if args.source == "tarball":
    try:
      return _prepare_tarball(args.dataset, args.path)
    except (ValueError, OSError) as e:
      raise SystemExit(f"atac-prepare: {e}") from e
  return _prepare_tfds(args.dataset, args.data_dir)


def run() -> None:
  """Console entry point of `atac-prepare`."""
  print(main(sys.argv[1:]))


if __name__ == "__main__":
  run()
