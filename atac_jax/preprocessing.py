"""Eval-time image preprocessing, the same for training, evaluation and reuse of a checkpoint.

A trained model expects images prepared exactly as its evaluation split was: decoded, resized
(ImageNet-style recipes: shorter side to ``H * 256 / 224``, then a centre crop), and normalised
per channel as ``(pixel / max_value - mean) / std``. The trainer saves every number this needs in
the checkpoint's config (``dataset.image_shape``, ``dataset.augment``, ``dataset.mean``,
``dataset.std``, ``dataset.max_value``), and :func:`preprocess` applies it:

>>> model, variables, config = atac_jax.checkpoint.load("workdirs/quickstart")
>>> x = atac_jax.checkpoint.preprocess(images, config)   # uint8 (N, H, W, C) or encoded bytes
>>> logits = model.apply(variables, x, train=False)

The training pipeline (``atac_train.data``) uses the functions of this module for its eval path
(decode, resize, centre crop on the host; the same normalisation, with the same float32 constants,
inside the jitted eval step), so :func:`preprocess` gives bit-identical model inputs.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

ImageLike = np.ndarray | bytes


def decode(image: ImageLike, channels: int) -> np.ndarray:
  """Returns a uint8 (H, W, channels) array; decodes encoded image bytes with PIL."""
  if isinstance(image, (bytes, bytearray)):
    with Image.open(io.BytesIO(image)) as img:
      image = np.asarray(img.convert("L" if channels == 1 else "RGB"))
  image = np.asarray(image)
  return image[..., None] if image.ndim == 2 else image


def to_pil(image: np.ndarray) -> Image.Image:
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def from_pil(img: Image.Image) -> np.ndarray:
  image = np.asarray(img)
  return image[..., None] if image.ndim == 2 else image


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bilinear (antialiased) resize to ``size`` = (height, width)."""
  if image.shape[:2] == tuple(size):
    return image
  return from_pil(to_pil(image).resize((size[1], size[0]), Image.BILINEAR))


def resize_shorter(image: np.ndarray, side: int) -> np.ndarray:
  """Resizes so the shorter side is ``side``, keeping the aspect ratio."""
  h, w = image.shape[:2]
  scale = side / min(h, w)
  return resize(image, (max(1, round(h * scale)), max(1, round(w * scale))))


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """The central ``size`` x ``size`` window (the image must be at least that large)."""
  h, w = image.shape[:2]
  top, left = (h - size) // 2, (w - size) // 2
  return image[top:top + size, left:left + size]


def eval_transform(image: ImageLike, *, kind: str, size: tuple[int, int],
                   channels: int) -> np.ndarray:
  """The deterministic eval geometry of augmentation ``kind``: uint8 (H, W, channels).

  'imagenet': resize the shorter side to H*256/224, centre crop H x H; otherwise resize to
  (H, W) (a no-op at the native size).
  """
  image = decode(image, channels)
  if kind == "imagenet":
    return center_crop(resize_shorter(image, round(size[0] * 256 / 224)), size[0])
  return resize(image, size)


class Normalizer:
  """Maps a batch of pixels to float32 ``(x / max_value - mean) / std``.

  Computed as ``(x - offset) * scale`` with float32 ``offset = mean * max_value`` and
  ``scale = 1 / (max_value * std)``: a subtraction then a product, which no compiler fuses into
  one FMA, so the training step's on-device normalisation
  (``atac_train.data.device.DeviceTransform``, same constants) gives bit-identical inputs.

  Args:
    mean: per-channel mean of [0, 1] pixels.
    std: per-channel standard deviation of [0, 1] pixels.
    max_value: the pixel value of full intensity (255; 16 for digits).
  """

  def __init__(self, mean: np.ndarray, std: np.ndarray, *, max_value: float = 255.0):
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    self.offset = (mean * max_value).astype(np.float32)
    self.scale = (1.0 / (max_value * std)).astype(np.float32)

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """Normalises a uint8 batch (B, H, W, C) to float32."""
    out = np.subtract(images, self.offset, dtype=np.float32)
    out *= self.scale
    return out


