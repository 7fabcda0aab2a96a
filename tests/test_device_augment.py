"""The device half of the input recipes against PIL/NumPy references of the same operations."""

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from atac_train.data import augment, device
from atac_train.data.config import DatasetInfo


def _smooth(shape, seed=0):
  """A photo-like uint8 image: bicubic-upsampled noise."""
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, (shape[0] // 8 + 2, shape[1] // 8 + 2, shape[2]), np.uint8)
  if shape[2] == 1:
    return np.asarray(Image.fromarray(coarse[..., 0]).resize(shape[1::-1], Image.BICUBIC))[
        ..., None]
  return np.asarray(Image.fromarray(coarse).resize(shape[1::-1], Image.BICUBIC))


def _pil_jitter(image, factors, order):
  """The host recipe's colour jitter: PIL enhancers, uint8 after each one."""
  ops = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
  img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  for op in order.astype(int):
    img = ops[op](img).enhance(float(factors[op]))
  out = np.asarray(img)
  return out[..., None] if out.ndim == 2 else out


@pytest.mark.parametrize("channels", [3, 1])
def test_color_jitter_matches_pil_enhancers(channels):
  images, factors, orders, expected = [], [], [], []
  for seed in range(6):
    image = _smooth((40, 48, channels), seed)
    f, o = augment.jitter_factors(np.random.default_rng(seed), channels=channels, strength=0.4)
    images.append(image), factors.append(f), orders.append(o)
    expected.append(_pil_jitter(image, f, o))
  out = np.asarray(device.color_jitter(np.stack(images).astype(np.float32), np.stack(factors),
                                       np.stack(orders)))
  diff = np.abs(out - np.stack(expected).astype(np.float32))
  # Both truncate after each op; a float32 product that lands next to a whole level can
  # truncate one level apart, and later ops carry that on.
  assert np.mean(diff == 0) > 0.99 and diff.max() <= 3.0
  assert out.min() >= 0.0 and out.max() <= 255.0


def test_pca_lighting_matches_the_alexnet_formula():
  images = np.stack([_smooth((8, 8, 3), s) for s in range(4)]).astype(np.float32)
  alpha = np.random.default_rng(0).normal(0.0, 0.1, (4, 3)).astype(np.float32)
  out = np.asarray(device.pca_lighting(images, alpha))
  for i in range(4):
    offset = device.PCA_EIGVEC @ (alpha[i] * device.PCA_EIGVAL)
    expected = np.clip(images[i] + offset, 0, 255).astype(np.uint8)  # the host recipe's cast
    assert np.mean(out[i] == expected) > 0.99 and np.abs(out[i] - expected).max() <= 1


def test_rotation_matches_pil_rotate():
  images = np.stack([_smooth((64, 64, 3), s) for s in range(3)])
  angles = np.array([12.5, -20.0, 3.0], np.float32)
  out = np.asarray(device.rotate(images.astype(np.float32), angles))
  for i, angle in enumerate(angles):
    expected = np.asarray(Image.fromarray(images[i]).rotate(float(angle),
                                                            resample=Image.BILINEAR))
    diff = np.abs(out[i] - expected)
    # Rounding, plus single pixels on the image border where float32 decides inside/outside.
    assert np.mean(diff <= 1.0) > 0.99 and diff.mean() < 0.5
  assert out[1, 0, 0].max() == 0.0  # black corners


def test_normalize_matches_the_numpy_normalizer():
  images = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), np.uint8)
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  transform = device.DeviceTransform(mean=mean, std=std)
  np.testing.assert_allclose(np.asarray(transform.normalize(images)),
                             augment.Normalizer(np.array(mean), np.array(std))(images),
                             rtol=1e-6, atol=1e-6)
  digits = device.DeviceTransform(mean=(0.0,), std=(1.0,), max_value=16.0)
  np.testing.assert_allclose(digits.normalize(np.full((1, 2, 2, 1), 16, np.uint8)), 1.0)
  assert np.asarray(transform({"image": images})).dtype == np.float32


@pytest.mark.parametrize("kind,size", [("imagenet", 64), ("alexnet", 64)])
def test_host_plus_device_equals_the_whole_recipe_on_the_host(kind, size):
  """Host half + DeviceTransform vs the pre-split recipe (all PIL/NumPy on the host)."""
  source = _smooth((90, 120, 3), 7)
  fn = augment.train_augment(kind, size=size, channels=3)
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  transform = device.DeviceTransform(mean=mean, std=std, rotate=kind == "alexnet")
  examples = [fn(source, np.random.default_rng(seed)) for seed in range(4)]
  batch = {"image": np.stack([e["image"] for e in examples]),
           "augment": np.stack([e["augment"] for e in examples])}
  out = np.asarray(transform(batch))
  normalizer = augment.Normalizer(np.array(mean), np.array(std))
  for i, example in enumerate(examples):
    params = example["augment"]
    pixels = _pil_jitter(example["image"], params[augment.FACTORS], params[augment.ORDER])
    if kind == "imagenet":
      offset = device.PCA_EIGVEC @ (params[augment.LIGHTING] * device.PCA_EIGVAL)
      pixels = np.clip(pixels + offset, 0, 255)
    else:
      pixels = np.asarray(Image.fromarray(pixels).rotate(float(params[augment.ANGLE]),
                                                         resample=Image.BILINEAR))
    expected = normalizer(pixels[None].astype(np.float32))[0]
    diff = np.abs(out[i] - expected) * 255 * np.array(std)  # in pixel levels
    assert np.mean(diff <= 3.5) > 0.99 and diff.mean() < 1.0


def test_batch_shapes_and_example_batch():
  info = DatasetInfo(num_classes=5, image_shape=(16, 16, 3), num_train=1, num_eval=1,
                     augment="imagenet")
  batch = device.example_batch(info, 4)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == device.batch_shapes(info, 4)
  assert batch["image"].dtype == np.uint8 and batch["augment"].shape == (4, augment.NUM_PARAMS)
  plain = DatasetInfo(num_classes=5, image_shape=(8, 8, 1), num_train=1, num_eval=1)
  assert set(device.batch_shapes(plain, 2)) == {"image", "label"}
