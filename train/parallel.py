"""Device mesh, shardings, global batches and multi-host initialisation."""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def maybe_initialize_distributed(*, coordinator_address: str = "", num_processes: int = 0,
                                 process_id: int = -1) -> bool:
  """Calls ``jax.distributed.initialize`` when asked to or when a cluster is detected.

  Explicit arguments win; otherwise JAX's own auto-detection is used where a cluster environment
  is present (Slurm with several tasks, Cloud TPU pods, or ``JAX_COORDINATOR_ADDRESS``). On CPU the
  gloo collectives are selected so processes can reduce across hosts.

  Returns:
    Whether ``jax.distributed`` was initialised.
  """
  explicit = bool(coordinator_address)
  detected = (int(os.environ.get("SLURM_NTASKS", "1")) > 1
              or "JAX_COORDINATOR_ADDRESS" in os.environ
              or len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1)
  if not (explicit or detected):
    return False
  if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or explicit:
    try:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # pylint: disable=broad-except  # option renamed in some releases
      logging.warning("Could not select gloo CPU collectives.")
  kwargs: dict[str, Any] = {}
  if explicit:
    kwargs = {"coordinator_address": coordinator_address, "num_processes": num_processes,
              "process_id": process_id}
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def create_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh, axis ``data``, over ``devices`` (default: every device of every process)."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.array(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding that keeps a full copy on every device."""
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  """Sharding that splits the leading (batch) axis over the ``data`` axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, *, num_devices: int | None = None,
                     what: str = "global_batch_size") -> None:
  """Raises ValueError unless the batch divides evenly over the devices and processes."""
  devices, processes = num_devices or jax.device_count(), jax.process_count()
  if global_batch_size <= 0 or global_batch_size % devices or global_batch_size % processes:
    raise ValueError(
        f"{what}={global_batch_size} must be a positive multiple of the device count "
        f"({devices} devices over {processes} process(es)); e.g. "
        f"{max(devices, (global_batch_size // devices) * devices) or devices}.")


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Builds global arrays from this process's rows of the batch."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)
