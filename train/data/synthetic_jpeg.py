"""Synthetic ImageNet-like JPEGs for the input benchmarks (NumPy and PIL only, so that the
tf.data comparison, `tf_benchmark`, can load it in a venv without the project's dependencies)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


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
