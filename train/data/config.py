"""The dataset config (`default_config`), the `DatasetInfo` record and the choices they accept."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import ml_collections
import numpy as np

SOURCES = ("sklearn", "tfds", "tarball", "synthetic")
AUGMENTS = ("none", "cifar", "imagenet", "alexnet", "digits")
LABEL_MODES = ("fine", "coarse")

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Per-dataset statistics used when `mean`/`std` are left empty; anything else gets 0.5/0.5.
_DEFAULT_STATS = {
    "cifar10": (CIFAR_MEAN, CIFAR_STD),
    "cifar100": (CIFAR_MEAN, CIFAR_STD),
    "imagenet2012": (IMAGENET_MEAN, IMAGENET_STD),
    "mnist": ((0.1307,), (0.3081,)),
    "digits": ((0.3053,), (0.3760,)),  # all 1797 sklearn digits scaled to [0, 1]
}
# Model input side when `image_size` is 0 and the augmentation fixes one.
_AUGMENT_SIZES = {"imagenet": 224, "alexnet": 128}


def default_config() -> ml_collections.ConfigDict:
  """Returns the dataset config with defaults (the offline digits quickstart).

  Trainer configs set it as ``config.dataset`` and override fields, e.g.
  ``--config.dataset.name=cifar10 --config.dataset.source=tarball``.
  """
  c = ml_collections.ConfigDict()
  # Dataset: digits | cifar10 | cifar100 | mnist | imagenet2012 | synthetic, or any tfds name
  # with source='tfds'.
  c.name = "digits"
  # Where examples come from: 'sklearn' (bundled digits, offline), 'tfds' (array_record
  # `tfds.data_source`, prepared with `atac-prepare NAME --data-dir DIR`), 'tarball' (the
  # official CIFAR-10/100 python tarballs, no TensorFlow) or 'synthetic' (generated from a seed).
  c.source = "sklearn"
  # tfds data dir; '' = the tfds default (~/tensorflow_datasets or $TFDS_DATA_DIR).
  c.data_dir = ""
  # CIFAR tarball path; '' = download once to ~/.cache/atac_jax/ (md5-verified).
  c.path = ""
  # CIFAR-100 labels: 'fine' (100 classes) or 'coarse' (20 superclasses; the reference's
  # default, needed only to reproduce its "CIFAR-100" plot).
  c.label_mode = "fine"
  # Split names; tfds slicing ('train[:90%]') works for every source except synthetic.
  # digits has a fixed stratified held-out 'test' split (1437 train / 360 test).
  c.train_split = "train"
  c.eval_split = "test"  # imagenet2012: 'validation'
  # Training augmentation: 'none' | 'cifar' (pad-4 random crop + flip) | 'imagenet'
  # (random-resized-crop, flip, colour jitter 0.4, PCA lighting 0.1; eval resize+centre crop) |
  # 'alexnet' (resize 130, jitter 0.2, random-resized-crop scale 0.6-1, flip, rotation +-20 deg;
  # eval resize) | 'digits' (pad-1 random crop, no flip). Eval never augments.
  c.augment = "none"
  # Model input side in pixels; 0 = native (imagenet augment: 224, alexnet augment: 128).
  c.image_size = 0
  # Per-channel normalisation of [0, 1] pixels: (x - mean) / std. Empty = the dataset's usual
  # statistics (CIFAR, ImageNet, MNIST, digits; 0.5 / 0.5 otherwise). One value = all channels.
  c.mean = ()
  c.std = ()
  # 0 = load and augment in this process (threads); N > 0 = N grain worker processes.
  c.num_workers = 0
  # Batches prepared ahead (per worker when num_workers > 0), each by its own thread.
  c.prefetch_buffer = 2
  # Synthetic data (source='synthetic'): image shape (H, W, C), classes, split sizes, seed.
  # Each image's brightness encodes its label, so models can learn it.
  c.synthetic_shape = (32, 32, 3)
  c.synthetic_num_classes = 10
  c.synthetic_num_examples = 1024
  c.synthetic_num_eval_examples = 256
  c.synthetic_seed = 0
  return c


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the step counter need to know about a dataset config.

  Attributes:
    num_classes: number of labels.
    image_shape: (H, W, C) of the model input, after preprocessing.
    num_train: examples in ``train_split``.
    num_eval: examples in ``eval_split``.
    max_value: the pixel value of full intensity (255; 16 for the digits).
    augment: the recipe (`AUGMENTS`); its device half runs in the train step.
    mean: per-channel normalisation mean of [0, 1] pixels (applied on the device).
    std: per-channel normalisation standard deviation.
  """
  num_classes: int
  image_shape: tuple[int, int, int]
  num_train: int
  num_eval: int
  max_value: float = 255.0
  augment: str = "none"
  mean: tuple[float, ...] = (0.5,)
  std: tuple[float, ...] = (0.5,)


