"""Load a trained model for inference or fine-tuning in other JAX code.

>>> model, variables, config = atac_jax.checkpoint.load("workdirs/quickstart")
>>> x = atac_jax.checkpoint.preprocess(images, config)  # uint8 images -> the model's input
>>> logits = model.apply(variables, x, train=False)

``path`` may be a training workdir (its latest checkpoint that restores), its ``checkpoints``
folder, or one step folder (``.../checkpoints/1380``). Arrays are restored onto the caller's
devices (replicated over the local devices), whatever topology wrote them.

The Orbax calls here (one ``CheckpointManager`` with the items ``state``, ``data`` and
``config``, restored through ``ocp.args.Composite``) are the ones the trainer uses too; the folder
layout and the model come from :mod:`atac_jax.workdir`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from atac_jax import preprocessing, storage
from atac_jax.workdir import CONFIG_ITEM, DATA_ITEM, STATE_ITEM, Layout, build_model

__all__ = ["load", "preprocess", "restore", "resolve_step_dir", "read_config", "build_model",
           "merge_matching", "open_manager", "available_steps", "restore_newest",
           "DamagedStepError"]

T = TypeVar("T")


class DamagedStepError(Exception):
  """A checkpoint step that cannot be restored; the message is the reason, already described."""


def describe_failure(error: BaseException) -> str:
  """One line for why a step did not restore (tensorstore's spec dumps cut off)."""
  if isinstance(error, DamagedStepError):
    return str(error)
  return storage.describe_error(error, limit=300)


def restore_newest(steps: Sequence[int], restore_step: Callable[[int], T], *, directory: str,
                   propagate: tuple[type[BaseException], ...] = ()
                   ) -> tuple[int | None, T | None, list[tuple[int, str]]]:
  """The one fallback over checkpoint steps: ``restore_step(step)`` from the newest step down.

  A step whose restore raises is damaged (truncated or corrupted files): it is logged with a
  warning and the previous one is tried. Exceptions of the ``propagate`` types are not damage
  (e.g. a refused config) and are raised.

  Returns:
    ``(step, value, failures)`` of the newest step that restored, or ``(None, None, failures)``;
    ``failures`` lists ``(step, reason)`` of the damaged steps above it.
  """
  failures: list[tuple[int, str]] = []
  for step in sorted(steps, reverse=True):
    try:
      return step, restore_step(step), failures
    except propagate:
      raise
    except Exception as error:  # pylint: disable=broad-except  # any damage: try the previous
      reason = describe_failure(error)
      failures.append((step, reason))
      logging.warning("Checkpoint step %d in %s cannot be restored (%s); trying the previous "
                      "one.", step, directory, reason)
  return None, None, failures

preprocess = preprocessing.preprocess


def open_manager(directory: str, *, options: ocp.CheckpointManagerOptions | None = None
                 ) -> ocp.CheckpointManager:
  """An Orbax manager of a ``checkpoints`` folder that knows the handler of every item.

  Args:
    directory: the ``checkpoints`` folder.
    options: manager options (default: read the folder, never create it).
  """
  handlers = {STATE_ITEM: ocp.StandardCheckpointHandler(),
              CONFIG_ITEM: ocp.JsonCheckpointHandler(),
              DATA_ITEM: grain.checkpoint.CheckpointHandler()}
  return ocp.CheckpointManager(directory, options=options or ocp.CheckpointManagerOptions(
      create=False), item_handlers=handlers)


def _locate(path: str) -> tuple[str, int | None]:
  """(checkpoints folder, step or None) for a workdir, checkpoints folder or step folder.

  Local paths and URLs (``gs://...``) alike; an unsupported scheme raises StorageError.
  """
  storage.check_scheme(path)
  path = storage.normalize(path)
  name = storage.basename(path)
  if name.isdigit() and storage.isdir(storage.join(path, STATE_ITEM)):
    return storage.dirname(path), int(name)
  layout = Layout(path)
  return (layout.checkpoints if storage.isdir(layout.checkpoints) else path), None


def available_steps(path: str) -> list[int]:
  """The finalised checkpoint steps under a workdir or checkpoints folder, ascending."""
  directory, _ = _locate(path)
  return sorted(int(name) for name in storage.listdir(directory)
                if name.isdigit() and storage.isdir(storage.join(directory, name, STATE_ITEM)))


def _no_checkpoint(path: str, step: int | None) -> FileNotFoundError:
  steps = available_steps(path)
  if step is not None and steps:
    return FileNotFoundError(f"No checkpoint step {step} under {path}; existing steps: "
                             f"{', '.join(map(str, steps))}.")
  which = f"step {step}" if step is not None else "any step"
  return FileNotFoundError(
      f"No checkpoint ({which}) under {path}: expected a training workdir with "
      f"checkpoints/<step>/state, its checkpoints/ folder, or a step folder. Train first with "
      f"`atac-train --config ... --workdir {path}`.")


def resolve_step_dir(path: str, *, step: int | None = None) -> str:
  """The step folder that ``path`` (workdir, checkpoints folder or step folder) designates.

  Without ``step``: ``path`` itself if it is a step folder, else the latest step.

  Raises:
    FileNotFoundError: if there is no such checkpoint (the message lists the existing steps).
  """
  directory, own_step = _locate(path)
  if own_step is not None and step in (None, own_step):
    return storage.join(directory, str(own_step))
  steps = available_steps(directory)
  if step is not None:
    steps = [s for s in steps if s == step]
  if not steps:
    raise _no_checkpoint(path, step)
  return storage.join(directory, str(steps[-1]))


def restore_config(manager: ocp.CheckpointManager, step: int) -> dict:
  """The resolved training config saved with ``step``."""
  return manager.restore(step, args=ocp.args.Composite(
      **{CONFIG_ITEM: ocp.args.JsonRestore()}))[CONFIG_ITEM]


def restore_state(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
  """The train state of ``step``, restored into ``abstract_state``'s shapes and shardings."""
  return manager.restore(step, args=ocp.args.Composite(
      **{STATE_ITEM: ocp.args.StandardRestore(abstract_state)}))[STATE_ITEM]


def abstract_state(manager: ocp.CheckpointManager, step: int,
                   sharding: jax.sharding.Sharding) -> Any:
  """The saved state's tree (nested dicts) as ``ShapeDtypeStruct``s on ``sharding``."""
  metadata = manager.item_metadata(step)[STATE_ITEM]
  tree = metadata.tree if hasattr(metadata, "tree") else metadata
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                      tree, is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))


