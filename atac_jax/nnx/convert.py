"""Weights both ways between the linen variable layout and an NNX module's state.

>>> atac_jax.nnx.from_linen(nnx_unit, linen_variables)     # loads in place
>>> linen_variables = atac_jax.nnx.to_linen(nnx_unit)        # {'params': ..., 'batch_stats': ...}

Name mapping (one rule for every module of :mod:`atac_jax.nnx`):

* collection: ``nnx.Param`` <-> ``params``, ``nnx.BatchStat`` <-> ``batch_stats``; other NNX
  variables (e.g. RNG state) are not converted;
* path: the NNX attribute path is the linen module path (``conv_down.kernel`` <->
  ``conv_down/kernel``), except inside a :class:`~atac_jax.nnx.LinenModule`, whose ``params``
  / ``batch_stats`` attribute is the collection itself (``params.conv1.kernel`` <->
  ``params/conv1/kernel``);
* shape: a variable with ``linen_shape`` metadata has that shape in linen (the point-wise
  kernels of :class:`~atac_jax.nnx.ATAC`: ``(C, K)`` in NNX, ``(1, 1, C, K)`` in linen); all
  others have the same shape both ways. Values are never changed, only reshaped.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from atac_jax.nnx.wrapper import COLLECTIONS, LinenModule

Path = tuple[Any, ...]


def _collection(variable: nnx.Variable) -> str | None:
  for name, kind in COLLECTIONS.items():
    if isinstance(variable, kind):
      return name
  return None


def _variables(module: nnx.Module) -> list[tuple[str, Path, nnx.Variable]]:
  """``(collection, linen path, variable)`` for every Param/BatchStat of ``module``."""
  if not isinstance(module, nnx.Module):
    raise ValueError(f"Expected an nnx.Module; got {type(module).__name__}.")
  nodes = list(nnx.iter_graph(module))
  wrappers = {path for path, node in nodes if isinstance(node, LinenModule)}
  out = []
  for path, node in nodes:
    collection = _collection(node) if isinstance(node, nnx.Variable) else None
    if collection is None:
      continue
    linen_path = tuple(str(p) for p in path)
    for i in range(len(path)):
      if path[:i] in wrappers and path[i] == collection:
        linen_path = linen_path[:i] + linen_path[i + 1:]
        break
    out.append((collection, linen_path, node))
  return out


def to_linen(module: nnx.Module) -> dict[str, dict]:
  """The linen variables ``{'params': ..., 'batch_stats': ...}`` of an NNX module.

  Args:
    module: an :mod:`atac_jax.nnx` unit or model, or any NNX module built from them whose
      attribute names follow the linen module names.

  Returns:
    Nested dicts as ``linen_module.init`` returns them (collections without variables left
    out), ready for ``linen_module.apply``. Arrays are shared, not copied.
  """
  result: dict[str, dict] = {}
  for collection, path, variable in _variables(module):
    value = variable.get_value()
    shape = variable.get_metadata("linen_shape", None)
    if shape is not None:
      value = jnp.reshape(value, shape)
    node = result.setdefault(collection, {})
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return result


def from_linen(module: nnx.Module, variables: Any) -> nnx.Module:
  """Loads linen variables into an NNX module in place (the inverse of :func:`to_linen`).

  Args:
    module: the NNX module (its structure fixes the variables it needs).
    variables: ``{'params': ..., 'batch_stats': ...}`` of the matching linen unit or model.

  Returns:
    ``module`` (updated in place).

  Raises:
    ValueError: listing the variables missing from ``variables``, those ``module`` does not
      have, or those whose shapes do not match (nothing is changed then).
  """
  entries = _variables(module)
  flat = {}
  for collection in COLLECTIONS:
    tree = variables.get(collection, {}) if hasattr(variables, "get") else {}
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      flat[(collection, tuple(str(getattr(k, "key", k)) for k in key_path))] = leaf
  missing, mismatched, updates = [], [], []
  for collection, path, variable in entries:
    key = (collection, path)
    if key not in flat:
      missing.append("/".join(key[:1] + path))
      continue
    value = jnp.asarray(flat.pop(key))
    expected = variable.get_metadata("linen_shape", None) or variable.get_value().shape
    if tuple(value.shape) != tuple(expected):
      mismatched.append(f"{'/'.join((collection,) + path)}: {value.shape} (expected "
                        f"{tuple(expected)})")
      continue
    updates.append((variable, jnp.reshape(value, variable.get_value().shape)))
  unused = ["/".join((c,) + p) for c, p in flat]
  if missing or mismatched or unused:
    raise ValueError(
        "from_linen: the variables do not match the module. "
        f"Missing: {missing or 'none'}; not in the module: {unused or 'none'}; "
        f"shape mismatch: {mismatched or 'none'}. Accepted: the variables of the linen "
        "unit/model with the same options (e.g. linen_module.init(...)).")
  for variable, value in updates:
    variable.set_value(value)
  return module
