"""``atac-train``: train a model from a config file; re-running the same command resumes.

    atac-train --config configs/quickstart.py --workdir workdirs/quickstart
    atac-train --config configs/cifar10_resnet20_atac.py --workdir w/c10 --config.model.act=relu
"""

from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (a get_config() module, e.g. configs/quickstart.py).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "Multi-host: host:port of process 0 (empty: auto-detect a "
    "Slurm/TPU cluster, else single process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "Multi-host: index of this process.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from train import cpu_defaults  # pylint: disable=g-import-not-at-top
  cpu_defaults.apply()
  cpu_defaults.quiet_logs()
  from train import parallel, trainer  # pylint: disable=g-import-not-at-top  # after XLA flags
  parallel.maybe_initialize_distributed(coordinator_address=_COORDINATOR.value,
                                        num_processes=_NUM_PROCESSES.value,
                                        process_id=_PROCESS_ID.value)
  try:
    result = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, trainer.NonFiniteLossError) as error:
    print(f"atac-train: error: {error}", file=sys.stderr)
    sys.exit(2)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    print(json.dumps(result, default=float))


def run() -> None:
  """Console-script entry point."""
  app.run(main)


if __name__ == "__main__":
  run()