def _local_replicated() -> NamedSharding:
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ("local",))
  return NamedSharding(mesh, PartitionSpec())


def restore(path: str, *, step: int | None = None,
            sharding: jax.sharding.Sharding | None = None) -> tuple[int, dict, dict]:
  """Restores ``(step, state, config)``: the state pytree as nested dicts, and its config.

  Without ``step`` (and for a workdir or checkpoints folder), the latest step that restores: a
  damaged one (truncated or corrupted files) is skipped with a warning that names it.

  Args:
    path: workdir, checkpoints folder or step folder.
    step: a specific step (its errors are raised).
    sharding: where the arrays go (default: replicated over this process's local devices), so a
      checkpoint written on any mesh restores on any other.

  Raises:
    FileNotFoundError: no checkpoint, or no step ``step`` (the message lists the existing ones).
    ValueError: no step restores (the message gives each step's error).
  """
  directory, own_step = _locate(path)
  step = own_step if step is None else step
  steps = available_steps(directory)
  if step is not None and step not in steps:
    raise _no_checkpoint(path, step)
  if not steps:
    raise _no_checkpoint(path, None)
  sharding = sharding or _local_replicated()
  manager = open_manager(directory)

  def restore_step(candidate: int) -> tuple[dict, dict]:
    return (restore_state(manager, candidate, abstract_state(manager, candidate, sharding)),
            restore_config(manager, candidate))

  try:
    if step is not None:  # a named step: its errors are the caller's
      return (step, *restore_step(step))
    found, restored, failures = restore_newest(steps, restore_step, directory=directory)
  finally:
    manager.close()
  if found is None:
    reasons = "; ".join(f"step {s}: {reason}" for s, reason in failures)
    raise ValueError(f"No checkpoint under {path} restores: {reasons}.")
  return (found, *restored)


def read_config(path: str, *, step: int | None = None) -> dict:
  """The resolved training config saved with a checkpoint step (default: the latest step)."""
  step_dir = resolve_step_dir(path, step=step)
  manager = open_manager(storage.dirname(step_dir))
  try:
    return restore_config(manager, int(storage.basename(step_dir)))
  finally:
    manager.close()


def load(path: str, *, step: int | None = None) -> tuple[nn.Module, dict[str, Any], dict]:
  """Loads ``(model, variables, config)`` from a workdir, checkpoints folder or step folder.

  Args:
    path: where the checkpoint is.
    step: a specific step (default: the latest that restores).

  Returns:
    The linen model, its ``{'params': ..., 'batch_stats': ...}`` variables and the resolved
    training config (a dict; ``config['dataset']`` holds the preprocessing that
    :func:`preprocess` applies).
  """
  _, state, config = restore(path, step=step)
  variables = {"params": state["params"]}
  if state.get("batch_stats"):
    variables["batch_stats"] = state["batch_stats"]
  return build_model(config), variables, config


def merge_matching(target: Any, source: Any) -> Any:
  """Copies leaves of ``source`` into ``target`` where path and shape match (fine-tuning).

  Leaves whose shape differs (e.g. a classifier head with another ``num_classes``) or that are
  missing from ``source`` keep ``target``'s values.
  """
  flat_source = {jax.tree_util.keystr(path): leaf
                 for path, leaf in jax.tree_util.tree_leaves_with_path(source)}

  def pick(path, leaf):
    candidate = flat_source.get(jax.tree_util.keystr(path))
    if candidate is not None and tuple(candidate.shape) == tuple(leaf.shape):
      return jnp.asarray(candidate, leaf.dtype)
    return leaf
  return jax.tree_util.tree_map_with_path(pick, target)
