"""Augmentations: shapes, dtypes, value ranges, determinism per seed, and reference behaviour."""

import io

import numpy as np
import pytest
from PIL import Image

from atac_train.data import augment


def _image(shape, seed=0):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _rng(seed):
  return np.random.default_rng(seed)


CASES = [  # kind, input shape, output size, channels
    ("none", (32, 32, 3), 32, 3),
    ("cifar", (32, 32, 3), 32, 3),
    ("digits", (8, 8, 1), 8, 1),
    ("imagenet", (300, 400, 3), 224, 3),
    ("imagenet", (60, 50, 1), 48, 1),
    ("alexnet", (32, 32, 3), 128, 3),
]


@pytest.mark.parametrize("kind,shape,size,channels", CASES)
def test_train_shapes_ranges_determinism(kind, shape, size, channels):
  fn = augment.train_augment(kind, size=size, channels=channels)
  image = _image(shape)
  if kind == "digits":
    image = image % 17  # digits pixels are 0..16
  outs = [fn(image, _rng(s)) for s in (0, 0, 1, 2)]
  for out in outs:
    assert out.shape == (size, size, channels) and out.dtype == np.uint8
    if kind in ("none", "cifar", "digits"):  # Pixels are moved or zeroed, never changed.
      assert set(np.unique(out)) <= set(np.unique(image)) | {0}
  np.testing.assert_array_equal(outs[0], outs[1])
  if kind != "none":
    assert any(not np.array_equal(outs[0], o) for o in outs[2:])


@pytest.mark.parametrize("kind,shape,size,channels", CASES)
def test_eval_is_deterministic_and_sized(kind, shape, size, channels):
  fn = augment.eval_preprocess(kind, size=size, channels=channels)
  image = _image(shape)
  out = fn(image)
  assert out.shape == (size, size, channels) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, fn(image))
  if kind in ("none", "cifar", "digits"):  # Native size: untouched.
    np.testing.assert_array_equal(out, image)


def test_pad_crop_matches_numpy_pad_reference():
  image = _image((32, 32, 3))
  for seed in range(20):
    out = augment.pad_crop(image, _rng(seed), pad=4)
    # Reference: the same offsets drawn the same way, applied to an explicitly padded image.
    dy, dx = _rng(seed).integers(-4, 5, size=2)
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
    np.testing.assert_array_equal(out, padded[4 + dy:4 + dy + 32, 4 + dx:4 + dx + 32])


def test_cifar_flips_about_half_and_digits_never():
  image = _image((32, 32, 3))
  cifar = augment.train_augment("cifar", size=32, channels=3)
  flips = 0
  for seed in range(200):
    rng = _rng(seed)
    dy, dx = rng.integers(-4, 5, size=2)
    crop = np.pad(image, ((4, 4), (4, 4), (0, 0)))[4 + dy:36 + dy, 4 + dx:36 + dx]
    out = cifar(image, _rng(seed))
    flipped = rng.random() < 0.5
    np.testing.assert_array_equal(out, crop[:, ::-1] if flipped else crop)
    flips += flipped
  assert 70 < flips < 130

  digit = _image((8, 8, 1)) % 17
  fn = augment.train_augment("digits", size=8, channels=1)
  for seed in range(50):
    out = fn(digit, _rng(seed))
    dy, dx = _rng(seed).integers(-1, 2, size=2)
    np.testing.assert_array_equal(out, np.pad(digit, ((1, 1), (1, 1), (0, 0)))[1 + dy:9 + dy,
                                                                              1 + dx:9 + dx])


def test_crop_box_area_aspect_and_bounds():
  areas, ratios = [], []
  for seed in range(300):
    top, left, h, w = augment.crop_box(375, 500, _rng(seed), scale=(0.08, 1.0),
                                       ratio=(3 / 4, 4 / 3))
    assert 0 <= top and top + h <= 375 and 0 <= left and left + w <= 500
    areas.append(h * w / (375 * 500))
    ratios.append(w / h)
  assert 0.07 < min(areas) and max(areas) <= 1.0 and np.std(areas) > 0.1
  assert 0.74 < min(ratios) and max(ratios) < 1.35
  # Impossible areas fall back to the largest central crop within the aspect range.
  assert augment.crop_box(10, 100, _rng(0), scale=(2.0, 3.0), ratio=(3 / 4, 4 / 3)) == (
      0, 43, 10, 13)


def test_imagenet_eval_resizes_shorter_side_then_centre_crops():
  image = np.zeros((300, 600, 3), np.uint8)
  image[:, 300:] = 255  # Right half white: the centre crop straddles it at column 112.
  out = augment.eval_preprocess("imagenet", size=224, channels=3)(image)
  assert out.shape == (224, 224, 3)
  assert out[:, :100].max() == 0 and out[:, 124:].min() == 255


def test_color_ops_stay_in_range_and_lighting_changes_colour():
  image = _image((64, 64, 3))
  jittered = augment.color_jitter(image, _rng(0), brightness=0.4, contrast=0.4, saturation=0.4)
  lit = augment.pca_lighting(image, _rng(0), std=0.1)
  for out in (jittered, lit):
    assert out.dtype == np.uint8 and out.shape == image.shape
  assert not np.array_equal(lit, image)
  # Strengths of 0 make every factor exactly 1: the image is unchanged.
  gray = augment.color_jitter(image[..., :1], _rng(0), brightness=0.0, contrast=0.0,
                              saturation=0.0)
  np.testing.assert_array_equal(gray, image[..., :1])


def test_rotation_keeps_size_and_blackens_corners():
  image = np.full((128, 128, 3), 200, np.uint8)
  out = augment.random_rotate(image, _rng(3), degrees=20.0)
  assert out.shape == image.shape and out[0, 0].max() == 0 and out[64, 64].min() == 200


def test_decode_encoded_bytes():
  image = _image((20, 30, 3))
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  np.testing.assert_array_equal(augment.decode(buf.getvalue(), 3), image)
  gray = augment.decode(buf.getvalue(), 1)
  assert gray.shape == (20, 30, 1)
  fn = augment.train_augment("imagenet", size=16, channels=3)
  np.testing.assert_array_equal(fn(buf.getvalue(), _rng(5)), fn(image, _rng(5)))


def test_normalizer_matches_formula():
  images = _image((2, 4, 4, 3))
  mean, std = np.array([0.4, 0.5, 0.6]), np.array([0.2, 0.25, 0.3])
  out = augment.Normalizer(mean, std)(images)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, (images / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)
  digits = augment.Normalizer(np.array([0.0]), np.array([1.0]), max_value=16.0)
  np.testing.assert_allclose(digits(np.full((1, 2, 2, 1), 16, np.uint8)), 1.0)


def test_unknown_augmentation():
  with pytest.raises(ValueError, match=r"accepted: \['none', 'cifar'"):
    augment.train_augment("randaugment", size=32, channels=3)
