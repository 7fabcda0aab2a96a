"""Reused shared-memory batch slots (atac_train.data.shared_batches): values, reuse, release."""

import gc
import itertools
import pickle

import numpy as np
import pytest

from atac_train.data import augment, benchmark, pipeline, shared_batches


@pytest.fixture
def pool():
  """A worker's pool of 3 slots at most (passed to `stack`: this process stays a main one)."""
  if shared_batches._posixshmem is None:  # pylint: disable=protected-access
    pytest.skip("no POSIX shared memory")
  slots = shared_batches._Pool(3)  # pylint: disable=protected-access
  yield slots
  slots.unlink_all()


def _columns(seed):
  rng = np.random.default_rng(seed)
  return {"image": [rng.integers(0, 256, (5, 7, 3), dtype=np.uint8) for _ in range(4)],
          "augment": [rng.normal(size=10).astype(np.float32) for _ in range(4)],
          "label": rng.integers(0, 10, 4).astype(np.int32),
          "mask": np.array([True, False, True, True])}


def _received(columns, pool):
  """What the main process gets: the worker's batch through pickle (grain's queue)."""
  slot = shared_batches.stack(columns, pool=pool)
  assert isinstance(slot, shared_batches.SlotBatch)
  return pickle.loads(pickle.dumps(slot))


def test_outside_a_worker_it_is_np_stack():
  columns = _columns(0)
  batch = shared_batches.stack(columns)
  assert not shared_batches.enabled() and isinstance(batch, dict)
  np.testing.assert_array_equal(batch["image"], np.stack(columns["image"]))
  assert batch["label"] is columns["label"]


def test_slot_batch_holds_np_stacks_values(pool):
  columns = _columns(1)
  batch = _received(columns, pool)
  assert list(batch) == list(columns)
  for key, column in columns.items():
    expected = column if isinstance(column, np.ndarray) else np.stack(column)
    assert batch[key].dtype == expected.dtype and batch[key].shape == expected.shape
    np.testing.assert_array_equal(batch[key], expected)
    assert batch[key].ctypes.data % 64 == 0  # aligned: a device transfer may use it in place


def test_a_slot_is_reused_only_after_every_view_is_gone(pool):
  first = _received(_columns(2), pool)
  name = pool.segments[0].name
  row = first["image"][1]  # a view of a view keeps the slot too
  expected_row = row.copy()
  del first
  gc.collect()
  second = _received(_columns(3), pool)
  assert len(pool.segments) == 2 and pool.segments[1].name != name  # the first is still held
  np.testing.assert_array_equal(row, expected_row)
  del row, second
  third = _received(_columns(4), pool)  # both free again: the first slot is taken, no new one
  assert len(pool.segments) == 2
  np.testing.assert_array_equal(third["image"], np.stack(_columns(4)["image"]))


def test_with_every_slot_held_a_batch_is_an_ordinary_dict(pool):
  held = [_received(_columns(i), pool) for i in range(3)]
  batch = shared_batches.stack(_columns(9), pool=pool)
  assert isinstance(batch, dict) and len(pool.segments) == 3
  np.testing.assert_array_equal(batch["augment"], np.stack(_columns(9)["augment"]))
  del held


def test_a_closed_pool_makes_no_slots_and_missing_segments_open_as_none(pool):
  slot = shared_batches.stack(_columns(5), pool=pool)
  pool.unlink_all()  # a worker exiting: grain may still drain batches from its queue
  assert isinstance(shared_batches.stack(_columns(6), pool=pool), dict)
  assert pickle.loads(pickle.dumps(slot)) is None


def test_worker_batches_equal_in_process_ones_imagenet():
  """Through 2 workers (slots, one OpenCV thread): the same crops, draws and labels."""
  jpegs = benchmark.synthetic_jpegs(4, seed=0)
  source = [{"image": jpegs[i % 4], "label": i} for i in range(40)]

  def batches(workers):
    it = pipeline.build_train_iterator(
        source, augment=augment.train_augment("imagenet", size=32, channels=3),
        global_batch_size=8, seed=2, num_workers=workers)
    out = [{k: np.array(v) for k, v in b.items()} for b in itertools.islice(it, 7)]
    it.close()
    return out

  for local, remote in zip(batches(0), batches(2)):
    assert set(local) == set(remote) == {"image", "augment", "label"}
    for key in local:
      assert local[key].dtype == remote[key].dtype
      np.testing.assert_array_equal(local[key], remote[key])
