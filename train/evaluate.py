"""``atac-eval``: evaluate a checkpoint on a full split and print one JSON line.

    atac-eval --workdir workdirs/quickstart [--step N] [--split test]

Without ``--step``, the latest checkpoint that restores is evaluated: a damaged one is skipped
with a warning naming it. ``--step`` of a step that does not exist lists the steps that do.
Started through :mod:`atac_train.cli`, which sets the XLA flags and the signal handling first.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import ml_collections
from absl import app, flags

from atac_jax import checkpoint
from atac_train import cpu_defaults, errors, parallel, trainer

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (or a checkpoint step folder).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest that restores).")
_SPLIT = flags.DEFINE_string("split", None, "Split to evaluate (default: the config's eval split).")


def evaluate_checkpoint(path: str, *, step: int | None = None, split: str | None = None,
                        devices: list[Any] | None = None) -> dict[str, Any]:
  """Evaluates the checkpoint at ``path`` on every example of ``split``.

  Args:
    path: workdir, checkpoints folder or step folder.
    step: checkpoint step (default: the latest that restores; damaged ones are skipped with a
      warning).
    split: split name (default: the config's eval split).
    devices: devices to evaluate on (default: all); any count works, whatever wrote the
      checkpoint.

  Raises:
    FileNotFoundError: no checkpoint, or no step ``step`` (the message lists the existing ones).
    ValueError: no checkpoint restores (the message gives each step's error).
  """
  mesh = parallel.create_mesh(devices)
  restored_step, state, config_dict = checkpoint.restore(path, step=step,
                                                         sharding=parallel.replicated(mesh))
  config = ml_collections.ConfigDict(config_dict)
  s = trainer.setup(config, devices=devices)
  variables = {"params": state["params"], "batch_stats": state.get("batch_stats", {})}
  result = trainer.evaluate(trainer.compile_eval_step(s), variables, config, s, split=split)
  return {"step": restored_step, "split": split or config.dataset.eval_split, **result}


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cpu_defaults.quiet_logs()
  try:
    result = evaluate_checkpoint(_WORKDIR.value, step=_STEP.value, split=_SPLIT.value)
  except (errors.TrainingError, ValueError, FileNotFoundError) as error:
    print(f"atac-eval: error: {error}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(result))


def run() -> None:
  """Runs the command (call it through :func:`atac_train.cli.evaluate`)."""
  flags.mark_flag_as_required("workdir")
  app.run(main)
