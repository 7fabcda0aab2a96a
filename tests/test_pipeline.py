"""grain pipelines: sharding, shuffling, determinism, resumption, exact padded eval, workers."""

import itertools

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from atac_train import data
from atac_train.data import augment, benchmark, pipeline, sources


def _indexed(n):
  """A source whose label is the example index, with images that also encode it."""
  images = (np.arange(n, dtype=np.uint8) % 251).reshape(n, 1, 1, 1) * np.ones((1, 2, 2, 1),
                                                                             np.uint8)
  return sources.ArraySource(images, np.arange(n), num_classes=n)


_NONE = augment.train_augment("none", size=2, channels=1)


def _train(n, *, batch, seed=0, index=0, count=1):
  return pipeline.build_train_iterator(
      _indexed(n), augment=_NONE, global_batch_size=batch, seed=seed,
      process_index=index, process_count=count)


def _labels(it, steps):
  return [next(it)["label"].tolist() for _ in range(steps)]


def test_process_shards_are_disjoint_and_cover_each_epoch():
  n, batch, count = 60, 12, 3
  steps = n // batch
  per_process = [_labels(_train(n, batch=batch, index=p, count=count), 2 * steps)
                 for p in range(count)]
  single = _labels(_train(n, batch=batch), 2 * steps)
  for epoch in range(2):
    seen = [sum(rows[epoch * steps:(epoch + 1) * steps], []) for rows in per_process]
    assert all(len(s) == n // count for s in seen)
    assert sorted(sum(seen, [])) == list(range(n))  # disjoint and covering
  for step in range(2 * steps):  # a global batch does not depend on the process count
    assert sorted(sum((rows[step] for rows in per_process), [])) == sorted(single[step])


def test_reshuffled_every_epoch_and_seeded():
  first = sum(_labels(_train(30, batch=10, seed=5), 6), [])
  epochs = [first[:30], first[30:]]
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(30))
  assert epochs[0] != epochs[1] and epochs[0] != list(range(30))
  assert sum(_labels(_train(30, batch=10, seed=5), 6), []) == first
  assert sum(_labels(_train(30, batch=10, seed=6), 6), []) != first


def _digits(**overrides):
  config = data.default_config()
  config.update(augment="digits", **overrides)
  return config


def _same(a, b):
  return all(np.array_equal(a[k], b[k]) for k in a)


def test_train_batches_typed_and_deterministic_per_seed():
  config = _digits()
  a = list(itertools.islice(data.create_train_iterator(config, global_batch_size=32, seed=1), 3))
  b = list(itertools.islice(data.create_train_iterator(config, global_batch_size=32, seed=1), 3))
  c = next(data.create_train_iterator(config, global_batch_size=32, seed=2))
  assert a[0]["image"].shape == (32, 8, 8, 1) and a[0]["image"].dtype == np.uint8
  assert a[0]["label"].shape == (32,) and a[0]["label"].dtype == np.int32
  assert all(_same(x, y) for x, y in zip(a, b))
  assert not _same(a[0], c)
  # Each process gets global_batch_size / process_count rows.
  local = data.create_train_iterator(config, global_batch_size=16, seed=1, process_index=1,
                                     process_count=2)
  assert next(local)["image"].shape == (8, 8, 8, 1)


def test_iterator_state_restores_the_next_batch(tmp_path):
  config = _digits()
  it = data.create_train_iterator(config, global_batch_size=16, seed=3)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = next(it)
  fresh = data.create_train_iterator(config, global_batch_size=16, seed=3)
  fresh.set_state(state)
  assert _same(next(fresh), expected)

  # The trainer's way: inside an Orbax Composite checkpoint.
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    following = next(it)
    resumed = data.create_train_iterator(config, global_batch_size=16, seed=3)
    manager.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
  assert _same(next(resumed), following)


def test_eval_counts_every_example_once_over_processes():
  n, batch, count = 100, 12, 3
  outputs = [list(pipeline.build_eval_iterable(
      _indexed(n), preprocess=augment.eval_preprocess("none", size=2, channels=1),
      image_shape=(2, 2, 1),
      global_batch_size=batch, process_index=p, process_count=count)) for p in range(count)]
  assert [len(o) for o in outputs] == [9, 9, 9]  # ceil(100 / 12) batches on every process
  real, pads = [], 0
  for batches in outputs:
    for b in batches:
      assert b["image"].shape == (4, 2, 2, 1) and b["mask"].dtype == bool
      real += b["label"][b["mask"]].tolist()
      pads += int((~b["mask"]).sum())
      assert np.all(b["image"][~b["mask"]] == 0) and np.all(b["label"][~b["mask"]] == 0)
      # Real rows are the uint8 pixels, which encode the index.
      assert b["image"].dtype == np.uint8
      np.testing.assert_array_equal(b["image"][b["mask"], 0, 0, 0], b["label"][b["mask"]] % 251)
  assert sorted(real) == list(range(n)) and pads == 9 * batch - n
  # Global batch k holds examples k*B .. k*B+B-1, process p its p-th quarter.
  assert outputs[1][0]["label"].tolist() == [4, 5, 6, 7]


