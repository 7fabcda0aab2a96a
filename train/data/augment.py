"""Per-example host preprocessing (NumPy, PIL, simplejpeg, OpenCV): each recipe's geometric half.

Augmentations take an image (uint8 (H, W, C) array, or encoded JPEG/PNG bytes) and a
``np.random.Generator`` (grain passes one per element, derived from the pipeline seed and the
element's index) and return ``{'image': uint8 (H, W, C)}``: decode (only what the crop needs),
crop, resize, flip. Recipes with colour augmentation ('imagenet', 'alexnet') also return
``'augment'``, a float32 vector of the per-example draws (`NUM_PARAMS` values, layout below) that
:class:`atac_train.data.device.DeviceTransform` applies inside the jitted step together with the
normalisation, so the host ships uint8 pixels (4x fewer bytes than float32). Every random
choice comes from the generator, in the same order as when the whole recipe ran on the host, so
the result is a function of (seed, index). The 'imagenet' and 'alexnet' crops are resized by
`resample` (OpenCV; PIL's resize where OpenCV is not installed: the same draws, pixels within
about a level, ``tests/test_augment.py``). The eval-time steps (decode, resize, centre crop,
`Normalizer`) come from :mod:`atac_jax.preprocessing`, which reusers of a checkpoint call too.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

try:  # libjpeg-turbo through a thinner layer than PIL's: the same pixels in ~0.9x the time
  import simplejpeg as _simplejpeg
except ImportError:  # the pure-PIL path decodes the same pixels
  _simplejpeg = None
try:  # SIMD filtering and warping: the crop's antialiased resize in ~0.3x PIL's time
  import cv2 as _cv2
except ImportError:  # the pure-PIL path resizes with PIL's own antialiased bilinear filter
  _cv2 = None

from atac_jax import preprocessing
# The eval-time functions live in the library (shared with atac_jax.checkpoint.preprocess).
from atac_jax.preprocessing import (  # noqa: F401  (re-exported)
    Normalizer, center_crop, decode, resize, resize_shorter)
from atac_jax.preprocessing import from_pil as _from_pil
from atac_jax.preprocessing import to_pil as _to_pil

# Layout of the per-example ``augment`` vector read by the device half of the recipe.
FACTORS = slice(0, 3)  # brightness, contrast, saturation factors
ORDER = slice(3, 6)  # op indices (0 brightness, 1 contrast, 2 saturation) in the order applied
LIGHTING = slice(6, 9)  # PCA lighting coefficients (alpha ~ N(0, 0.1) per eigenvector)
ANGLE = 9  # rotation in degrees, counter-clockwise ('alexnet')
NUM_PARAMS = 10
DEVICE_KINDS = ("imagenet", "alexnet")  # recipes whose examples carry an 'augment' vector

ImageLike = preprocessing.ImageLike
Example = dict[str, np.ndarray]
Augment = Callable[[ImageLike, np.random.Generator], Example]
Preprocess = Callable[[ImageLike], np.ndarray]


def set_worker_threads() -> None:
  """One OpenCV thread in this process (a data worker: parallelism comes from the workers)."""
  if _cv2 is not None:
    _cv2.setNumThreads(1)


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


def jitter_factors(rng: np.random.Generator, *, channels: int, strength: float
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Colour-jitter draws: factors from U[1-s, 1+s] and a random order of the ops.

  The ops are brightness, contrast and saturation (saturation is skipped, factor 1, for single
  channel images); returns ``(factors (3,), order (3,))``, applied by
  :class:`atac_train.data.device.DeviceTransform`.
  """
  count = 3 if channels == 3 else 2
  factors = [rng.uniform(1 - strength, 1 + strength) for _ in range(count)]
  order = rng.permutation(count)
  if count == 2:  # Saturation is an identity on gray pixels; it keeps the last slot.
    factors, order = factors + [1.0], np.append(order, 2)
  return np.asarray(factors, np.float32), order.astype(np.float32)


def _open(image: ImageLike, channels: int) -> Image.Image:
  """A PIL image not decoded yet (for bytes), so `_draft` can still shrink the JPEG decode."""
  if isinstance(image, (bytes, bytearray)):
    return Image.open(io.BytesIO(image))
  return _to_pil(decode(image, channels))


