"""Host augmentations: shapes, dtypes, value ranges, determinism per seed, and reference behaviour
(the crop box sampled as before; with PIL's resize, at DCT scale 1, the pixels of a full decode;
with OpenCV's `augment.resample`, those pixels within a stated tolerance)."""

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
  examples = [fn(image, _rng(s)) for s in (0, 0, 1, 2)]
  outs = [e["image"] for e in examples]
  for example, out in zip(examples, outs):
    assert out.shape == (size, size, channels) and out.dtype == np.uint8
    if kind in ("none", "cifar", "digits"):  # Pixels are moved or zeroed, never changed.
      assert set(np.unique(out)) <= set(np.unique(image)) | {0}
      assert set(example) == {"image"}
    else:  # The colour draws travel to the device.
      assert example["augment"].shape == (augment.NUM_PARAMS,)
      assert example["augment"].dtype == np.float32
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
    out = cifar(image, _rng(seed))["image"]
    flipped = rng.random() < 0.5
    np.testing.assert_array_equal(out, crop[:, ::-1] if flipped else crop)
    flips += flipped
  assert 70 < flips < 130

  digit = _image((8, 8, 1)) % 17
  fn = augment.train_augment("digits", size=8, channels=1)
  for seed in range(50):
    out = fn(digit, _rng(seed))["image"]
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


def test_decode_encoded_bytes():
  image = _image((20, 30, 3))
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  np.testing.assert_array_equal(augment.decode(buf.getvalue(), 3), image)
  gray = augment.decode(buf.getvalue(), 1)
  assert gray.shape == (20, 30, 1)
  fn = augment.train_augment("imagenet", size=16, channels=3)
  from_bytes, from_array = fn(buf.getvalue(), _rng(5)), fn(image, _rng(5))
  for key in ("image", "augment"):
    np.testing.assert_array_equal(from_bytes[key], from_array[key])


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