def test_digits_eval_exact_and_reiterable():
  config = data.default_config()
  iterables = [data.create_eval_iterable(config, global_batch_size=48, process_index=p,
                                         process_count=3) for p in range(3)]
  labels = []
  for iterable in iterables:
    batches = list(iterable)
    assert len(batches) == 8 and batches[0]["image"].shape == (16, 8, 8, 1)
    labels += [b["label"][b["mask"]] for b in batches]
    again = list(iterable)
    assert all(_same(x, y) for x, y in zip(batches, again))
  np.testing.assert_array_equal(np.sort(np.concatenate(labels)),
                                np.sort(sources.digits_splits()["test"][1]))


def test_worker_processes_give_the_same_batches():
  config = _digits()
  local = list(itertools.islice(data.create_train_iterator(config, global_batch_size=8,
                                                           seed=0), 4))
  config.num_workers = 2
  it = data.create_train_iterator(config, global_batch_size=8, seed=0)
  remote = list(itertools.islice(it, 2))
  state = it.get_state()
  remote += [next(it), next(it)]
  assert all(_same(x, y) for x, y in zip(local, remote))
  resumed = data.create_train_iterator(config, global_batch_size=8, seed=0)
  resumed.set_state(state)
  assert _same(next(resumed), local[2])
  evals = list(data.create_eval_iterable(config, global_batch_size=100))
  assert sum(int(b["mask"].sum()) for b in evals) == 360


@pytest.mark.parametrize("batch,index,count,match", [
    (10, 0, 3, "multiple of the process count 3"),
    (12, 3, 3, "process_index < process_count"),
    (0, 0, 1, "positive multiple"),
])
def test_bad_batch_or_process_arguments(batch, index, count, match):
  with pytest.raises(ValueError, match=match):
    data.create_train_iterator(_digits(), global_batch_size=batch, seed=0, process_index=index,
                               process_count=count)


@pytest.mark.parametrize("kind,shape,extra", [("cifar", (32, 32, 3), 4),
                                              ("imagenet", (224, 224, 3), 4 + 40),
                                              ("alexnet", (128, 128, 3), 4 + 40)])
def test_input_benchmark_runs(kind, shape, extra):
  result = benchmark.benchmark_input(kind, num_batches=2, batch_size=4)
  assert result["images_per_second"] > 0 and tuple(result["image_shape"]) == shape
  # uint8 pixels, an int32 label and (with device augmentation) 10 float32 draws per image.
  assert result["bytes_per_image"] == np.prod(shape) + extra
  assert result["main_cpu_ms_per_batch"] > 0 and not result["to_device"]
  with pytest.raises(ValueError, match=r"accepted: \['cifar', 'imagenet', 'alexnet'\]"):
    benchmark.benchmark_input("coco")


def test_input_benchmark_through_the_trainers_device_step():
  result = benchmark.benchmark_input("cifar", num_batches=2, batch_size=4, to_device=True)
  assert result["to_device"] and result["images_per_second"] > 0


def test_imagenet_global_batch_is_the_same_whatever_the_process_count():
  """Crops and colour draws depend on the example's position in the global stream only."""
  jpegs = benchmark.synthetic_jpegs(3, seed=0)
  source = [{"image": jpegs[i % 3], "label": i} for i in range(16)]  # label = position

  def global_batches(count):
    iterators = [pipeline.build_train_iterator(
        source, augment=augment.train_augment("imagenet", size=32, channels=3),
        global_batch_size=8, seed=4, process_index=p, process_count=count)
        for p in range(count)]
    batches = []
    for _ in range(3):
      parts = [next(it) for it in iterators]
      merged = {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
      order = np.argsort(merged["label"])
      batches.append({k: v[order] for k, v in merged.items()})
    return batches

  single, double = global_batches(1), global_batches(2)
  for one, two in zip(single, double):
    assert one["image"].dtype == np.uint8 and one["augment"].dtype == np.float32
    assert _same(one, two)
  assert not np.array_equal(single[0]["augment"], single[1]["augment"])
