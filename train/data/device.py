"""The device half of each input recipe: colour jitter, PCA lighting, rotation, normalisation.

The host pipeline (:mod:`atac_train.data.augment`) ships uint8 pixels and, for the 'imagenet'
and 'alexnet' recipes, a float32 ``augment`` vector per example holding that example's random
draws (made from its position in the global stream, so the result does not depend on the process
count). :class:`DeviceTransform` turns such a batch into the model's float32 input inside the
jitted step. It follows PIL's ``ImageEnhance`` and ``Image.rotate`` formulas in float32; the colour
ops clip and truncate to whole levels after each op as PIL's uint8 images do, so they reproduce
the host recipe they replace (`tests/test_device_augment.py` compares them).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from atac_jax.preprocessing import Normalizer
from atac_train.data import augment as augment_lib
from atac_train.data import config as config_lib

# AlexNet PCA lighting: eigenvalues/vectors of ImageNet RGB covariance (0..255 pixel scale).
PCA_EIGVAL = np.array([55.46, 4.794, 1.148], np.float32)
PCA_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                       [-0.5808, -0.0045, -0.8140],
                       [-0.5836, -0.6948, 0.4203]], np.float32)
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # PIL's convert('L') weights


def _gray(x: jax.Array) -> jax.Array:
  """(B, H, W, 1) luma of (B, H, W, C) pixels, rounded as PIL's convert('L')."""
  return x if x.shape[-1] == 1 else jnp.floor(x @ _LUMA + 0.5)[..., None]


def color_jitter(x: jax.Array, factors: jax.Array, order: jax.Array) -> jax.Array:
  """PIL's Brightness, Contrast and Color enhancers with per-example factors and order.

  Args:
    x: float32 (B, H, W, C) pixels in [0, 255].
    factors: (B, 3) brightness, contrast and saturation factors.
    order: (B, 3) op indices (0 brightness, 1 contrast, 2 saturation), applied left to right.

  Returns:
    float32 (B, H, W, C) whole levels in [0, 255]. Each op blends with a degenerate image and
    truncates, as PIL does: black (brightness), the rounded mean luma (contrast), the luma image
    (saturation).
  """
  order = order.astype(jnp.int32)
  for k in range(3):
    op = order[:, k, None, None, None]
    factor = jnp.take_along_axis(factors, order[:, k:k + 1], axis=1)[:, :, None, None]
    gray = _gray(x)
    mean = jnp.floor(jnp.mean(gray, axis=(1, 2, 3), keepdims=True) + 0.5)
    degenerate = jnp.where(op == 0, 0.0, jnp.where(op == 1, mean, gray))
    x = jnp.floor(jnp.clip(degenerate + factor * (x - degenerate), 0.0, 255.0))
  return x


def pca_lighting(x: jax.Array, alpha: jax.Array) -> jax.Array:
  """Adds ``eigvec @ (alpha * eigval)`` to every RGB pixel (alpha: (B, 3)); clips to [0, 255]
  and truncates to whole levels (the host recipe's uint8 cast)."""
  offset = (alpha * PCA_EIGVAL) @ PCA_EIGVEC.T
  return jnp.floor(jnp.clip(x + offset[:, None, None, :], 0.0, 255.0))


def rotate(x: jax.Array, degrees: jax.Array) -> jax.Array:
  """PIL's ``Image.rotate(angle, resample=BILINEAR)`` per example: counter-clockwise about the
  centre, same size, black where the source falls outside the image.

  Args:
    x: float32 (B, H, W, C).
    degrees: (B,) angles.
  """
  _, height, width, _ = x.shape
  theta = -jnp.deg2rad(degrees)[:, None, None]
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  cx, cy = width / 2.0, height / 2.0
  ys, xs = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32) + 0.5 - cy,
                        jnp.arange(width, dtype=jnp.float32) + 0.5 - cx, indexing="ij")
  src_x = cos * xs + sin * ys + cx  # PIL's inverse affine map, at output pixel centres
  src_y = -sin * xs + cos * ys + cy
  inside = (src_x >= 0) & (src_x < width) & (src_y >= 0) & (src_y < height)
  fx, fy = src_x - 0.5, src_y - 0.5
  x0, y0 = jnp.floor(fx), jnp.floor(fy)
  wx, wy = (fx - x0)[..., None], (fy - y0)[..., None]

  def take(img, yy, xx):
    yy = jnp.clip(yy, 0, height - 1).astype(jnp.int32)
    xx = jnp.clip(xx, 0, width - 1).astype(jnp.int32)
    return img[yy, xx]

  def sample(img, y0, x0, wy, wx):
    top = take(img, y0, x0) * (1 - wx) + take(img, y0, x0 + 1) * wx
    bottom = take(img, y0 + 1, x0) * (1 - wx) + take(img, y0 + 1, x0 + 1) * wx
    return top * (1 - wy) + bottom * wy

  out = jax.vmap(sample)(x, y0, x0, wy, wx)
  return jnp.where(inside[..., None], out, 0.0)