def _jpeg(shape, seed=0, quality=90):
  """A smooth random image (like a photo, so JPEG keeps its detail) and its JPEG bytes."""
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, (shape[0] // 16 + 2, shape[1] // 16 + 2, 3), dtype=np.uint8)
  image = np.asarray(Image.fromarray(coarse).resize((shape[1], shape[0]), Image.BICUBIC))
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def _full_decode_crop(jpeg, rng, *, size, scale=(0.08, 1.0)):
  """The recipe before decode-less: decode everything, then resize the `crop_box` box."""
  full = augment.decode(jpeg, 3)
  top, left, h, w = augment.crop_box(full.shape[0], full.shape[1], rng, scale=scale,
                                     ratio=(3 / 4, 4 / 3))
  img = Image.fromarray(full).resize((size, size), Image.BILINEAR,
                                     box=(left, top, left + w, top + h))
  return np.asarray(img), (top, left, h, w)


@pytest.fixture(params=["pil", "opencv"])
def resize_with(request, monkeypatch):
  """Runs a test with each of the host recipe's resizes: PIL's (no OpenCV) and `resample`."""
  if request.param == "pil":
    monkeypatch.setattr(augment, "_cv2", None)
  else:
    pytest.importorskip("cv2")
  return request.param


def test_decode_less_crop_samples_the_same_box_and_pixels_at_full_scale(resize_with):
  jpeg = _jpeg((375, 500))
  for seed in range(30):
    rng, ref_rng = _rng(seed), _rng(seed)
    out = augment.decode_resized_crop(jpeg, rng, size=224, channels=3, flip=True)
    expected, _ = _full_decode_crop(jpeg, ref_rng, size=224)
    if ref_rng.random() < 0.5:
      expected = expected[:, ::-1]
    assert rng.random() == ref_rng.random()  # the generator advanced exactly as much
    # A 375x500 image never has a 448-pixel crop: DCT scale 1, the same decoder.
    if resize_with == "pil":  # the same resize: the same pixels
      np.testing.assert_array_equal(out, expected)
    else:  # OpenCV's blur + bilinear against PIL's triangle filter: within a level, unbiased
      diff = out.astype(int) - expected
      assert np.mean(np.abs(diff)) < 0.6 and abs(np.mean(diff)) < 0.1 and np.abs(diff).max() <= 4


def test_decode_less_crop_of_a_large_image_draws_the_same_boxes(resize_with):
  """Statistics of the boxes (area fraction, aspect) and the pixels of a reduced-scale decode."""
  jpeg = _jpeg((1200, 1600))
  areas, ratios, diffs, reduced = [], [], [], 0
  for seed in range(40):
    rng, ref_rng = _rng(seed), _rng(seed)
    out = augment.decode_resized_crop(jpeg, rng, size=112, channels=3)
    expected, (_, _, h, w) = _full_decode_crop(jpeg, ref_rng, size=112)
    assert rng.random() == ref_rng.random()  # same draws, so the same boxes
    areas.append(h * w / (1200 * 1600))
    ratios.append(w / h)
    reduced += min(h, w) >= 224  # decoded at 1/2 scale or less
    diff = out.astype(int) - expected
    # The DCT's downscaling filter is not PIL's triangle: small, unbiased differences that
    # grow with the reduction (up to 1/8 here).
    assert np.mean(np.abs(diff)) < 3.5 and abs(np.mean(diff)) < 0.2
    diffs.append(np.mean(np.abs(diff)))
  assert reduced >= 10 and np.mean(diffs) < 2.5
  assert 0.07 < min(areas) and max(areas) <= 1.0 and 0.74 < min(ratios) and max(ratios) < 1.35


def test_alexnet_host_half_matches_the_full_decode_recipe(resize_with):
  jpeg = _jpeg((300, 400))
  fn = augment.train_augment("alexnet", size=128, channels=3)
  for seed in range(10):
    example = fn(jpeg, _rng(seed))
    rng = _rng(seed)
    factors, order = augment.jitter_factors(rng, channels=3, strength=0.2)
    resized = augment.resize_shorter(augment.decode(jpeg, 3), 130)
    top, left, h, w = augment.crop_box(130, 173, rng, scale=(0.6, 1.0), ratio=(3 / 4, 4 / 3))
    crop = np.asarray(Image.fromarray(resized).resize((128, 128), Image.BILINEAR,
                                                      box=(left, top, left + w, top + h)))
    crop = crop[:, ::-1] if rng.random() < 0.5 else crop
    angle = rng.uniform(-20.0, 20.0)
    # 300x400 -> 130x173 decodes at 1/2 scale (150x200): within JPEG-scaling tolerance.
    assert np.mean(np.abs(example["image"].astype(int) - crop)) < 2.0
    np.testing.assert_allclose(example["augment"][augment.FACTORS], factors)
    np.testing.assert_array_equal(example["augment"][augment.ORDER], order)
    np.testing.assert_allclose(example["augment"][augment.ANGLE], angle, rtol=1e-6)


def test_jitter_factor_draws():
  factors, order = augment.jitter_factors(_rng(0), channels=3, strength=0.4)
  rng = _rng(0)
  np.testing.assert_allclose(factors, [rng.uniform(0.6, 1.4) for _ in range(3)], rtol=1e-6)
  np.testing.assert_array_equal(order, rng.permutation(3))
  gray_factors, gray_order = augment.jitter_factors(_rng(0), channels=1, strength=0.4)
  assert gray_factors[2] == 1.0 and gray_order[2] == 2 and sorted(gray_order[:2]) == [0, 1]


@pytest.mark.parametrize("kind, shape, size", [("imagenet", (375, 500), 224),
                                               ("imagenet", (1200, 1600), 112),
                                               ("alexnet", (300, 400), 128)])
def test_simplejpeg_and_pil_decode_the_same_pixels(monkeypatch, resize_with, kind, shape, size):
  """The two JPEG decoders of the host recipe (simplejpeg where installed, else PIL) give the same
  examples, at full and at reduced DCT scale, whichever resize follows."""
  simplejpeg = pytest.importorskip("simplejpeg")
  jpeg = _jpeg(shape)
  fn = augment.train_augment(kind, size=size, channels=3)
  fast = [fn(jpeg, _rng(seed)) for seed in range(12)]

  def refuse(*args, **kwargs):  # data libjpeg only warns about: simplejpeg (strict) refuses it
    raise ValueError("Corrupt JPEG data")

  for decoder in ("none", "refusing"):
    with monkeypatch.context() as patch:
      if decoder == "none":
        patch.setattr(augment, "_simplejpeg", None)
      else:  # then PIL decodes it, at the same DCT scale
        patch.setattr(simplejpeg, "decode_jpeg", refuse)
      for seed, example in enumerate(fast):
        reference = fn(jpeg, _rng(seed))
        np.testing.assert_array_equal(example["image"], reference["image"])
        np.testing.assert_array_equal(example["augment"], reference["augment"])


@pytest.mark.parametrize("kind, shape, size, tolerance", [("imagenet", (375, 500), 224, 0.6),
                                                          ("imagenet", (1200, 1600), 112, 3.5),
                                                          ("alexnet", (300, 400), 128, 1.2)])
def test_opencv_and_pil_resizes_give_the_same_draws_and_close_pixels(monkeypatch, kind, shape,
                                                                      size, tolerance):
  """The recipe with `resample` against the recipe with PIL's resize (the fallback): the same
  draws (boxes, flips, colour), so the same distribution; pixels unbiased, with PIL's contrast,
  and a mean |difference| of ``tolerance`` levels at most. That is ~0.3 at DCT scale 1, and up to
  ~3 where a 1/4-1/8 DCT decode leaves detail at the pixel scale, where the two filters' shapes
  (equal widths) differ most."""
  pytest.importorskip("cv2")
  jpeg = _jpeg(shape, seed=3)
  fn = augment.train_augment(kind, size=size, channels=3)
  fast = [fn(jpeg, _rng(seed)) for seed in range(16)]
  monkeypatch.setattr(augment, "_cv2", None)
  for seed, example in enumerate(fast):
    reference = fn(jpeg, _rng(seed))
    np.testing.assert_array_equal(example["augment"], reference["augment"])
    out, expected = example["image"].astype(int), reference["image"].astype(int)
    assert np.mean(np.abs(out - expected)) < tolerance, seed
    assert abs(np.mean(out - expected)) < 0.15 and abs(out.std() / expected.std() - 1) < 0.02


def _resample_cases(image, count=8):
  """Boxes (fractional) of ``image`` with output sizes, shrinking 0.5x to 5x."""
  height, width = image.shape[:2]
  for shrink in (0.5, 0.9, 1.0, 1.3, 1.7, 2.0, 2.5, 3.5, 5.0):
    for seed in range(count):
      rng = _rng(seed)
      out = int(rng.integers(40, 110))
      w, h = min(out * shrink * rng.uniform(0.8, 1.25), width - 1), min(out * shrink, height - 1)
      left, top = rng.uniform(0, width - w), rng.uniform(0, height - h)
      yield shrink, (left, top, left + w, top + h), (out, out)


@pytest.mark.parametrize("noise", [0, 20])
def test_resample_matches_pils_antialiased_bilinear_resize(noise):
  """`resample` against PIL's ``resize(BILINEAR, box=...)`` on the same pixels (an independent
  implementation of the filter it imitates): smooth photo-like content within half a level on
  average (at most 4), with pixel noise (sigma 20) within 2.5 on average, never biased, and with
  PIL's contrast (std) to 1%."""
  pytest.importorskip("cv2")
  rng = _rng(0)
  image = augment.decode(_jpeg((600, 800)), 3).astype(float)
  image = np.clip(image + rng.normal(0, noise, image.shape), 0, 255).astype(np.uint8)
  for shrink, box, size in _resample_cases(image):
    out = augment.resample(image, box, size).astype(int)
    expected = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR, box=box)).astype(int)
    diff = out - expected
    assert out.shape == (size[1], size[0], 3)
    assert np.mean(np.abs(diff)) < (0.6 if noise == 0 else 2.5), (shrink, box)
    assert abs(np.mean(diff)) < 0.1 and abs(out.std() / expected.std() - 1) < 0.01, (shrink, box)
    if noise == 0:
      assert np.abs(diff).max() <= 4, (shrink, box)
    # Mirroring is part of the map: the mirror image (exactly with OpenCV 5; 4.x rounds the
    # mirrored map to its 1/32-pixel grid a little differently: a few levels, here and there).
    mirrored = augment.resample(image, box, size, flip=True).astype(int) - out[:, ::-1]
    assert np.abs(mirrored).max() <= 4 and np.mean(np.abs(mirrored)) < 0.05


