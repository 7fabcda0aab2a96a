"""grain pipelines: the infinite, checkpointable train iterator and the exact, padded eval batches.

Train: ``source -> seed(seed).shuffle() -> repeat() -> random_map(augment) -> [p::P] -> batch``.
Batches hold uint8 pixels (and, for 'imagenet'/'alexnet', each example's float32 ``augment``
draws); `atac_train.data.device.DeviceTransform` finishes the recipe and normalises inside the
jitted step, so the host ships a quarter of the bytes of float32 images.
The shuffle and the augmentation act on the *global* stream of examples (epoch e is shuffled
with seed + e; each element's augmentation rng comes from the seed and its position in that
stream) and process p of P takes every P-th element. So the P processes see disjoint parts of
each epoch that together cover it, and a global batch holds the same examples, augmented the
same way, whatever the process count.

Eval: global batch k holds examples k*B .. k*B+B-1 of the split, process p rows p*b .. p*b+b-1
of it (b = B / P); rows past the end are padding (mask False, label 0, zero image), so every
process yields ceil(N / B) batches and each example appears exactly once with mask True. Eval
images are uint8 too (normalised by ``DeviceTransform.normalize`` in the eval step).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from atac_train.data import augment as augment_lib
from atac_train.data import config as config_lib
from atac_train.data import shared_batches
from atac_train.data import sources

Batch = dict[str, np.ndarray]


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"Need 0 <= process_index < process_count, got {process_index} and "
                     f"{process_count}.")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of the "
                     f"process count {process_count}.")
  return global_batch_size // process_count


def _ensure_absl_flags_parsed() -> None:
  """grain 0.2.18 worker start-up reads absl flags; outside absl.app.run mark them parsed."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _init_worker(worker_index: int, worker_count: int) -> None:
  """Runs in each grain worker before it unpickles the dataset.

  Batches are stacked into reused shared-memory slots (`shared_batches`: no new segment, and no
  copy, per batch), and OpenCV runs one thread: the workers already split the batches between the
  cores, and OpenCV's own pool (one thread per core by default) would oversubscribe them, e.g.
  2 workers x 2 prefetch threads x 2 OpenCV threads on 2 cores.
  """
  del worker_index, worker_count
  shared_batches.enable_in_worker()
  augment_lib.set_worker_threads()


def _to_iter(ds: grain.MapDataset, *, num_workers: int, prefetch_buffer: int) -> grain.IterDataset:
  """Iterates ``ds`` with ``prefetch_buffer`` batches in flight, each made by its own thread.

  With ``num_workers > 0`` that happens in grain worker processes (spawned; the dataset is
  pickled to them), which deliver batches in the same order as one process would.
  """
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=prefetch_buffer,
                                               prefetch_buffer_size=prefetch_buffer))
  if num_workers > 0:
    _ensure_absl_flags_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=prefetch_buffer),
        worker_init_fn=_init_worker)
  return it_ds


def _stack_examples(examples: Sequence[dict[str, Any]]) -> Batch | shared_batches.SlotBatch:
  """Stacks augmented examples into ``{'image': uint8, 'label': int32[, 'augment': float32]}``
  (in a worker, into a shared-memory slot that the main process receives as that dict)."""
  columns: dict[str, Any] = {key: [e[key] for e in examples]
                             for key in examples[0] if key != "label"}
  columns["label"] = np.array([e["label"] for e in examples], np.int32)
  return shared_batches.stack(columns)


def build_train_iterator(source: Sequence[dict[str, Any]], *, augment: augment_lib.Augment,
                         global_batch_size: int, seed: int,
                         process_index: int = 0, process_count: int = 1, num_workers: int = 0,
                         prefetch_buffer: int = 2) -> grain.DatasetIterator:
  """The train iterator over any random-access source (see module docstring).

  Args:
    source: a sequence of ``{'image', 'label'}`` records.
    augment: ``augment(image, rng) -> {'image': uint8 array[, 'augment': draws]}``.
    global_batch_size: examples per step over all processes.
    seed: shuffle and augmentation seed, in [0, 2**32).
    process_index: this process.
    process_count: number of processes.
    num_workers: 0 = in this process; N = grain worker processes.
    prefetch_buffer: batches prepared ahead.

  Returns:
    An infinite `grain.DatasetIterator` of local batches (``get_state``/``set_state``).
  """
  local = _local_batch_size(global_batch_size, process_index, process_count)
  if len(source) == 0:
    raise ValueError("Cannot train on an empty split.")
  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
  ds = ds.random_map(_AugmentMap(augment))
  ds = ds[process_index::process_count]
  ds = ds.batch(local, drop_remainder=True, batch_fn=_stack_examples)
  return iter(_to_iter(ds, num_workers=num_workers, prefetch_buffer=prefetch_buffer))


