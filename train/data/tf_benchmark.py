"""tf.data's speed on the 'imagenet' recipe, beside ours (benchmark-only; needs TensorFlow).

Not a training dependency: run it from a separate virtual environment with ``tensorflow-cpu``
(e.g. ``python3 -m venv .venv-tf && .venv-tf/bin/pip install tensorflow-cpu pillow``)::

  taskset -c 0 .venv-tf/bin/python train/data/tf_benchmark.py --jitter 1 0

The pipeline is the flax ImageNet example's (``sample_distorted_bounding_box`` with the same area
and aspect ranges, ``decode_and_crop_jpeg`` of that window, bilinear resize to 224, random flip)
plus, with ``--jitter 1``, colour jitter 0.4 (brightness, contrast, saturation), PCA lighting 0.1,
and in both cases normalisation to float32: the reference recipe as tf.data would run it, all on
the host. The images are `benchmark.synthetic_jpegs`, the ones
``python -m atac_train.data.benchmark --kind imagenet`` decodes. One thread of TensorFlow work
(one core, like ``--num-workers 0``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time


def _synthetic_jpegs(count: int, seed: int) -> list[bytes]:
  """The project's synthetic JPEGs; loaded by path, since this venv lacks the project's deps."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "synthetic_jpeg.py")
  spec = importlib.util.spec_from_file_location("synthetic_jpeg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.synthetic_jpegs(count, seed=seed)


def benchmark(*, jitter: bool, num_batches: int = 50, batch_size: int = 128,
              seed: int = 0) -> dict:
  """Images/s of the tf.data pipeline (see module docstring), first 2 batches excluded."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.threading.set_inter_op_parallelism_threads(1)
  tf.config.threading.set_intra_op_parallelism_threads(1)
  eigval = tf.constant([55.46, 4.794, 1.148]) / 255.0
  eigvec = tf.constant([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140],
                        [-0.5836, -0.6948, 0.4203]])
  mean, std = tf.constant([0.485, 0.456, 0.406]), tf.constant([0.229, 0.224, 0.225])

  def preprocess(image_bytes):
    shape = tf.io.extract_jpeg_shape(image_bytes)
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
        min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    offset_y, offset_x, _ = tf.unstack(begin)
    height, width, _ = tf.unstack(size)
    image = tf.io.decode_and_crop_jpeg(image_bytes, tf.stack([offset_y, offset_x, height, width]),
                                       channels=3)
    image = tf.image.resize(image, [224, 224], method="bilinear") / 255.0
    image = tf.image.random_flip_left_right(image)
    if jitter:
      factors = tf.random.uniform([3], 0.6, 1.4)
      image = image * factors[0]
      image = tf.image.adjust_contrast(image, factors[1])
      image = tf.image.adjust_saturation(image, factors[2])
      alpha = tf.random.normal([3], 0.0, 0.1)
      image = tf.clip_by_value(image + tf.linalg.matvec(eigvec, alpha * eigval), 0.0, 1.0)
    return (image - mean) / std

  jpegs = _synthetic_jpegs(32, seed)
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  ds = (tf.data.Dataset.from_tensor_slices(jpegs).repeat().map(preprocess, num_parallel_calls=1)
        .batch(batch_size, drop_remainder=True).prefetch(2).with_options(options))
  it = iter(ds)
  for _ in range(2):
    next(it)
  start = time.perf_counter()
  for _ in range(num_batches):
    batch = next(it)
  seconds = time.perf_counter() - start
  return {"pipeline": "tf.data", "jitter_and_lighting": jitter, "batch_size": batch_size,
          "num_batches": num_batches, "images_per_second": num_batches * batch_size / seconds,
          "bytes_per_image": int(batch.numpy().nbytes // batch_size),
          "tensorflow_version": tf.__version__}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--jitter", type=int, nargs="+", default=[1, 0])
  parser.add_argument("--num-batches", type=int, default=50)
  parser.add_argument("--batch-size", type=int, default=128)
  args = parser.parse_args()
  for jitter in args.jitter:
    print(json.dumps(benchmark(jitter=bool(jitter), num_batches=args.num_batches,
                               batch_size=args.batch_size)), flush=True)


if __name__ == "__main__":
  main()