def _choice(config: ml_collections.ConfigDict, field: str, accepted: Sequence[str]) -> str:
  value = config[field]
  if value not in accepted:
    raise ValueError(f"dataset.{field}={value!r} is not supported; accepted: {list(accepted)}.")
  return value


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field and the accepted values for a bad config."""
  _choice(config, "source", SOURCES)
  _choice(config, "augment", AUGMENTS)
  _choice(config, "label_mode", LABEL_MODES)
  if config.image_size < 0:
    raise ValueError(f"dataset.image_size must be >= 0 (0 = native), got {config.image_size}.")
  if config.num_workers < 0 or config.prefetch_buffer < 1:
    raise ValueError("dataset.num_workers must be >= 0 and dataset.prefetch_buffer >= 1, got "
                     f"{config.num_workers} and {config.prefetch_buffer}.")


def output_shape(config: ml_collections.ConfigDict,
                 native_shape: tuple[int | None, ...]) -> tuple[int, int, int]:
  """Returns the (H, W, C) of preprocessed images for a source whose images are ``native_shape``.

  Raises:
    ValueError: if the images vary in size and neither ``image_size`` nor the augmentation
      fixes one.
  """
  size = config.image_size or _AUGMENT_SIZES.get(config.augment, 0)
  height, width, channels = native_shape
  if size:
    return (size, size, channels)
  if height is None or width is None:
    raise ValueError(f"The images of {config.name!r} vary in size; set dataset.image_size "
                     "(e.g. 224) or use augment='imagenet' or 'alexnet'.")
  return (height, width, channels)


def normalization_values(config: ml_collections.ConfigDict, channels: int
                         ) -> tuple[list[float], list[float]]:
  """Per-channel (mean, std) as Python floats, one per channel, for [0, 1] pixels.

  Empty ``mean``/``std`` mean the dataset's usual statistics (0.5 / 0.5 for unknown datasets).
  """
  mean, std = tuple(config.mean), tuple(config.std)
  default_mean, default_std = _DEFAULT_STATS.get(config.name, ((0.5,), (0.5,)))
  mean, std = mean or default_mean, std or default_std
  values = []
  for field, value in (("mean", mean), ("std", std)):
    if len(value) not in (1, channels):
      raise ValueError(f"dataset.{field} has {len(value)} values; the images have {channels} "
                       f"channel(s), so give 1 or {channels} values.")
    values.append([float(v) for v in value] * (channels if len(value) == 1 else 1))
  if min(values[1]) <= 0:
    raise ValueError(f"dataset.std must be > 0, got {std}.")
  return values[0], values[1]


def normalization(config: ml_collections.ConfigDict, channels: int) -> tuple[np.ndarray, np.ndarray]:
  """Returns per-channel float32 (mean, std), each of shape (channels,), for [0, 1] pixels."""
  mean, std = normalization_values(config, channels)
  return np.asarray(mean, np.float32), np.asarray(std, np.float32)
