"""``LinenModule``: an NNX module that runs a linen module and owns its variables as NNX state."""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from atac_jax.nnx._common import merge_mode

# Linen collection <-> NNX variable type, for the wrapper and for the conversion functions.
COLLECTIONS: dict[str, type[nnx.Variable]] = {"params": nnx.Param, "batch_stats": nnx.BatchStat}


def _is_variable(node: Any) -> bool:
  return isinstance(node, nnx.Variable)


class LinenModule(nnx.Module):
  """Runs a linen module (``module.apply(variables, x, train=...)``) as an NNX module.

  Not a rewrite: the computation is the linen module's. The wrapper owns the variables: every
  leaf of the linen ``params`` collection is an ``nnx.Param`` and every leaf of ``batch_stats``
  an ``nnx.BatchStat``, held in nested dicts under the attributes ``params`` and
  ``batch_stats`` (NNX paths ``params.<linen path>``, ``batch_stats.<linen path>``), so
  ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` trains them and :func:`atac_jax.nnx.to_linen`
  returns the linen variables unchanged. ``model.train()`` / ``model.eval()`` set
  ``use_running_average``; in training the call runs with ``train=True`` and writes the updated
  ``batch_stats`` back into the ``nnx.BatchStat`` variables.

  Args:
    module: the linen module; its ``__call__`` takes ``(x, *, train: bool)``.
    sample: an input (or ``jax.ShapeDtypeStruct``) whose shape fixes the variable shapes; the
      variables come from ``module.init(rngs.params(), zeros_like(sample), train=False)``.
    rngs: ``nnx.Rngs`` with a ``params`` stream.
    use_running_average: initial mode (False: training, as ``nnx.BatchNorm``).

  Raises:
    ValueError: if ``module`` is not a linen module, or its init creates collections other than
      ``params`` and ``batch_stats``.
  """

  def __init__(self, module: nn.Module, sample: Any, *, rngs: nnx.Rngs,
               use_running_average: Optional[bool] = False):
    if not isinstance(module, nn.Module):
      raise ValueError(f"LinenModule wraps a flax.linen Module; got {type(module).__name__}.")
    zeros = jnp.zeros(sample.shape, sample.dtype)
    variables = jax.jit(lambda key, x: module.init(key, x, train=False))(rngs.params(), zeros)
    extra = sorted(set(variables) - set(COLLECTIONS))
    if extra:
      raise ValueError(f"LinenModule: {type(module).__name__} creates collections {extra}; "
                       f"accepted: {list(COLLECTIONS)}.")
    self.module = module
    self.use_running_average = use_running_average
    self.params = nnx.data(_wrap(variables.get("params", {}), nnx.Param))
    self.batch_stats = nnx.data(_wrap(variables.get("batch_stats", {}), nnx.BatchStat))

  def __call__(self, x: jax.Array, use_running_average: Optional[bool] = None,
               **kwargs: Any) -> Any:
    """``module.apply(variables, x, train=not use_running_average, **kwargs)``.

    Args:
      x: the input.
      use_running_average: overrides the attribute for this call.
      **kwargs: further keyword arguments of the linen module's ``__call__``.
    """
    layer = type(self.module).__name__
    train = not merge_mode(use_running_average, self.use_running_average, layer=layer)
    variables = {"params": _unwrap(self.params)}
    if self.batch_stats:
      variables["batch_stats"] = _unwrap(self.batch_stats)
    if not (train and self.batch_stats):
      return self.module.apply(variables, x, train=train, **kwargs)
    y, updates = self.module.apply(variables, x, train=True, mutable=["batch_stats"], **kwargs)
    _assign(self.batch_stats, updates["batch_stats"])
    return y

  def set_view(self, use_running_average: Optional[bool] = None) -> None:
    """Used by ``nnx.view`` (as ``nnx.BatchNorm.set_view``)."""
    if use_running_average is not None:
      self.use_running_average = use_running_average


def _wrap(tree: Any, kind: type[nnx.Variable]) -> dict:
  """Nested plain dicts with each array leaf wrapped in ``kind``."""
  if hasattr(tree, "items"):
    return {key: _wrap(value, kind) for key, value in tree.items()}
  return kind(tree)


def _assign(variables: dict, values: Any) -> None:
  """Sets each variable of the nested dict ``variables`` to the value at the same key path."""
  for key, node in variables.items():
    if isinstance(node, nnx.Variable):
      node.set_value(jax.lax.stop_gradient(values[key]))
    else:
      _assign(node, values[key])


def _unwrap(tree: Any) -> Any:
  return jax.tree.map(lambda v: v.get_value(), tree, is_leaf=_is_variable)
