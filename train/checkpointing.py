"""Orbax checkpoints of the train state, the data-iterator state and the config.

Writes are atomic (Orbax finalises a step by renaming its temporary folder), so a crash or a kill
mid-save never damages the latest good checkpoint. Reading goes through the same manager and item
handlers as :mod:`atac_jax.checkpoint` (which owns them, with the folder layout of
:mod:`atac_jax.workdir`). Deciding which step to resume from is :mod:`atac_train.resume`'s job.
"""

from __future__ import annotations

import logging as pylogging
import time
from typing import Any, Callable

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers

from atac_jax import checkpoint as ckpt_lib
from atac_jax import storage
from atac_jax.workdir import CONFIG_ITEM, DATA_ITEM, STATE_ITEM, Layout
from atac_train.errors import StorageFaultError, describe, storage_reason

BEST_METRIC = "eval/accuracy"
# A Python logger of its own, diverted to the log file with Orbax's (atac_train.background_logs).
_log = pylogging.getLogger(__name__)


def checkpoint_dir(workdir: str) -> str:
  return Layout(workdir).checkpoints


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
    self.layout = Layout(workdir)
    self.directory = self.layout.checkpoints
    self._manager = ckpt_lib.open_manager(self.directory, options=options)
    self._saving: int | None = None  # the step whose (async) save is not known to be finished
    self._failed = False

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, *, state: Any, data_iterator: Any | None, config: dict,
           metrics: dict | None = None) -> None:
    """Saves one step (forced: the trainer decides when to save).

    Raises:
      StorageFaultError: this save, or the previous one still being written, failed (the
        message names the step, the folder, the cause and the last good step).
    """
    self.wait()
    items = {STATE_ITEM: ocp.args.StandardSave(state), CONFIG_ITEM: ocp.args.JsonSave(config)}
    if data_iterator is not None:
      items[DATA_ITEM] = grain.checkpoint.CheckpointSave(data_iterator)
    self._saving = step
    try:
      self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
    except Exception as error:  # pylint: disable=broad-except  # any write error of any store
      raise self._fault(error) from None

  def _fault(self, error: BaseException) -> StorageFaultError:
    step, self._saving, self._failed = self._saving, None, True
    _log.error("Saving checkpoint step %s failed.", step, exc_info=error)  # to the log file
    good = ckpt_lib.available_steps(self.layout.root)
    last = (f"the last good checkpoint is step {good[-1]}; re-run the same command to resume "
            f"from it" if good else "no earlier checkpoint was written; re-run the same command "
            "to start again")
    return StorageFaultError(
        f"Could not save checkpoint step {step} to {self.directory}: {storage_reason(error)} "
        f"({describe(error)}). Nothing saved before is lost: {last} once the cause is "
        "fixed (free space, quota or permissions).")

  def restore_config(self, step: int) -> dict:
    """The resolved config saved with ``step``."""
    return ckpt_lib.restore_config(self._manager, step)

  def restore_state(self, step: int, abstract_state: Any) -> Any:
    """The state of ``step`` in ``abstract_state``'s structure, shapes and shardings."""
    return ckpt_lib.restore_state(self._manager, step, abstract_state)

  def restore_data(self, step: int, data_iterator: Any) -> None:
    """Sets ``data_iterator`` to its position saved with ``step``."""
    self._manager.restore(step, args=ocp.args.Composite(
        **{DATA_ITEM: grain.checkpoint.CheckpointRestore(data_iterator)}))

  def restore(self, abstract_state: Any, *, data_iterator: Any | None = None,
              step: int | None = None) -> tuple[int, Any] | None:
    """Restores the given step, or the latest restorable one, into ``abstract_state``'s shardings.

    The data iterator is only restored from a step whose state restored; when it fails, the
    iterator is put back where it was and the step counts as damaged.

    Args:
      abstract_state: pytree of ``jax.ShapeDtypeStruct`` with shardings for this topology.
      data_iterator: a grain iterator whose position is set from the checkpoint.
      step: a specific step (errors are raised), or None for the latest good one (a damaged
        step is skipped with a warning).

    Returns:
      ``(step, state)``, or None when there is no checkpoint.
    """
    if step is not None:
      return step, self.restore_step(step, abstract_state, data_iterator)
    found, state, _ = ckpt_lib.restore_newest(
        self.all_steps(), lambda s: self.restore_step(s, abstract_state, data_iterator),
        directory=self.directory)
    return None if found is None else (found, state)

  def restore_step(self, step: int, abstract_state: Any, data_iterator: Any | None) -> Any:
    """The state of ``step`` and, once that restored, the iterator position (reset on failure)."""
    state = self.restore_state(step, abstract_state)
    if data_iterator is not None:
      before = data_iterator.get_state()
      try:
        self.restore_data(step, data_iterator)
      except Exception:
        data_iterator.set_state(before)
        raise
    return state

  def move_aside(self, step: int) -> str:
    """Moves a damaged step to ``damaged_checkpoints/<step>-<time>`` (kept for inspection).

    Returns:
      Where it went.
    """
    storage.makedirs(self.layout.damaged)
    target = storage.join(self.layout.damaged,
                          f"{step}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}")
    storage.move(self.layout.step_dir(step), target)
    return target

  def reload(self) -> None:
    """Re-reads the step list (after steps were moved aside)."""
    self._manager.reload()

  def wait(self) -> None:
    """Waits for the pending save (StorageFaultError if it failed)."""
    if self._saving is None:
      return
    try:
      self._manager.wait_until_finished()
    except Exception as error:  # pylint: disable=broad-except
      raise self._fault(error) from None
    self._saving = None

  def close(self) -> None:
    """Finishes the pending save and closes; after a fault, closing raises nothing more."""
    try:
      self.wait()
    finally:
      try:
        self._manager.close()
      except Exception:  # pylint: disable=broad-except
        if not self._failed:
          raise