@dataclasses.dataclass(frozen=True)
class DeviceTransform:
  """Maps a host batch's uint8 ``image`` (and ``augment`` draws) to the model's float32 input.

  Hashable, so it can be a static argument of a jitted step.

  Attributes:
    mean: per-channel mean of [0, 1] pixels.
    std: per-channel standard deviation of [0, 1] pixels.
    max_value: the pixel value of full intensity (255; 16 for the digits).
    rotate: whether the ``augment`` draws include a rotation ('alexnet').
  """
  mean: tuple[float, ...]
  std: tuple[float, ...]
  max_value: float = 255.0
  rotate: bool = False

  @classmethod
  def from_info(cls, info: config_lib.DatasetInfo) -> DeviceTransform:
    """The transform of a dataset (`atac_train.data.get_info`)."""
    return cls(mean=tuple(info.mean), std=tuple(info.std), max_value=float(info.max_value),
               rotate=info.augment == "alexnet")

  def normalize(self, images: jax.Array) -> jax.Array:
    """float32 ``(x / max_value - mean) / std`` (the eval input), bit-identical to
    :class:`atac_jax.preprocessing.Normalizer` (the same constants and operations)."""
    normalizer = Normalizer(np.asarray(self.mean), np.asarray(self.std), max_value=self.max_value)
    return (jnp.asarray(images, jnp.float32) - normalizer.offset) * normalizer.scale

  def __call__(self, batch: dict[str, Any]) -> jax.Array:
    """The train input: the ``augment`` draws applied (when present), then normalised."""
    images = batch["image"]
    if "augment" not in batch:
      return self.normalize(images)
    params = batch["augment"].astype(jnp.float32)
    x = color_jitter(images.astype(jnp.float32), params[:, augment_lib.FACTORS],
                     params[:, augment_lib.ORDER])
    if x.shape[-1] == 3:
      x = pca_lighting(x, params[:, augment_lib.LIGHTING])
    if self.rotate:
      x = rotate(x, params[:, augment_lib.ANGLE])
    return self.normalize(x)


def batch_shapes(info: config_lib.DatasetInfo, batch_size: int
                 ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """``{key: (shape, dtype)}`` of a host train batch of ``batch_size`` rows for ``info``."""
  shapes = {"image": ((batch_size, *info.image_shape), np.dtype(np.uint8)),
            "label": ((batch_size,), np.dtype(np.int32))}
  if info.augment in augment_lib.DEVICE_KINDS:
    shapes["augment"] = ((batch_size, augment_lib.NUM_PARAMS), np.dtype(np.float32))
  return shapes


def example_batch(info: config_lib.DatasetInfo, batch_size: int, *, seed: int = 0
                  ) -> dict[str, np.ndarray]:
  """A random host train batch (valid pixels, labels and draws) for benchmarks."""
  rng = np.random.default_rng(seed)
  shapes = batch_shapes(info, batch_size)
  batch = {"image": rng.integers(0, math.floor(info.max_value) + 1, shapes["image"][0],
                                 dtype=np.uint8),
           "label": rng.integers(0, info.num_classes, batch_size).astype(np.int32)}
  if "augment" in shapes:
    draws = [augment_lib.jitter_factors(rng, channels=info.image_shape[-1], strength=0.4)
             for _ in range(batch_size)]
    params = np.zeros(shapes["augment"][0], np.float32)
    params[:, augment_lib.FACTORS] = [f for f, _ in draws]
    params[:, augment_lib.ORDER] = [o for _, o in draws]
    params[:, augment_lib.LIGHTING] = rng.normal(0.0, 0.1, (batch_size, 3))
    params[:, augment_lib.ANGLE] = rng.uniform(-20.0, 20.0, batch_size)
    batch["augment"] = params
  return batch