def _dct_factor(width: int, height: int, need: tuple[float, float]) -> int:
  """The DCT scale divisor (8, 4, 2 or 1) PIL's `Image.draft` picks for a JPEG of ``width`` x
  ``height`` that must stay >= ``need`` (w, h) pixels: the largest that keeps it so."""
  request = (max(1, math.ceil(need[0])), max(1, math.ceil(need[1])))
  reduce = min(width // request[0], height // request[1])
  return next(s for s in (8, 4, 2, 1) if reduce >= s or s == 1)


def _draft(img: Image.Image, need: tuple[float, float]) -> int:
  """Lets a JPEG decode at 1/2, 1/4 or 1/8 scale when the image stays >= ``need`` (w, h) pixels.

  Returns the DCT scale divisor (1 when nothing changed; other formats always decode in full).
  """
  width, height = img.size
  if img.format != "JPEG" or _dct_factor(width, height, need) == 1:
    return 1
  drafted = img.draft(img.mode, (max(1, math.ceil(need[0])), max(1, math.ceil(need[1]))))
  return 1 if drafted is None else round(width / drafted[1][2])


def _mode(img: Image.Image, channels: int) -> Image.Image:
  mode = "L" if channels == 1 else "RGB"
  return img if img.mode == mode else img.convert(mode)


def _simplejpeg_decode(source: bytes | bytearray, size: tuple[int, int]) -> np.ndarray | None:
  """simplejpeg's RGB decode of a JPEG at the DCT scale that gives ``size`` (w, h) pixels, or
  None where it cannot (then PIL decodes: e.g. data libjpeg only warns about, which
  simplejpeg's strict mode refuses)."""
  try:
    array = _simplejpeg.decode_jpeg(bytes(source), colorspace="RGB", min_width=size[0],
                                    min_height=size[1])
  except ValueError:
    return None
  return array if array.shape[:2] == (size[1], size[0]) else None


def decode_opened(img: Image.Image, source: ImageLike, *, channels: int) -> Image.Image:
  """An `open_crop` image decoded (at the DCT scale it chose) in the mode ``channels`` asks for.

  An RGB JPEG is decoded by simplejpeg where it is installed: libjpeg-turbo with the same
  settings as PIL's decoder (islow DCT, fancy upsampling), so the pixels are PIL's, bit for bit
  (``tests/test_augment.py``). Anything else, or no simplejpeg, decodes through PIL.
  """
  if (_simplejpeg is not None and channels == 3 and img.format == "JPEG" and img.mode == "RGB"
      and isinstance(source, (bytes, bytearray))):
    array = _simplejpeg_decode(source, img.size)  # after `_draft`: the DCT-scaled size
    if array is not None:
      return Image.fromarray(array)
  return _mode(img, channels)


def open_crop(image: ImageLike, rng: np.random.Generator, *, size: int, channels: int,
              scale: tuple[float, float] = (0.08, 1.0),
              ratio: tuple[float, float] = (3 / 4, 4 / 3)
              ) -> tuple[Image.Image, tuple[float, float, float, float]]:
  """Opens ``image`` (not decoded yet) and samples its `crop_box`; returns (image, PIL box).

  The box is sampled on the full image size (read from the header), exactly as after a full
  decode; a JPEG is set to decode at the smallest DCT scale (1/8..1) that keeps the box at least
  ``size`` pixels wide and high, so the resize still only shrinks and, at scale 1, the pixels
  equal those of a full decode. The box (left, top, right, bottom) is in the decoded pixels.
  """
  img = _open(image, channels)
  width, height = img.size
  top, left, h, w = crop_box(height, width, rng, scale=scale, ratio=ratio)
  factor = _draft(img, (width * size / w, height * size / h))
  return img, (left / factor, top / factor, (left + w) / factor, (top + h) / factor)


def _rgb_jpeg_size(image: ImageLike, channels: int) -> tuple[int, int] | None:
  """(width, height) of an RGB JPEG that simplejpeg decodes (from its header), else None."""
  if _simplejpeg is None or channels != 3 or not isinstance(image, (bytes, bytearray)):
    return None
  try:
    height, width, colorspace, _ = _simplejpeg.decode_jpeg_header(bytes(image))
  except ValueError:  # not a JPEG
    return None
  return (width, height) if colorspace in ("YCbCr", "RGB") else None  # PIL's mode 'RGB'


def _decode_scaled(image: ImageLike, channels: int,
                   need: Callable[[int, int], tuple[float, float]]
                   ) -> tuple[np.ndarray, int]:
  """Decodes ``image`` to a uint8 (h, w, channels) array at the DCT scale `Image.draft` picks for
  ``need(width, height)`` (called once, with the full size, before decoding); returns (pixels,
  DCT scale divisor). RGB JPEGs go through simplejpeg (the same pixels as PIL, read without PIL's
  header parse and array copies), anything else through PIL; an array is used as it is."""
  if not isinstance(image, (bytes, bytearray)):
    image = np.ascontiguousarray(decode(image, channels))  # OpenCV reads C-ordered rows
    need(image.shape[1], image.shape[0])
    return image, 1
  jpeg_size = _rgb_jpeg_size(image, channels)
  if jpeg_size is not None:
    width, height = jpeg_size
    wanted = need(width, height)
    factor = _dct_factor(width, height, wanted)
    array = _simplejpeg_decode(image, (-(-width // factor), -(-height // factor)))
    if array is not None:
      return array, factor
  img = Image.open(io.BytesIO(image))
  factor = _draft(img, wanted if jpeg_size is not None else need(*img.size))
  return _from_pil(_mode(img, channels)), factor


def _blur_kernel(shrink: float) -> np.ndarray | None:
  """A 1-D kernel that, before bilinear interpolation, antialiases a ``shrink``-fold reduction as
  PIL's bilinear filter does; None where the axis does not shrink.

  PIL's filter is a triangle of half-width ``shrink`` (variance shrink**2 / 6); bilinear
  interpolation is one of half-width 1 (variance 1/6), so the kernel adds the difference,
  (shrink**2 - 1) / 6: three taps [v/2, 1 - v, v/2] up to a 2-fold reduction (the usual case
  once the DCT scale has taken the whole halvings), a sampled Gaussian beyond.
  """
  variance = (shrink * shrink - 1) / 6
  if variance < 1e-3:
    return None
  if variance <= 0.5:
    return np.array([variance / 2, 1 - variance, variance / 2], np.float32)
  radius = math.ceil(3 * math.sqrt(variance))
  taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * variance))
  return (taps / taps.sum()).astype(np.float32)


_IDENTITY = np.ones(1, np.float32)


def resample(image: np.ndarray, box: tuple[float, float, float, float], size: tuple[int, int],
             *, flip: bool = False) -> np.ndarray:
  """``box`` (left, top, right, bottom, fractional) of a uint8 (H, W, C) array resized to ``size``
  (w, h) with an antialiased bilinear filter, mirrored left-right with ``flip``; needs OpenCV.

  The counterpart of PIL's ``resize(size, BILINEAR, box=box)`` in ~0.3x its time: each axis
  that shrinks is blurred by `_blur_kernel` (the pixels around the box only), then sampled
  bilinearly at the output pixel centres (``cv2.warpAffine``, whose map also mirrors), so the
  filter has the width of PIL's. Against PIL on the benchmark's JPEGs: mean |difference| ~0.35
  levels, no bias (``tests/test_augment.py``).
  """
  left, top, right, bottom = box
  out_w, out_h = size
  sx, sy = (right - left) / out_w, (bottom - top) / out_h
  kx, ky = _blur_kernel(sx), _blur_kernel(sy)
  mx = 2 + (0 if kx is None else len(kx) // 2)  # the pixels bilinear sampling and blur read
  my = 2 + (0 if ky is None else len(ky) // 2)
  height, width = image.shape[:2]
  x0, y0 = max(math.floor(left) - mx, 0), max(math.floor(top) - my, 0)
  region = image[y0:min(math.ceil(bottom) + my, height), x0:min(math.ceil(right) + mx, width)]
  if kx is not None or ky is not None:
    region = _cv2.sepFilter2D(region, -1, _IDENTITY if kx is None else kx,
                              _IDENTITY if ky is None else ky, borderType=_cv2.BORDER_REPLICATE)
  # Output pixel centre x + 0.5 reads input position left + (x + 0.5) * sx (pixel centres at
  # +0.5 in both), relative to the region; mirrored, output x reads what out_w - 1 - x would.
  dx = left - x0 + 0.5 * sx - 0.5
  matrix = np.array([[-sx, 0.0, dx + (out_w - 1) * sx] if flip else [sx, 0.0, dx],
                     [0.0, sy, top - y0 + 0.5 * sy - 0.5]])
  out = _cv2.warpAffine(region, matrix, (out_w, out_h),
                        flags=_cv2.INTER_LINEAR | _cv2.WARP_INVERSE_MAP,
                        borderMode=_cv2.BORDER_REPLICATE)
  return out.reshape(out_h, out_w, image.shape[2])


def decode_resized_crop(image: ImageLike, rng: np.random.Generator, *, size: int, channels: int,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        flip: bool = False) -> np.ndarray:
  """An `open_crop` crop (array or encoded bytes) resized (bilinear, antialiased) to ``size``
  x ``size``, decoding only what the crop needs; uint8 (size, size, channels).

  With ``flip``, then mirrored left-right with probability 1/2 (one more draw, as
  `random_flip`). With OpenCV the resize (and the mirror) is `resample`; without it, PIL's.
  """
  if _cv2 is None:
    img, box = open_crop(image, rng, size=size, channels=channels, scale=scale, ratio=ratio)
    out = decode_opened(img, image, channels=channels).resize((size, size), Image.BILINEAR,
                                                              box=box)
    if flip and rng.random() < 0.5:
      out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # 5x faster than a NumPy copy
    return _from_pil(out)
  drawn = []

  def need(width: int, height: int) -> tuple[float, float]:  # the box, drawn on the full size
    drawn.append(crop_box(height, width, rng, scale=scale, ratio=ratio))
    _, _, h, w = drawn[0]
    return width * size / w, height * size / h

  pixels, factor = _decode_scaled(image, channels, need)
  top, left, h, w = drawn[0]
  box = (left / factor, top / factor, (left + w) / factor, (top + h) / factor)
  return resample(pixels, box, (size, size), flip=flip and rng.random() < 0.5)


def decode_resized_shorter(image: ImageLike, side: int, *, channels: int) -> np.ndarray:
  """`resize_shorter` of an array or of encoded bytes, with a JPEG decoded at a reduced scale
  that keeps it at least as large as the result (resized by `resample` where OpenCV is
  installed, else by PIL)."""
  targets = []

  def need(width: int, height: int) -> tuple[int, int]:
    scale = side / min(width, height)
    targets.append((max(1, round(width * scale)), max(1, round(height * scale))))
    return targets[0]

  if _cv2 is None:
    img = _open(image, channels)
    _draft(img, need(*img.size))
    img = decode_opened(img, image, channels=channels)
    return _from_pil(img if img.size == targets[0] else img.resize(targets[0], Image.BILINEAR))
  pixels, _ = _decode_scaled(image, channels, need)
  height, width = pixels.shape[:2]
  if (width, height) == targets[0]:
    return pixels
  return resample(pixels, (0, 0, width, height), targets[0])


def _train(image: ImageLike, rng: np.random.Generator, *, kind: str, size: tuple[int, int],
           channels: int) -> dict[str, np.ndarray]:
  side = size[0]
  params = np.zeros(NUM_PARAMS, np.float32)
  if kind == "imagenet":
    crop = decode_resized_crop(image, rng, size=side, channels=channels, flip=True)
    params[FACTORS], params[ORDER] = jitter_factors(rng, channels=channels, strength=0.4)
    if channels == 3:
      params[LIGHTING] = rng.normal(0.0, 0.1, 3)
    return {"image": crop, "augment": params}
  if kind == "alexnet":
    # Drawn first: the host recipe jittered the resized image before cropping it.
    params[FACTORS], params[ORDER] = jitter_factors(rng, channels=channels, strength=0.2)
    image = decode_resized_shorter(image, round(side * 130 / 128), channels=channels)
    crop = decode_resized_crop(image, rng, size=side, channels=channels, scale=(0.6, 1.0),
                               flip=True)
    params[ANGLE] = rng.uniform(-20.0, 20.0)
    return {"image": crop, "augment": params}
  image = resize(decode(image, channels), size)
  if kind == "cifar":
    image = random_flip(pad_crop(image, rng, pad=4), rng)
  elif kind == "digits":
    image = pad_crop(image, rng, pad=1)
  return {"image": image}


def _eval(image: ImageLike, *, kind: str, size: tuple[int, int], channels: int) -> np.ndarray:
  return preprocessing.eval_transform(image, kind=kind, size=size, channels=channels)


def _size(size: int | Sequence[int]) -> tuple[int, int]:
  return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def train_augment(kind: str, *, size: int | Sequence[int], channels: int) -> Augment:
  """Returns ``augment(image, rng) -> {'image': uint8 (H, W, channels)[, 'augment']}``.

  The 'augment' vector (float32 (`NUM_PARAMS`,)) comes with the kinds in `DEVICE_KINDS`.

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
