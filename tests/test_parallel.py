"""Mesh, shardings, batch-size checks and distributed auto-detection."""

import jax
import numpy as np
import pytest

from atac_train import parallel


def test_mesh_over_all_or_some_devices():
  assert parallel.create_mesh().shape == {"data": 8}
  assert parallel.create_mesh(jax.devices()[:2]).shape == {"data": 2}


def test_global_batch_is_split_over_devices():
  mesh = parallel.create_mesh()
  batch = parallel.global_batch({"x": np.arange(16.0).reshape(16, 1)},
                                parallel.data_sharded(mesh))
  shards = sorted((s.index[0].start, s.data.shape) for s in batch["x"].addressable_shards)
  assert shards == [(2 * i, (2, 1)) for i in range(8)]
  np.testing.assert_array_equal(np.asarray(batch["x"]).ravel(), np.arange(16.0))


@pytest.mark.parametrize("batch", [0, 12, -8])
def test_batch_must_divide_over_devices(batch):
  with pytest.raises(ValueError, match="multiple of the device count"):
    parallel.check_batch_size(batch)
  parallel.check_batch_size(16)
  parallel.check_batch_size(6, num_devices=2)


def test_no_cluster_means_no_distributed_init(monkeypatch):
  for name in ("SLURM_NTASKS", "JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(name, raising=False)
  assert parallel.maybe_initialize_distributed() is False
