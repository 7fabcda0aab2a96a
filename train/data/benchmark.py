"""Input-pipeline throughput on synthetic images, through the same code path training uses.

'cifar': 32x32x3 uint8 images in memory (like the tarball source), pad-4 crop + flip.
'imagenet': JPEG-encoded images of ImageNet-like sizes (smooth content, ~500x375), decoded by
simplejpeg (only at the DCT scale the crop needs), random-resized-crop to 224 (OpenCV's
`augment.resample`), flip, and the per-example draws of colour jitter 0.4 and PCA lighting 0.1.
'alexnet': the same JPEGs, resize 130, random-resized-crop 128 (scale 0.6-1), flip, and the
draws of jitter 0.2 and rotation +-20 degrees.
The host delivers uint8 batches: the colour ops, rotation and normalisation run in the jitted
step (`atac_train.data.device`), so they are not part of this figure; ``bytes_per_image`` is
what each image costs the host-to-device transfer.

The iterator is `pipeline.build_train_iterator`, which the trainer's
`atac_train.data.create_train_iterator` builds too (with its source, ``num_workers`` and
``prefetch_buffer`` from the config); with ``to_device`` each batch then goes through the
trainer's own ``atac_train.parallel.global_batch`` onto this process's first device, as
``_train_loop`` does before each step. ``main_cpu_ms_per_batch`` is the CPU time of the whole main
process (every thread) per timed batch: what it takes from the cores the workers run on.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from typing import Any

import numpy as np
from PIL import Image

from atac_train.data import augment as augment_lib
from atac_train.data import pipeline
from atac_train.data import sources
from atac_train.data.synthetic_jpeg import synthetic_jpegs

_KINDS = ("cifar", "imagenet", "alexnet")


class _CycledSource(sources.ImageSource):
  """``length`` records that cycle through a few stored ones."""

  def __init__(self, records: list[dict[str, Any]], *, length: int, num_classes: int):
    self.records, self.length, self.num_classes = records, length, num_classes
    self.image_shape = (None, None, 3)

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.records[index % len(self.records)]


def benchmark_input(kind: str = "cifar", *, num_workers: int = 0, num_batches: int = 50,
                    batch_size: int = 128, seed: int = 0,
                    prefetch_buffer: int = 2, to_device: bool = False) -> dict[str, Any]:
  """Measures images/s of the train input pipeline on synthetic data.

  The first ``num_workers + 1`` batches (until every worker has delivered one) are timed
  separately as start-up and excluded.

  Args:
    kind: 'cifar', 'imagenet' or 'alexnet' (see module docstring).
    num_workers: 0 = in this process; N = grain worker processes.
    num_batches: batches timed after the first.
    batch_size: images per batch.
    seed: data and augmentation seed.
    prefetch_buffer: batches prepared ahead (per worker).
    to_device: also put each batch on the first device with the trainer's
      ``parallel.global_batch`` (and wait for it), inside the timed loop.

  Returns:
    A JSON-able dict with ``images_per_second``, ``seconds``, ``startup_seconds``,
    ``main_cpu_ms_per_batch``, ``bytes_per_image`` (of the delivered batch) and the settings.
  """
  if kind not in _KINDS:
    raise ValueError(f"Unknown input benchmark {kind!r}; accepted: {list(_KINDS)}.")
  extra: dict[str, Any] = {}
  if kind == "cifar":
    rng = np.random.default_rng(seed)
    source = sources.ArraySource(rng.integers(0, 256, (10_000, 32, 32, 3), dtype=np.uint8),
                                 rng.integers(0, 10, 10_000), num_classes=10)
    size = 32
  else:
    jpegs = synthetic_jpegs(32, seed=seed)
    extra["mean_jpeg_bytes"] = int(np.mean([len(j) for j in jpegs]))
    source = _CycledSource([{"image": j, "label": i % 1000} for i, j in enumerate(jpegs)],
                           length=100_000, num_classes=1000)
    size = 224 if kind == "imagenet" else 128
  consume = _to_device() if to_device else (lambda batch: batch)
  it = pipeline.build_train_iterator(
      source, augment=augment_lib.train_augment(kind, size=size, channels=3),
      global_batch_size=batch_size, seed=seed, num_workers=num_workers,
      prefetch_buffer=prefetch_buffer)
  start = time.perf_counter()
  for _ in range(num_workers + 1):
    batch = next(it)
    consume(batch)
  startup = time.perf_counter() - start
  start, cpu = time.perf_counter(), time.process_time()
  for _ in range(num_batches):
    batch = next(it)
    consume(batch)
  seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
  shape = tuple(batch["image"].shape[1:])
  bytes_per_image = sum(v.nbytes for v in batch.values()) / batch_size
  del it, batch
  gc.collect()  # Stops the worker processes before the next measurement.
  return {"kind": kind, "num_workers": num_workers, "batch_size": batch_size,
          "num_batches": num_batches, "prefetch_buffer": prefetch_buffer, "image_shape": shape,
          "to_device": to_device,
          "images_per_second": num_batches * batch_size / seconds, "seconds": seconds,
          "startup_seconds": startup, "main_cpu_ms_per_batch": cpu / num_batches * 1e3,
          "bytes_per_image": bytes_per_image, **extra}


def _to_device():
  """The trainer's host-to-device step for one device: ``parallel.global_batch``, waited for."""
  import jax  # pylint: disable=g-import-not-at-top
  from atac_train import parallel  # pylint: disable=g-import-not-at-top
  sharding = parallel.data_sharded(parallel.create_mesh(jax.local_devices()[:1]))
  return lambda batch: jax.block_until_ready(parallel.global_batch(batch, sharding))