@pytest.mark.parametrize("period, shrink", [(2.5, 1.9), (3.0, 1.9), (4.0, 3.0)])
def test_resample_antialiases_like_pil(period, shrink):
  """Stripes finer than the output's pixel pitch allows (period < 2 * shrink input pixels) are
  filtered out about as much as PIL's filter does, unlike bilinear sampling without one."""
  cv2 = pytest.importorskip("cv2")
  row = 128 + 100 * np.cos(2 * np.pi * np.arange(400) / period)
  image = np.repeat(np.repeat(row[None, :, None], 200, 0), 3, 2).round().astype(np.uint8)
  out_w = int(380 / shrink)
  box = (10.0, 10.0, 10 + out_w * shrink, 160.0)
  ours = augment.resample(image, box, (out_w, 150)).std()
  pil = np.asarray(Image.fromarray(image).resize((out_w, 150), Image.BILINEAR, box=box)).std()
  plain = cv2.resize(image[10:160, 10:10 + int(out_w * shrink)], (out_w, 150),
                     interpolation=cv2.INTER_LINEAR).std()
  assert plain > 35 and ours < 0.4 * plain and ours < 1.8 * pil + 1.0


def test_resample_single_channel_and_upscale_edges():
  """A (H, W, 1) array stays 3-D; a box at the image's edge reads no pixels from outside it:
  upscaling the corner pixel block gives PIL's result (which clamps there too)."""
  pytest.importorskip("cv2")
  image = _image((30, 40, 1))
  out = augment.resample(image, (0, 0, 10, 10), (40, 40))
  assert out.shape == (40, 40, 1) and out.dtype == np.uint8
  expected = np.asarray(Image.fromarray(image[..., 0]).resize((40, 40), Image.BILINEAR,
                                                               box=(0, 0, 10, 10)))
  assert np.abs(out[..., 0].astype(int) - expected).max() <= 1
