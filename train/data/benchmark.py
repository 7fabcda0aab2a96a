"""Input-pipeline throughput on synthetic images, through the same code path training uses.

'cifar': 32x32x3 uint8 images in memory (like the tarball source), pad-4 crop + flip,
normalisation. 'imagenet': JPEG-encoded images of ImageNet-like sizes (smooth content, ~500x375),
decoded with PIL, random-resized-crop to 224, flip, colour jitter, PCA lighting, normalisation.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import time
from typing import Any

import numpy as np
from PIL import Image

from atac_train.data import augment as augment_lib
from atac_train.data import config as config_lib
from atac_train.data import pipeline
from atac_train.data import sources

_KINDS = ("cifar", "imagenet")


class _CycledSource(sources.ImageSource):
  """``length`` records that cycle through a few stored ones."""

  def __init__(self, records: list[dict[str, Any]], *, length: int, num_classes: int):
    self.records, self.length, self.num_classes = records, length, num_classes
    self.image_shape = (None, None, 3)

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.records[index % len(self.records)]


def synthetic_jpegs(count: int, *, seed: int, quality: int = 90) -> list[bytes]:
  """JPEG bytes of ``count`` smooth random RGB images of ImageNet-like sizes."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    short = int(rng.integers(333, 500))
    h, w = (short, 500) if rng.random() < 0.7 else (500, short)  # mostly landscape
    coarse = rng.integers(0, 256, (h // 32 + 2, w // 32 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float32)
    image = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    out.append(buf.getvalue())
  return out


def benchmark_input(kind: str = "cifar", *, num_workers: int = 0, num_batches: int = 50,
                    batch_size: int = 128, seed: int = 0,
                    prefetch_buffer: int = 2) -> dict[str, Any]:
  """Measures images/s of the train input pipeline on synthetic data.

  The first ``num_workers + 1`` batches (until every worker has delivered one) are timed
  separately as start-up and excluded.

  Args:
    kind: 'cifar' or 'imagenet' (see module docstring).
    num_workers: 0 = in this process; N = grain worker processes.
    num_batches: batches timed after the first.
    batch_size: images per batch.
    seed: data and augmentation seed.
    prefetch_buffer: batches prepared ahead (per worker).

  Returns:
    A JSON-able dict with ``images_per_second``, ``seconds``, ``startup_seconds`` and the
    settings.
  """
  if kind not in _KINDS:
    raise ValueError(f"Unknown input benchmark {kind!r}; accepted: {list(_KINDS)}.")
  extra: dict[str, Any] = {}
  if kind == "cifar":
    rng = np.random.default_rng(seed)
    source = sources.ArraySource(rng.integers(0, 256, (10_000, 32, 32, 3), dtype=np.uint8),
                                 rng.integers(0, 10, 10_000), num_classes=10)
    size, mean, std = 32, config_lib.CIFAR_MEAN, config_lib.CIFAR_STD
  else:
    jpegs = synthetic_jpegs(32, seed=seed)
    extra["mean_jpeg_bytes"] = int(np.mean([len(j) for j in jpegs]))
    source = _CycledSource([{"image": j, "label": i % 1000} for i, j in enumerate(jpegs)],
                           length=100_000, num_classes=1000)
    size, mean, std = 224, config_lib.IMAGENET_MEAN, config_lib.IMAGENET_STD
  it = pipeline.build_train_iterator(
      source, augment=augment_lib.train_augment(kind, size=size, channels=3),
      normalizer=augment_lib.Normalizer(np.array(mean), np.array(std)),
      global_batch_size=batch_size, seed=seed, num_workers=num_workers,
      prefetch_buffer=prefetch_buffer)
  start = time.perf_counter()
  for _ in range(num_workers + 1):
    batch = next(it)
  startup = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(num_batches):
    batch = next(it)
  seconds = time.perf_counter() - start
  shape = tuple(batch["image"].shape[1:])
  del it, batch
  gc.collect()  # Stops the worker processes before the next measurement.
  return {"kind": kind, "num_workers": num_workers, "batch_size": batch_size,
          "num_batches": num_batches, "prefetch_buffer": prefetch_buffer, "image_shape": shape,
          "images_per_second": num_batches * batch_size / seconds, "seconds": seconds,
          "startup_seconds": startup, **extra}


def main(argv: list[str] | None = None) -> None:
  """``python -m atac_train.data.benchmark --kind imagenet --num-workers 0 1 2``: JSON lines."""
  parser = argparse.ArgumentParser(description=benchmark_input.__doc__.split("\n", 1)[0])
  parser.add_argument("--kind", choices=_KINDS, nargs="+", default=list(_KINDS))
  parser.add_argument("--num-workers", type=int, nargs="+", default=[0])
  parser.add_argument("--num-batches", type=int, default=50)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--prefetch-buffer", type=int, default=2)
  args = parser.parse_args(argv)
  for kind in args.kind:
    for workers in args.num_workers:
      print(json.dumps(benchmark_input(
          kind, num_workers=workers, num_batches=args.num_batches, batch_size=args.batch_size,
          seed=args.seed, prefetch_buffer=args.prefetch_buffer)), flush=True)


if __name__ == "__main__":
  main()
