"""`atac_jax.preprocessing.preprocess` checks its inputs against the checkpoint's preprocessing
record (rank, channels, dtype, pixel range) and normalises as ``(x / max_value - mean) / std``."""

import io

import numpy as np
import pytest
from PIL import Image

from atac_jax import preprocessing

# The quickstart's record (digits: 8x8x1, pixels 0..16), as config.json holds it.
DIGITS = {"dataset": {"image_shape": [8, 8, 1], "mean": [0.3038], "std": [0.3760],
                      "max_value": 16.0, "augment": "none"}}
PHOTOS = {"dataset": {"image_shape": [4, 4, 3], "mean": [0.5, 0.4, 0.3],
                      "std": [0.2, 0.25, 0.3], "augment": "none"}}  # max_value: 255 by default


def _digits(n=5, seed=0):
  return np.random.default_rng(seed).integers(0, 17, (n, 8, 8, 1), dtype=np.uint8)


def _expected(images, mean, std, max_value):
  """The documented formula in float64, independent of the module's float32 constants."""
  return (np.asarray(images, np.float64) / max_value - np.asarray(mean)) / np.asarray(std)


def test_valid_digits_are_normalised_by_the_formula():
  images = _digits()
  x = preprocessing.preprocess(images, DIGITS)
  assert x.dtype == np.float32 and x.shape == (5, 8, 8, 1)
  np.testing.assert_allclose(x, _expected(images, [0.3038], [0.3760], 16.0), rtol=1e-6,
                             atol=1e-6)
  # Any integer dtype in range is the same pixels; one (H, W) image is a batch of one.
  np.testing.assert_array_equal(preprocessing.preprocess(images.astype(np.int64), DIGITS), x)
  np.testing.assert_array_equal(preprocessing.preprocess(images[2, ..., 0], DIGITS), x[2:3])
  np.testing.assert_array_equal(preprocessing.preprocess(list(images), DIGITS), x)


def test_photos_use_max_value_255_by_default():
  images = np.random.default_rng(1).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
  x = preprocessing.preprocess(images, PHOTOS)
  np.testing.assert_allclose(x, _expected(images, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3], 255.0),
                             rtol=1e-5, atol=1e-5)


def test_digits_scaled_to_255_are_refused():
  images = (_digits().astype(np.float64) * 255 / 16).round().astype(np.uint8)
  with pytest.raises(ValueError) as e:
    preprocessing.preprocess(images, DIGITS)
  message = str(e.value)
  assert f"[0, {int(images.max())}]" in message  # what it got
  assert "[0, 16]" in message and "dataset.max_value = 16" in message  # what it accepts


def test_float_arrays_are_refused_with_the_conversion():
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  images = datasets.load_digits().images  # float64 (1797, 8, 8) in 0..16
  with pytest.raises(ValueError, match=r"dtype float64.*astype\(np\.uint8\)"):
    preprocessing.preprocess(images[..., None], DIGITS)
  # As scikit-learn gives them (no channel axis) the shape is named first, with the fix.
  with pytest.raises(ValueError, match=r"shape \(1797, 8, 8\).*images\[\.\.\., None\]"):
    preprocessing.preprocess(images, DIGITS)
  # Converted as the message says, they are accepted.
  x = preprocessing.preprocess(images.astype(np.uint8)[..., None], DIGITS)
  assert x.shape == (1797, 8, 8, 1)


@pytest.mark.parametrize("images, pattern", [
    (np.zeros((2, 8, 8, 3), np.uint8), r"C = 1"),                       # wrong channel count
    (np.zeros((1, 2, 8, 8, 1), np.uint8), r"rank 5"),                   # rank 5
    (np.zeros((8,), np.uint8), r"rank 1"),                              # rank 1
    (np.full((1, 8, 8, 1), -1, np.int32), r"\[-1, -1\]"),               # negative pixels
    (np.zeros((1, 8, 8, 1), bool), r"dtype bool"),                      # not integer pixels
    ([], r"empty"),
])
def test_bad_inputs_say_what_is_accepted(images, pattern):
  with pytest.raises(ValueError, match=pattern) as e:
    preprocessing.preprocess(images, DIGITS)
  assert "accepted" in str(e.value)


def test_encoded_images_are_checked_after_decoding():
  png = io.BytesIO()
  Image.fromarray(np.full((8, 8), 200, np.uint8)).save(png, format="PNG")
  with pytest.raises(ValueError, match=r"\[200, 200\].*\[0, 16\]"):
    preprocessing.preprocess(png.getvalue(), DIGITS)
  png = io.BytesIO()
  Image.fromarray(np.full((8, 8), 16, np.uint8)).save(png, format="PNG")
  np.testing.assert_allclose(preprocessing.preprocess(png.getvalue(), DIGITS),
                             _expected(np.full((1, 8, 8, 1), 16), [0.3038], [0.3760], 16.0),
                             rtol=1e-6)