def profile_imagenet(*, num_images: int = 512, batch_size: int = 128, seed: int = 0,
                     resize: str = "opencv") -> dict[str, Any]:
  """Microseconds per image of each stage of the 'imagenet' recipe, host and device.

  Host stages run one after another on the same synthetic JPEGs as `benchmark_input` (the pieces
  of `augment.decode_resized_crop`, timed apart): header + box (+ the DCT scale), decode (at the
  DCT scale the box allows), crop + resize + flip to a uint8 array (``resize='opencv'``:
  `augment.resample`; ``'pil'``: the fallback, PIL's resize and mirror), the colour draws,
  stacking into a batch. Device stages run the jitted `device.DeviceTransform` on this machine's
  default JAX backend, and ``transfer`` is a ``jax.device_put`` of a uint8 batch (on a CPU
  backend a copy; the bytes are what matter).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from atac_train.data import device  # pylint: disable=g-import-not-at-top
  if resize not in ("opencv", "pil"):
    raise ValueError(f"Unknown resize {resize!r}; accepted: ['opencv', 'pil'].")
  jpegs = synthetic_jpegs(32, seed=seed)
  totals = dict.fromkeys(("header_and_box", "decode", "crop_resize_flip", "draws"), 0.0)
  crops, draws = [], []
  for i in range(num_images):
    rng = np.random.default_rng([seed, i])
    t0 = time.perf_counter()
    jpeg = jpegs[i % len(jpegs)]
    if resize == "opencv":
      width, height = augment_lib._rgb_jpeg_size(jpeg, 3)  # pylint: disable=protected-access
      top, left, h, w = augment_lib.crop_box(height, width, rng, scale=(0.08, 1.0),
                                             ratio=(3 / 4, 4 / 3))
      factor = augment_lib._dct_factor(  # pylint: disable=protected-access
          width, height, (width * 224 / w, height * 224 / h))
      t1 = time.perf_counter()
      pixels = augment_lib._simplejpeg_decode(  # pylint: disable=protected-access
          jpeg, (-(-width // factor), -(-height // factor)))
      t2 = time.perf_counter()
      box = (left / factor, top / factor, (left + w) / factor, (top + h) / factor)
      crop = augment_lib.resample(pixels, box, (224, 224), flip=rng.random() < 0.5)
    else:
      img, box = augment_lib.open_crop(jpeg, rng, size=224, channels=3)
      t1 = time.perf_counter()
      img = augment_lib.decode_opened(img, jpeg, channels=3)
      t2 = time.perf_counter()
      crop = img.resize((224, 224), Image.BILINEAR, box=box)
      if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
      crop = np.asarray(crop)
    t3 = time.perf_counter()
    params = np.zeros(augment_lib.NUM_PARAMS, np.float32)
    params[augment_lib.FACTORS], params[augment_lib.ORDER] = augment_lib.jitter_factors(
        rng, channels=3, strength=0.4)
    params[augment_lib.LIGHTING] = rng.normal(0.0, 0.1, 3)
    t4 = time.perf_counter()
    for key, seconds in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
      totals[key] += seconds
    crops.append(crop), draws.append(params)
  per_image = {k: v / num_images * 1e6 for k, v in totals.items()}
  start = time.perf_counter()
  batches = [{"image": np.stack(crops[i:i + batch_size]),
              "augment": np.stack(draws[i:i + batch_size])}
             for i in range(0, num_images - batch_size + 1, batch_size)]
  per_image["batching"] = (time.perf_counter() - start) / (len(batches) * batch_size) * 1e6
  transform = jax.jit(device.DeviceTransform(mean=(0.485, 0.456, 0.406),
                                             std=(0.229, 0.224, 0.225)))
  jax.block_until_ready(transform(batches[0]))  # compile
  start = time.perf_counter()
  for batch in batches:
    on_device = jax.block_until_ready(jax.device_put(batch))
  per_image["transfer"] = (time.perf_counter() - start) / (len(batches) * batch_size) * 1e6
  start = time.perf_counter()
  for _ in batches:
    jax.block_until_ready(transform(on_device))
  per_image["device_transform"] = (time.perf_counter() - start) / (len(batches) * batch_size) * 1e6
  host = sum(v for k, v in per_image.items() if k not in ("transfer", "device_transform"))
  return {"kind": "imagenet", "resize": resize, "num_images": num_images,
          "backend": jax.default_backend(),
          "microseconds_per_image": {k: round(v, 1) for k, v in per_image.items()},
          "host_microseconds_per_image": round(host, 1),
          "bytes_per_image": sum(v.nbytes for v in batches[0].values()) / batch_size}


def main(argv: list[str] | None = None) -> None:
  """``python -m atac_train.data.benchmark --kind imagenet --num-workers 0 1 2``: JSON lines."""
  parser = argparse.ArgumentParser(description=benchmark_input.__doc__.split("\n", 1)[0])
  parser.add_argument("--kind", choices=_KINDS, nargs="+", default=list(_KINDS))
  parser.add_argument("--num-workers", type=int, nargs="+", default=[0])
  parser.add_argument("--num-batches", type=int, default=50)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--prefetch-buffer", type=int, default=2)
  parser.add_argument("--to-device", action="store_true",
                      help="also put each batch on the first device as the trainer does "
                           "(atac_train.parallel.global_batch)")
  parser.add_argument("--profile", action="store_true",
                      help="time each stage of the 'imagenet' recipe instead (profile_imagenet)")
  parser.add_argument("--resize", choices=("opencv", "pil"), nargs="+", default=["opencv"],
                      help="with --profile: the resize(s) to profile, one JSON line each")
  args = parser.parse_args(argv)
  if args.profile:
    for resize in args.resize:
      print(json.dumps(profile_imagenet(batch_size=args.batch_size, seed=args.seed,
                                        resize=resize)), flush=True)
    return
  for kind in args.kind:
    for workers in args.num_workers:
      print(json.dumps(benchmark_input(
          kind, num_workers=workers, num_batches=args.num_batches, batch_size=args.batch_size,
          seed=args.seed, prefetch_buffer=args.prefetch_buffer, to_device=args.to_device)),
          flush=True)


if __name__ == "__main__":
  main()