def _as_images(images: ImageLike | Sequence[ImageLike], channels: int
               ) -> list[ImageLike]:
  """Splits ``images`` into single images, checking each array's rank and channel count."""
  accepted = (f"accepted: uint8 arrays (H, W, {channels}) or (N, H, W, {channels})"
              + (", (H, W)" if channels == 1 else "") + ", encoded PNG/JPEG bytes, or a "
              "sequence of these")
  if isinstance(images, (bytes, bytearray)):
    return [images]
  if isinstance(images, np.ndarray):
    if images.ndim == 4:
      batch = list(images)
    elif images.ndim in (2, 3):
      batch = [images]
    else:
      raise ValueError(f"images has shape {images.shape} (rank {images.ndim}); {accepted}.")
  else:
    batch = list(images)
  for image in batch:
    if isinstance(image, (bytes, bytearray)):
      continue
    shape = np.shape(image)
    if len(shape) == 2 and channels == 1:
      continue
    if len(shape) != 3 or shape[-1] != channels:
      hint = ""
      if isinstance(images, np.ndarray) and images.ndim == 3 and channels == 1:
        hint = (f" A 3-D array is one (H, W, C) image; for a batch of {images.shape[0]} "
                "one-channel images add the channel axis: images[..., None].")
      raise ValueError(f"an image of shape {shape} does not match the checkpoint's "
                       f"dataset.image_shape (H, W, C) with C = {channels}; {accepted}.{hint}")
  return batch


def _check_pixels(image: np.ndarray, max_value: float) -> np.ndarray:
  """``image`` as uint8 if its dtype and values fit ``[0, max_value]``; else a ValueError."""
  accepted = (f"accepted: integer pixels (uint8) in [0, {max_value:g}], the range the model was "
              f"trained on (dataset.max_value = {max_value:g})")
  if not np.issubdtype(image.dtype, np.integer):
    raise ValueError(
        f"images have dtype {image.dtype}; {accepted}. Convert pixel values that are whole "
        f"numbers with images.astype(np.uint8) (scikit-learn's digits are float64 in 0..16); "
        f"already-normalised inputs go to the model directly.")
  if image.size:
    low, high = int(image.min()), int(image.max())
    if low < 0 or high > max_value:
      raise ValueError(
          f"pixel values span [{low}, {high}]; {accepted}. Rescale them first, e.g. "
          f"np.round(images * {max_value:g} / {high}).astype(np.uint8) for images scaled to "
          f"0..{high}.")
  return image.astype(np.uint8) if max_value <= 255 else image


def preprocess(images: ImageLike | Sequence[ImageLike], config: Mapping[str, Any]
               ) -> np.ndarray:
  """Prepares images for a model trained with ``config`` exactly as its evaluation did.

  The inputs are checked against the checkpoint's preprocessing record before anything is
  computed, so that images in another pixel range or layout fail with a message instead of giving
  confident wrong predictions.

  Args:
    images: one image (uint8 (H, W[, C]) array or encoded JPEG/PNG bytes), a batch array
      (N, H, W, C), or a sequence of images. Pixels are integers in
      ``[0, dataset.max_value]`` (255 for photos, 16 for the digits); C is the channel count of
      ``dataset.image_shape``; H and W may differ from it (images are resized as for eval).
    config: the resolved training config saved with the checkpoint (as returned by
      :func:`atac_jax.checkpoint.load`).

  Returns:
    float32 (N, H, W, C) with ``(H, W, C) = dataset.image_shape``.

  Raises:
    ValueError: if the config lacks the preprocessing record (checkpoints written before it
      was saved; the message names the missing keys), or if an image's rank, channel count,
      dtype (not an integer type) or pixel range (outside ``[0, dataset.max_value]``) does not
      match the checkpoint's preprocessing; the message says what is accepted.
  """
  dataset = config["dataset"]
  missing = [k for k in ("image_shape", "mean", "std") if not dataset.get(k)]
  if missing:
    raise ValueError(f"The config has no dataset.{', dataset.'.join(missing)}: it was saved by "
                     "an older atac-jax; preprocess as its training did.")
  height, width, channels = (int(v) for v in dataset["image_shape"])
  max_value = float(dataset.get("max_value", 255.0))
  kind = dataset.get("augment", "none")
  prepared = []
  for image in _as_images(images, channels):
    pixels = decode(image, channels)
    prepared.append(eval_transform(_check_pixels(pixels, max_value), kind=kind,
                                   size=(height, width), channels=channels))
  if not prepared:
    raise ValueError("images is empty; accepted: at least one image.")
  mean = np.broadcast_to(np.asarray(dataset["mean"], np.float32), (channels,))
  std = np.broadcast_to(np.asarray(dataset["std"], np.float32), (channels,))
  return Normalizer(mean, std, max_value=max_value)(np.stack(prepared))
