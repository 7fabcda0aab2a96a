"""Orbax checkpoints of the train state, the data-iterator state and the config.

Writes are atomic (Orbax finalises a step by renaming its temporary folder), so a crash or a kill
mid-save never damages the latest good checkpoint; a finalised checkpoint that fails to restore
(truncated or corrupted files) is skipped with a warning and the previous one is used.
"""

from __future__ import annotations

from absl import logging
import os
from typing import Any, Callable

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

BEST_METRIC = "eval/accuracy"


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def abstract_with_sharding(tree: Any, sharding_fn: Callable[[Any], Any]) -> Any:
  """``ShapeDtypeStruct``s of ``tree`` carrying the shardings wanted on *this* topology."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_fn(x)), tree)


class Checkpointer:
  """Saves and restores ``{state, data, config}`` steps under ``<workdir>/checkpoints``.

  Preservation: the latest ``keep`` steps, plus one every ``keep_every_steps`` (if > 0), plus
  the step with the best ``eval/accuracy``.

  Args:
    workdir: the run's workdir.
    keep: number of latest checkpoints kept.
    keep_every_steps: also keep steps divisible by this (0: none).
    async_save: write in a background thread (the arrays are copied to host before ``save``
      returns, so donating the state afterwards is safe).
  """

  def __init__(self, workdir: str, *, keep: int = 3, keep_every_steps: int = 0,
               async_save: bool = True):
    policies = [checkpoint_managers.LatestN(max(keep, 1)),
                checkpoint_managers.BestN(get_metric_fn=lambda m: m[BEST_METRIC], n=1,
                                          keep_checkpoints_without_metrics=False)]
    if keep_every_steps > 0:
      policies.append(checkpoint_managers.EveryNSteps(keep_every_steps))
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=1,
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    self.directory = checkpoint_dir(workdir)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, *, state: Any, data_iterator: Any | None, config: dict,
           metrics: dict | None = None) -> None:
    """Saves one step (forced: the trainer decides when to save)."""
    items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

  def restore(self, abstract_state: Any, *, data_iterator: Any | None = None,
              step: int | None = None) -> tuple[int, Any] | None:
    """Restores the given step, or the latest restorable one, into ``abstract_state``'s shardings.

    Args:
      abstract_state: pytree of ``jax.ShapeDtypeStruct`` with shardings for this topology.
      data_iterator: a fresh grain iterator whose position is set from the checkpoint.
      step: a specific step (errors are raised), or None for the latest good one (a damaged
        step is skipped with a warning).

    Returns:
      ``(step, state)``, or None when there is no checkpoint.
    """
    candidates = [step] if step is not None else sorted(self.all_steps(), reverse=True)
    for candidate in candidates:
      items = {"state": ocp.args.StandardRestore(abstract_state)}
      if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      try:
        restored = self._manager.restore(candidate, args=ocp.args.Composite(**items))
      except Exception as error:  # pylint: disable=broad-except
        if step is not None:
          raise
        logging.warning("Checkpoint step %d in %s cannot be restored (%s: %s); trying the "
                        "previous one.", candidate, self.directory, type(error).__name__,
                        str(error)[:300])
        continue
      return candidate, restored["state"]
    return None

  def restore_config(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
