"""Load a trained model for inference or fine-tuning in other JAX code.

>>> model, variables, config = atac_jax.checkpoint.load("workdirs/quickstart")
>>> logits = model.apply(variables, images, train=False)

``path`` may be a training workdir (its latest checkpoint), its ``checkpoints`` folder, or one
step folder (``.../checkpoints/1380``). Arrays are restored onto the caller's devices (replicated
over the local devices), whatever topology wrote them.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from atac_jax import models


def _step_dirs(directory: str) -> list[str]:
  steps = [name for name in os.listdir(directory)
           if name.isdigit() and os.path.isdir(os.path.join(directory, name, "state"))]
  return [os.path.join(directory, name) for name in sorted(steps, key=int)]


def resolve_step_dir(path: str, *, step: int | None = None) -> str:
  """The step folder that ``path`` (workdir, checkpoints folder or step folder) designates.

  Raises:
    FileNotFoundError: if there is no checkpoint there (the message says what was looked for).
  """
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(os.path.join(path, "state")):
    return path
  directory = os.path.join(path, "checkpoints") if os.path.isdir(
      os.path.join(path, "checkpoints")) else path
  candidates = _step_dirs(directory) if os.path.isdir(directory) else []
  if step is not None:
    candidates = [c for c in candidates if os.path.basename(c) == str(step)]
  if not candidates:
    which = f"step {step}" if step is not None else "any step"
    raise FileNotFoundError(
        f"No checkpoint ({which}) under {path}: expected a training workdir with "
        f"checkpoints/<step>/state, its checkpoints/ folder, or a step folder. Train first with "
        f"`atac-train --config ... --workdir {path}`.")
  return candidates[-1]


def read_config(step_dir: str) -> dict:
  """The resolved training config saved with a checkpoint (or in its workdir)."""
  for candidate in (os.path.join(step_dir, "config", "metadata"),
                    os.path.join(step_dir, "..", "..", "config.json")):
    if os.path.isfile(candidate):
      with open(candidate) as f:
        return json.load(f)
  raise FileNotFoundError(f"No config saved with the checkpoint {step_dir}.")


def build_model(config: dict) -> nn.Module:
  """The linen model described by a resolved training config."""
  model_config = config["model"]
  options = dict(model_config.get("options", {}))
  if config.get("half_precision"):
    options["dtype"] = jnp.bfloat16
  return models.create(model_config["name"], num_classes=model_config["num_classes"],
                       act=model_config["act"], **options)


def restore_state(step_dir: str, *, sharding: jax.sharding.Sharding | None = None) -> dict:
  """Restores the saved train-state pytree (as nested dicts) onto ``sharding``.

  The default is replication over this process's local devices, so a checkpoint written on any
  mesh restores on any other.
  """
  if sharding is None:
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ("local",))
    sharding = NamedSharding(mesh, PartitionSpec())
  checkpointer = ocp.StandardCheckpointer()
  state_dir = os.path.join(step_dir, "state")
  metadata = checkpointer.metadata(state_dir)
  tree = metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                          tree, is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
  return checkpointer.restore(state_dir, abstract)


def load(path: str, *, step: int | None = None) -> tuple[nn.Module, dict[str, Any], dict]:
  """Loads ``(model, variables, config)`` from a workdir, checkpoints folder or step folder.

  Args:
    path: where the checkpoint is.
    step: a specific step (default: the latest).

  Returns:
    The linen model, its ``{'params': ..., 'batch_stats': ...}`` variables and the resolved
    training config (a dict).
  """
  step_dir = resolve_step_dir(path, step=step)
  config = read_config(step_dir)
  state = restore_state(step_dir)
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
