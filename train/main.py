"""``atac-train``: train a model from a config file; re-running the same command resumes.

    atac-train --config configs/quickstart.py --workdir workdirs/quickstart
    atac-train --config quickstart --workdir w/qs --config.model.act=relu
    atac-train --config quickstart --workdir w/qs --config.num_epochs=30 --extend

Started through :mod:`atac_train.cli`, which sets the XLA flags and the signal handling first.
"""

from __future__ import annotations

import functools
import json
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from atac_train import background_logs, config_file, cpu_defaults, errors, parallel, trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config: a get_config() file (configs/quickstart.py) or the name of "
    "a packaged config (quickstart).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.")
_FRESH = flags.DEFINE_bool(
    "fresh", False, "Start over at step 0 even though the workdir holds a run: its checkpoints, "
    "metrics and logs are first moved to WORKDIR/archive/<time>/.")
_EXTEND = flags.DEFINE_bool(
    "extend", False, "Allow a larger --config.num_epochs than the run in the workdir was started "
    "with (train a finished run longer). From the restored step on, the learning rate follows "
    "the schedule of the new num_epochs.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "Multi-host: host:port of process 0 (empty: auto-detect a "
    "Slurm/TPU cluster, else single process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "Multi-host: index of this process.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cpu_defaults.quiet_logs()
  background_logs.divert()
  parallel.maybe_initialize_distributed(coordinator_address=_COORDINATOR.value,
                                        num_processes=_NUM_PROCESSES.value,
                                        process_id=_PROCESS_ID.value)
  try:
    result = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value, fresh=_FRESH.value,
                                        extend=_EXTEND.value)
  except (errors.TrainingError, ValueError, FileNotFoundError) as error:
    details = background_logs.written()
    print(f"atac-train: error: {error}" + (f" (details: {details})" if details else ""),
          file=sys.stderr)
    sys.exit(2)
  if jax.process_index() == 0:
    print(json.dumps(result, default=float))


def run() -> None:
  """Runs the command (call it through :func:`atac_train.cli.train`)."""
  app.run(main, flags_parser=functools.partial(config_file.parse_flags, prog="atac-train"))
