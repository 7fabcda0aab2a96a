"""Conventions every unit shares: the ``train`` flag and the output dtype (see the package doc)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


def merge_train(attribute: bool | None, argument: bool | None, *, required: bool) -> bool | None:
  """Merges a unit's ``train`` attribute with its call argument (flax's ``nn.merge_param``).

  Args:
    attribute: the constructor attribute ``self.train``.
    argument: the call argument ``train``.
    required: whether the unit's result depends on ``train`` (BatchNorm statistics, dropout). A
      unit whose result does not may be called without it.

  Returns:
    The one value given, or ``None`` when neither is given and ``required`` is false.

  Raises:
    ValueError: (from ``nn.merge_param``) if both are given, or neither while ``required``.
  """
  if not required and attribute is None and argument is None:
    return None
  return nn.merge_param("train", attribute, argument)


def result_dtype(x: Any, param_dtype: Any, dtype: Any) -> Any:
  """Flax's output-dtype rule: ``dtype`` if set, else the promotion of the input and the params.

  The same rule as ``flax.linen.dtypes.canonicalize_dtype(x, params, dtype=dtype)`` (inexact):
  bfloat16 input with float32 parameters computes and returns float32; ``dtype=jnp.bfloat16``
  computes and returns bfloat16 whatever the input.
  """
  if dtype is not None:
    return jnp.dtype(dtype)
  promoted = jnp.result_type(x, param_dtype)
  if not jnp.issubdtype(promoted, jnp.inexact):
    promoted = jnp.promote_types(jnp.float32, promoted)
  return promoted
