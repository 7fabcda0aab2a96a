"""Random-access image sources behind one interface: tfds, CIFAR tarballs, digits, synthetic.

Every source is a picklable sequence (it travels to grain worker processes) whose items are
``{'image': uint8 (H, W, C) array or encoded image bytes, 'label': int}``, with the metadata the
pipeline needs (`num_classes`, `image_shape`, `max_value`).
"""

from __future__ import annotations

import difflib
import functools
import types
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from atac_train.data import cifar_tarball
from atac_train.data import config as config_lib


class ImageSource(Sequence):
  """Base class: a sequence of ``{'image', 'label'}`` records.

  Attributes:
    num_classes: number of labels.
    image_shape: (H, W, C) of the stored images; H and W are None when they vary.
    max_value: the pixel value that means full intensity (255; 16 for digits).
  """
  num_classes: int
  image_shape: tuple[int | None, int | None, int]
  max_value: float = 255.0


class ArraySource(ImageSource):
  """Images and labels held in memory as NumPy arrays.

  Args:
    images: uint8 array (N, H, W, C).
    labels: integer array (N,).
    num_classes: number of labels.
    max_value: pixel value of full intensity.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray, *, num_classes: int,
               max_value: float = 255.0):
    if images.ndim != 4 or len(images) != len(labels):
      raise ValueError(f"ArraySource needs images (N, H, W, C) and labels (N,), got "
                       f"{images.shape} and {np.shape(labels)}.")
    self.images, self.labels = images, np.asarray(labels, np.int64)
    self.num_classes, self.max_value = num_classes, max_value
    self.image_shape = tuple(images.shape[1:])

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self.images[index], "label": int(self.labels[index])}


class SyntheticSource(ImageSource):
  """Images generated from (seed, split, index) on access, so any size costs no memory.

  Each image is uniform noise in [0, 128) plus a brightness offset that grows with the label,
  so a model can learn the labels (useful for smoke tests); benchmarks only need the shapes.

  Args:
    num_examples: length of the split.
    shape: (H, W, C) of the images.
    num_classes: labels are drawn uniformly from range(num_classes).
    seed: data seed.
    split_id: distinguishes the splits made from one seed.
  """

  def __init__(self, num_examples: int, *, shape: Sequence[int], num_classes: int, seed: int,
               split_id: int = 0):
    if len(shape) != 3 or min(shape) < 1 or num_classes < 1 or num_examples < 0:
      raise ValueError(f"synthetic data needs shape (H, W, C) of positive sizes, >= 1 class and "
                       f">= 0 examples, got shape={tuple(shape)}, num_classes={num_classes}, "
                       f"num_examples={num_examples}.")
    self.num_examples, self.num_classes = num_examples, num_classes
    self.image_shape = tuple(int(s) for s in shape)
    self.seed, self.split_id = seed, split_id

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < self.num_examples:
      raise IndexError(index)
    rng = np.random.default_rng((self.seed, self.split_id, index))
    label = int(rng.integers(self.num_classes))
    offset = label * 127 // max(self.num_classes - 1, 1)
    image = rng.integers(0, 128, self.image_shape, dtype=np.uint8) + np.uint8(offset)
    return {"image": image, "label": label}


class TfdsSource(ImageSource):
  """A tfds ``data_source`` (array_record) with the image and the chosen label feature.

  tfds decodes images in ``__getitem__`` (PIL or OpenCV, no TensorFlow), i.e. on the grain
  worker processes when ``num_workers > 0``. Records are read one by one (grain's batched-read
  hook is left out: ``tfds.testing.mock_data`` 4.9.10 breaks ``__getitems__``, so it could not be
  tested); the prefetch threads overlap the reads.

  Args:
    data_source: what ``tfds.data_source`` returned for one split.
    label_key: the feature holding the labels ('label', or 'coarse_label' for CIFAR-100).
  """

  def __init__(self, data_source: Any, *, label_key: str):
    features = data_source.dataset_info.features
    missing = [k for k in ("image", label_key) if k not in features]
    if missing:
      raise ValueError(f"tfds dataset {data_source.dataset_info.name!r} has no feature(s) "
                       f"{missing}; it has {sorted(features.keys())}. Image classification "
                       "datasets need 'image' and 'label' ('coarse_label' for label_mode='coarse').")
    self.data_source, self.label_key = data_source, label_key
    self.num_classes = int(features[label_key].num_classes)
    self.image_shape = tuple(features["image"].shape)

  def __len__(self) -> int:
    return len(self.data_source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self.data_source[index]
    return {"image": record["image"], "label": int(record[self.label_key])}


def _split_ranges(split: str, sizes: dict[str, int]) -> list[tuple[str, int, int]]:
  """Resolves a split name or tfds slice ('train[:90%]', 'train+test') to (split, from, to)."""
  if split in sizes:
    return [(split, 0, sizes[split])]
  if "[" not in split and "+" not in split:
    raise ValueError(f"Unknown split {split!r}; accepted: {sorted(sizes)} or tfds slices of "
                     "them such as 'train[:90%]'.")
  from tensorflow_datasets.core import splits as tfds_splits  # pylint: disable=g-import-not-at-top
  infos = {k: types.SimpleNamespace(num_examples=v) for k, v in sizes.items()}
  try:
    instructions = tfds_splits.ReadInstruction.from_spec(split).to_absolute(infos)
  except (ValueError, KeyError, AssertionError) as e:
    raise ValueError(f"Cannot read split {split!r} ({e}); accepted: {sorted(sizes)} or tfds "
                     "slices of them such as 'train[:90%]'.") from e
  return [(i.splitname, i.from_, i.to) for i in instructions]


def _slice_arrays(split: str, arrays: dict[str, tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
  """Concatenates the parts of per-split arrays that ``split`` selects."""
  ranges = _split_ranges(split, {k: len(v[0]) for k, v in arrays.items()})
  if len(ranges) == 1:
    name, start, stop = ranges[0]
    return tuple(a[start:stop] for a in arrays[name])
  return tuple(np.concatenate([arrays[n][i][a:b] for n, a, b in ranges])
               for i in range(len(next(iter(arrays.values())))))


@functools.lru_cache(maxsize=1)
def digits_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """scikit-learn's bundled digits with a fixed stratified 80/20 split (1437 train / 360 test).

  Returns:
    {'train': (images, labels), 'test': (images, labels)}; images uint8 (N, 8, 8, 1) in 0..16.
  """
  try:
    from sklearn import datasets, model_selection  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("The digits dataset needs scikit-learn: pip install 'atac-jax[test]' "
                      "(or pip install scikit-learn).") from e
  digits = datasets.load_digits()
  images = digits.images.astype(np.uint8)[..., None]
  train, test = model_selection.train_test_split(
      np.arange(len(images)), test_size=0.2, random_state=0, stratify=digits.target)
  return {name: (images[idx], digits.target[idx].astype(np.int64))
          for name, idx in (("train", train), ("test", test))}


def _unknown_tfds_name(name: str, known: Sequence[str]) -> str:
  """One line for a dataset name tfds does not know: close matches, never the whole registry."""
  close = difflib.get_close_matches(name.split(":")[0].split("/")[0], known, n=3)
  hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
  return (f"config.dataset.name={name!r} is not a tfds dataset (source='tfds'); {hint}Image "
          "classification datasets include 'cifar10', 'cifar100', 'mnist', 'imagenet2012'; "
          "tfds.list_builders() lists all. For the bundled digits use source='sklearn'.")


def _tfds_source(config: ml_collections.ConfigDict, split: str) -> TfdsSource:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = config.data_dir or None
  try:
    data_source = tfds.data_source(config.name, split=split, data_dir=data_dir, download=False)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(_unknown_tfds_name(config.name, tfds.list_builders(
        with_community_datasets=False))) from None
  except Exception as e:  # pylint: disable=broad-except
    builder = tfds.builder(config.name, data_dir=data_dir)
    if not builder.is_prepared():
      flag = f" --data-dir {config.data_dir}" if config.data_dir else ""
      raise FileNotFoundError(
          f"tfds dataset {config.name!r} is not prepared in {builder.data_dir}. Prepare it once "
          f"with: atac-prepare {config.name}{flag}") from e
    raise ValueError(
        f"Cannot open split {split!r} of tfds dataset {config.name!r} in {builder.data_dir} "
        f"({type(e).__name__}: {e}). The project reads array_record files; prepare the dataset "
        f"with `atac-prepare {config.name}` (file_format='array_record').") from e
  label_key = "coarse_label" if config.label_mode == "coarse" else "label"
  return TfdsSource(data_source, label_key=label_key)


def _tarball_source(config: ml_collections.ConfigDict, split: str) -> ArraySource:
  key = (config.name, config.label_mode)
  if key not in cifar_tarball.NUM_CLASSES:
    raise ValueError(f"source='tarball' reads {sorted(cifar_tarball.TARBALLS)} with label_mode "
                     f"'fine' ('coarse' for cifar100 only), got name={config.name!r}, "
                     f"label_mode={config.label_mode!r}.")
  splits = cifar_tarball.read(cifar_tarball.resolve(config.name, config.path), config.name)
  coarse = config.label_mode == "coarse"
  arrays = {k: (s.images, s.coarse_labels if coarse else s.labels) for k, s in splits.items()}
  images, labels = _slice_arrays(split, arrays)
  return ArraySource(images, labels, num_classes=cifar_tarball.NUM_CLASSES[key])


def _synthetic_source(config: ml_collections.ConfigDict, split: str) -> SyntheticSource:
  sizes = {"train": config.synthetic_num_examples, config.eval_split:
           config.synthetic_num_eval_examples}
  if split not in sizes:
    raise ValueError(f"Unknown synthetic split {split!r}; accepted: {sorted(sizes)}.")
  return SyntheticSource(sizes[split], shape=config.synthetic_shape,
                         num_classes=config.synthetic_num_classes, seed=config.synthetic_seed,
                         split_id=0 if split == "train" else 1)


def open_source(config: ml_collections.ConfigDict, split: str) -> ImageSource:
  """Opens one split of the dataset a config describes.

  Args:
    config: the dataset config (see `atac_train.data.default_config`).
    split: a split name, or a tfds-style slice such as 'train[:90%]' (not for synthetic).

  Returns:
    An `ImageSource`.

  Raises:
    ValueError: for an unknown source/dataset/split combination (the message lists what is
      accepted) or an unreadable tarball.
    FileNotFoundError: for a missing tarball or an unprepared tfds dataset.
  """
  config_lib.validate(config)
  if config.source == "tfds":
    return _tfds_source(config, split)
  if config.source == "tarball":
    return _tarball_source(config, split)
  if config.source == "synthetic":
    return _synthetic_source(config, split)
  if config.name != "digits":
    raise ValueError(f"source='sklearn' provides the dataset 'digits' only, got "
                     f"name={config.name!r}; use source='tfds' or 'tarball' for {config.name!r}.")
  images, labels = _slice_arrays(split, digits_splits())
  return ArraySource(images, labels, num_classes=10, max_value=16.0)
