"""Per-example preprocessing in NumPy/PIL: training augmentations, eval resizing, normalisation.

Augmentations take an image (uint8 (H, W, C) array, or encoded JPEG/PNG bytes) and a
``np.random.Generator`` (grain passes one per element, derived from the pipeline seed and the
element's index) and return a uint8 (H, W, C) array in the same value range; every random choice
comes from that generator, so the result is a function of (seed, index). Normalisation to float32
happens once per batch (`Normalizer`). The eval-time steps (decode, resize, centre crop,
`Normalizer`) come from :mod:`atac_jax.preprocessing`, which reusers of a checkpoint call too.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageEnhance

from atac_jax import preprocessing
# The eval-time functions live in the library (shared with atac_jax.checkpoint.preprocess).
from atac_jax.preprocessing import (  # noqa: F401  (re-exported)
    Normalizer, center_crop, decode, resize, resize_shorter)
from atac_jax.preprocessing import from_pil as _from_pil
from atac_jax.preprocessing import to_pil as _to_pil

# AlexNet PCA lighting: eigenvalues/vectors of ImageNet RGB covariance (0..255 pixel scale).
_PCA_EIGVAL = np.array([55.46, 4.794, 1.148], np.float32)
_PCA_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                        [-0.5808, -0.0045, -0.8140],
                        [-0.5836, -0.6948, 0.4203]], np.float32)

ImageLike = preprocessing.ImageLike
Augment = Callable[[ImageLike, np.random.Generator], np.ndarray]
Preprocess = Callable[[ImageLike], np.ndarray]


def pad_crop(image: np.ndarray, rng: np.random.Generator, *, pad: int) -> np.ndarray:
  """Zero-pads ``pad`` pixels on each side and takes a random crop of the original size."""
  h, w = image.shape[:2]
  dy, dx = rng.integers(-pad, pad + 1, size=2)  # Window offset; copying beats np.pad 3x.
  out = np.zeros_like(image)
  out[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)] = (
      image[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)])
  return out


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Mirrors left-right with probability 1/2."""
  return image[:, ::-1] if rng.random() < 0.5 else image


def crop_box(height: int, width: int, rng: np.random.Generator, *, scale: tuple[float, float],
             ratio: tuple[float, float]) -> tuple[int, int, int, int]:
  """Inception-style random crop (top, left, h, w): area fraction in ``scale``, aspect in ``ratio``.

  Ten tries as in torchvision/GluonCV, then the largest central crop within ``ratio``.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, *, size: int,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
  """A `crop_box` crop resized (bilinear) to ``size`` x ``size`` in one PIL call."""
  top, left, h, w = crop_box(image.shape[0], image.shape[1], rng, scale=scale, ratio=ratio)
  img = _to_pil(image).resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
  return _from_pil(img)


def color_jitter(image: np.ndarray, rng: np.random.Generator, *, brightness: float,
                 contrast: float, saturation: float) -> np.ndarray:
  """Brightness, contrast and saturation factors from U[1-s, 1+s], applied in random order.

  Saturation is skipped for single-channel images.
  """
  ops = [(ImageEnhance.Brightness, brightness), (ImageEnhance.Contrast, contrast)]
  if image.shape[-1] == 3:
    ops.append((ImageEnhance.Color, saturation))
  factors = [rng.uniform(1 - s, 1 + s) for _, s in ops]
  img = _to_pil(image)
  for i in rng.permutation(len(ops)):
    img = ops[i][0](img).enhance(factors[i])
  return _from_pil(img)


def pca_lighting(image: np.ndarray, rng: np.random.Generator, *, std: float) -> np.ndarray:
  """AlexNet PCA colour noise: adds eigvec @ (N(0, std) * eigval) to every RGB pixel."""
  alpha = rng.normal(0.0, std, 3).astype(np.float32)
  offset = _PCA_EIGVEC @ (alpha * _PCA_EIGVAL)
  return np.clip(image + offset, 0, 255).astype(np.uint8)


def random_rotate(image: np.ndarray, rng: np.random.Generator, *, degrees: float) -> np.ndarray:
  """Rotates by U[-degrees, degrees] (bilinear, black corners, same size)."""
  angle = rng.uniform(-degrees, degrees)
  return _from_pil(_to_pil(image).rotate(angle, resample=Image.BILINEAR))


def _train(image: ImageLike, rng: np.random.Generator, *, kind: str, size: tuple[int, int],
           channels: int) -> np.ndarray:
  image = decode(image, channels)
  side = size[0]
  if kind == "imagenet":
    image = random_resized_crop(image, rng, size=side)
    image = random_flip(image, rng)
    image = color_jitter(image, rng, brightness=0.4, contrast=0.4, saturation=0.4)
    return pca_lighting(image, rng, std=0.1) if channels == 3 else image
  if kind == "alexnet":
    image = resize_shorter(image, round(side * 130 / 128))
    image = color_jitter(image, rng, brightness=0.2, contrast=0.2, saturation=0.2)
    image = random_resized_crop(image, rng, size=side, scale=(0.6, 1.0))
    image = random_flip(image, rng)
    return random_rotate(image, rng, degrees=20.0)
  image = resize(image, size)
  if kind == "cifar":
    return random_flip(pad_crop(image, rng, pad=4), rng)
  if kind == "digits":
    return pad_crop(image, rng, pad=1)
  return image


def _eval(image: ImageLike, *, kind: str, size: tuple[int, int], channels: int) -> np.ndarray:
  return preprocessing.eval_transform(image, kind=kind, size=size, channels=channels)


def _size(size: int | Sequence[int]) -> tuple[int, int]:
  return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def train_augment(kind: str, *, size: int | Sequence[int], channels: int) -> Augment:
  """Returns ``augment(image, rng) -> uint8 (H, W, channels)`` for an augmentation name.

  Args:
    kind: 'none' | 'cifar' | 'imagenet' | 'alexnet' | 'digits' (see `default_config`); the
      crops of 'imagenet' and 'alexnet' are square (side ``H``).
    size: output side, or (H, W).
    channels: 1 or 3.
  """
  _check(kind)
  return functools.partial(_train, kind=kind, size=_size(size), channels=channels)


def eval_preprocess(kind: str, *, size: int | Sequence[int], channels: int) -> Preprocess:
  """Returns the deterministic eval counterpart ``preprocess(image) -> uint8 (H, W, C)``.

  'imagenet': resize the shorter side to H*256/224, centre crop H x H; otherwise resize to
  (H, W) (a no-op at the native size).
  """
  _check(kind)
  return functools.partial(_eval, kind=kind, size=_size(size), channels=channels)


def _check(kind: str) -> None:
  accepted = ("none", "cifar", "imagenet", "alexnet", "digits")
  if kind not in accepted:
    raise ValueError(f"Unknown augmentation {kind!r}; accepted: {list(accepted)}.")
