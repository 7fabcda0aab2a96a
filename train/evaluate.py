"""``atac-eval``: evaluate a checkpoint on a full split and print one JSON line.

    atac-eval --workdir workdirs/quickstart [--step N] [--split test]
"""

from __future__ import annotations

import json
import sys
from typing import Any

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (or a checkpoint step folder).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_SPLIT = flags.DEFINE_string("split", None, "Split to evaluate (default: the config's eval split).")


def evaluate_checkpoint(path: str, *, step: int | None = None, split: str | None = None,
                        devices: list[Any] | None = None) -> dict[str, Any]:
  """Evaluates the checkpoint at ``path`` on every example of ``split``.

  Args:
    path: workdir, checkpoints folder or step folder.
    step: checkpoint step (default: the latest).
    split: split name (default: the config's eval split).
    devices: devices to evaluate on (default: all); any count works, whatever wrote the
      checkpoint.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  from atac_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from train import parallel, trainer  # pylint: disable=g-import-not-at-top

  step_dir = checkpoint.resolve_step_dir(path, step=step)
  config = ml_collections.ConfigDict(checkpoint.read_config(step_dir))
  s = trainer.setup(config, devices=devices)
  state = checkpoint.restore_state(step_dir, sharding=parallel.replicated(s.mesh))
  variables = {"params": state["params"], "batch_stats": state.get("batch_stats", {})}
  result = trainer.evaluate(trainer.compile_eval_step(s), variables, config, s, split=split)
  return {"step": int(state["step"]), "split": split or config.dataset.eval_split, **result}


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from train import cpu_defaults  # pylint: disable=g-import-not-at-top
  cpu_defaults.apply()
  cpu_defaults.quiet_logs()
  try:
    result = evaluate_checkpoint(_WORKDIR.value, step=_STEP.value, split=_SPLIT.value)
  except (ValueError, FileNotFoundError) as error:
    print(f"atac-eval: error: {error}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(result))


def run() -> None:
  """Console-script entry point."""
  flags.mark_flag_as_required("workdir")
  app.run(main)


if __name__ == "__main__":
  run()