class _AugmentMap:
  """Picklable ``(example, rng) -> example`` applying an image augmentation."""

  def __init__(self, augment: augment_lib.Augment):
    self.augment = augment

  def __call__(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    return {**self.augment(example["image"], rng), "label": example["label"]}


class _EvalShard:
  """Process ``p``'s rows of the padded eval split: items are (record or None, mask)."""

  def __init__(self, source: Sequence[Any], *, local: int, process_index: int,
               process_count: int):
    self.source, self.local, self.process_index = source, local, process_index
    self.global_batch = local * process_count
    self.num_batches = -(-len(source) // self.global_batch)

  def __len__(self) -> int:
    return self.num_batches * self.local

  def __getitem__(self, index: int) -> tuple[Any, bool]:
    batch, row = divmod(index, self.local)
    position = batch * self.global_batch + self.process_index * self.local + row
    if position < len(self.source):
      return self.source[position], True
    return None, False


class _EvalBatch:
  """Preprocesses (record, mask) rows and stacks ``{'image', 'label', 'mask'}``."""

  def __init__(self, preprocess: augment_lib.Preprocess, image_shape: tuple[int, int, int]):
    self.preprocess, self.image_shape = preprocess, image_shape

  def __call__(self, rows: Sequence[tuple[Any, bool]]) -> Batch | shared_batches.SlotBatch:
    blank = np.zeros(self.image_shape, np.uint8)
    return shared_batches.stack({
        "image": [self.preprocess(r["image"]) if m else blank for r, m in rows],
        "label": np.array([r["label"] if m else 0 for r, m in rows], np.int32),
        "mask": np.array([m for _, m in rows], bool)})


def build_eval_iterable(source: Sequence[dict[str, Any]], *, preprocess: augment_lib.Preprocess,
                        image_shape: tuple[int, int, int],
                        global_batch_size: int, process_index: int = 0, process_count: int = 1,
                        num_workers: int = 0, prefetch_buffer: int = 2) -> Iterable[Batch]:
  """The padded, masked eval batches over any source (see module docstring); re-iterable."""
  local = _local_batch_size(global_batch_size, process_index, process_count)
  shard = _EvalShard(source, local=local, process_index=process_index,
                     process_count=process_count)
  ds = grain.MapDataset.source(shard).batch(
      local, batch_fn=_EvalBatch(preprocess, image_shape))
  return _to_iter(ds, num_workers=num_workers, prefetch_buffer=prefetch_buffer)


def _prepared(config: ml_collections.ConfigDict, split: str
              ) -> tuple[sources.ImageSource, tuple[int, int, int]]:
  source = sources.open_source(config, split)
  return source, config_lib.output_shape(config, source.image_shape)


def get_info(config: ml_collections.ConfigDict) -> config_lib.DatasetInfo:
  """Returns classes, model input shape and split sizes of a dataset config."""
  train, shape = _prepared(config, config.train_split)
  mean, std = config_lib.normalization_values(config, shape[-1])
  return config_lib.DatasetInfo(num_classes=train.num_classes, image_shape=shape,
                                num_train=len(train),
                                num_eval=len(sources.open_source(config, config.eval_split)),
                                max_value=train.max_value, augment=config.augment,
                                mean=tuple(mean), std=tuple(std))


def create_train_iterator(config: ml_collections.ConfigDict, *, global_batch_size: int,
                          seed: int, process_index: int = 0,
                          process_count: int = 1) -> grain.DatasetIterator:
  """This process's infinite, reshuffled-every-epoch, augmented train batches.

  Args:
    config: the dataset config.
    global_batch_size: examples per step over all processes (a multiple of process_count).
    seed: shuffle/augmentation seed in [0, 2**32); epoch e is shuffled with seed + e.
    process_index: ``jax.process_index()``.
    process_count: ``jax.process_count()``.

  Returns:
    A `grain.DatasetIterator` of ``{'image': uint8 (b, H, W, C), 'label': int32 (b,)}`` (plus
    ``'augment'``: float32 (b, `augment.NUM_PARAMS`) for 'imagenet'/'alexnet') with
    b = global_batch_size / process_count; checkpoint it with ``grain.checkpoint.CheckpointSave``.
    ``DeviceTransform.from_info(get_info(config))`` makes the model input from a batch.
  """
  source, shape = _prepared(config, config.train_split)
  augment = augment_lib.train_augment(config.augment, size=shape[:2], channels=shape[-1])
  return build_train_iterator(
      source, augment=augment, global_batch_size=global_batch_size,
      seed=seed, process_index=process_index, process_count=process_count,
      num_workers=config.num_workers, prefetch_buffer=config.prefetch_buffer)


def create_eval_iterable(config: ml_collections.ConfigDict, *, split: str | None = None,
                         global_batch_size: int, process_index: int = 0,
                         process_count: int = 1) -> Iterable[Batch]:
  """Padded, masked eval batches of a split; every process yields the same number of batches.

  Args:
    config: the dataset config.
    split: the split; None = ``config.eval_split``.
    global_batch_size: rows per step over all processes (a multiple of process_count).
    process_index: ``jax.process_index()``.
    process_count: ``jax.process_count()``.

  Returns:
    A re-iterable of ``{'image': uint8, 'label': int32, 'mask': bool}`` local batches (padded
    rows are zeros); over all processes each example of the split appears once with mask True.
    ``DeviceTransform.normalize`` makes the model input.
  """
  source, shape = _prepared(config, split or config.eval_split)
  preprocess = augment_lib.eval_preprocess(config.augment, size=shape[:2], channels=shape[-1])
  return build_eval_iterable(
      source, preprocess=preprocess, image_shape=shape,
      global_batch_size=global_batch_size, process_index=process_index,
      process_count=process_count, num_workers=config.num_workers,
      prefetch_buffer=config.prefetch_buffer)
