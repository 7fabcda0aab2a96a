"""Where a run starts: step 0, the latest checkpoint that restores, or a refusal.

Re-running the same ``atac-train`` command resumes, and resuming is idempotent:

- A step that fails to restore (truncated or corrupted files) while an older one restores is moved
  to ``DIR/damaged_checkpoints/<step>-<time>/`` (kept for inspection) and the older one is used;
  the run trains that step again and saves it anew, so a damaged step never blocks a rerun.
- If checkpoints exist and none restores, nothing is moved and the run is refused
  (:class:`~atac_train.errors.ResumeError`): the message names the workdir, each step's error and
  the choices (``--fresh`` archives the run and starts over).
- The data-iterator position is only restored from a step whose state restored.
- The run's config must be the one the checkpoint was trained with, except the settings in
  :data:`RESUMABLE` (they cannot change the result); with ``extend``, ``num_epochs`` may grow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from atac_jax import checkpoint as checkpoint_lib
from atac_jax.workdir import Layout, read_json, write_json
from atac_train import validation
from atac_train.checkpointing import Checkpointer
from atac_train.errors import ResumeError, describe

# Settings that may differ on resume, from the one table of config keys (validation.settings).
RESUMABLE = validation.resumable_keys()
# May grow with extend=True (atac-train --extend).
EXTENDABLE = "num_epochs"


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
  return flat


def config_changes(saved: Mapping[str, Any], new: Mapping[str, Any]
                   ) -> list[tuple[str, Any, Any]]:
  """``(key, saved value, new value)`` for every dotted key whose value differs.

  Keys that only one side has (added or removed by another atac-jax version) are not compared.
  """
  old_flat, new_flat = _flatten(saved), _flatten(new)
  return [(key, old_flat[key], new_flat[key]) for key in sorted(old_flat.keys() & new_flat.keys())
          if old_flat[key] != new_flat[key]]


def check_config(saved: Mapping[str, Any], new: Mapping[str, Any], *, extend: bool,
                 workdir: str, step: int) -> None:
  """Refuses a config that differs from the checkpoint's beyond :data:`RESUMABLE`.

  Raises:
    ResumeError: with the diff of the keys and the choices.
  """
  changes = [c for c in config_changes(saved, new) if c[0] not in RESUMABLE]
  if extend:
    for key, old, value in changes:
      if key == EXTENDABLE and value < old:
        raise ResumeError(f"--extend: num_epochs={value!r} is smaller than the {old!r} the run in "
                          f"{workdir} was trained with; num_epochs can only grow.")
    changes = [c for c in changes if c[0] != EXTENDABLE]
  if not changes:
    return
  diff = "; ".join(f"{key}: {old!r} -> {value!r}" for key, old, value in changes)
  extend_hint = (", or --extend to train a finished run for more epochs (num_epochs only)"
                 if any(c[0] == EXTENDABLE for c in changes) else "")
  raise ResumeError(
      f"The config differs from the one the run in {workdir} was trained with (checkpoint step "
      f"{step}): {diff}. Re-run with the run's settings (they are in {Layout(workdir).config}), "
      f"use another --workdir, pass --fresh to archive this run and start over{extend_hint}. "
      f"Settings that may change on resume: {', '.join(RESUMABLE)}.")


def _everywhere(ok: bool) -> bool:
  """Whether ``ok`` holds on every process (one answer for all)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def _attempt(fn) -> tuple[bool, Any, str]:
  try:
    value, error = fn(), ""
  except Exception as e:  # pylint: disable=broad-except  # a damaged step
    value, error = None, describe(e)
  return _everywhere(not error), value, error or "failed on another process"


@dataclasses.dataclass
class Start:
  """Where the run starts.

  Attributes:
    step: the restored step (0 for a fresh start).
    state: the restored train state, or None for a fresh start.
    saved_config: the config saved with the restored step, or None.
  """
  step: int
  state: Any = None
  saved_config: dict | None = None


def find_start(ckpt: Checkpointer, *, abstract_state: Any, data_iterator: Any,
               config: Mapping[str, Any], extend: bool = False) -> Start:
  """Restores the latest step that restores (see the module docstring), or returns step 0.

  Args:
    ckpt: the run's checkpointer.
    abstract_state: the state's ``ShapeDtypeStruct``s with this topology's shardings.
    data_iterator: the train iterator; its position is set only from a step whose state restored.
    config: the resolved config of this invocation.
    extend: allow a larger ``num_epochs`` than the checkpoint's.

  Raises:
    ResumeError: the config differs from the checkpoint's, or no checkpoint restores.
  """
  workdir = ckpt.layout.root

  def restore_step(step: int) -> tuple[dict, Any]:
    ok, saved, error = _attempt(lambda: ckpt.restore_config(step))
    if not ok:
      raise checkpoint_lib.DamagedStepError(error)
    _repair_config_file(ckpt.layout, saved, step=step)
    check_config(saved, config, extend=extend, workdir=workdir, step=step)
    ok, state, error = _attempt(lambda: ckpt.restore_step(step, abstract_state, data_iterator))
    if not ok:
      raise checkpoint_lib.DamagedStepError(error)
    return saved, state

  step, restored, failed = checkpoint_lib.restore_newest(
      ckpt.all_steps(), restore_step, directory=ckpt.directory, propagate=(ResumeError,))
  if step is not None:
    _move_aside(ckpt, [s for s, _ in failed])
    saved, state = restored
    return Start(step=step, state=state, saved_config=saved)
  if failed:
    errors = "; ".join(f"step {s}: {e}" for s, e in failed)
    raise ResumeError(
        f"No checkpoint in {ckpt.directory} restores ({errors}). Nothing was changed. If the files "
        f"are damaged, re-run with --fresh to move this run to {Layout(workdir).archive}/ and "
        "start over; if they were written by another atac-jax version, resume with that version.")
  return Start(step=0)


def _repair_config_file(layout: Layout, saved: Mapping[str, Any], *, step: int) -> None:
  """Process 0: an unreadable ``config.json`` is rewritten from the checkpoint's own copy, so the
  file a refusal points to holds the run's settings."""
  if jax.process_index() != 0:
    return
  try:
    read_json(layout.config)
  except FileNotFoundError:
    return  # written anew by the run once it starts (or never there)
  except (ValueError, OSError) as e:
    write_json(layout.config, saved)
    logging.warning("%s was unreadable (%s); restored it from the copy saved with checkpoint step "
                    "%d.", layout.config, e, step)


def _move_aside(ckpt: Checkpointer, steps: list[int]) -> None:
  if not steps:
    return
  if jax.process_index() == 0:
    for step in steps:
      target = ckpt.move_aside(step)
      logging.warning("Moved the damaged checkpoint step %d to %s (kept for inspection; delete "
                      "it when done). Training resumes from an earlier step.", step, target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("atac_train.resume.move_aside")
  ckpt.reload()
