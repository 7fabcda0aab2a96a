"""Typed containers for the gate's parameters and statistics (pytrees: NamedTuples)."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
from jax import lax

Array = jax.Array


class Projection(NamedTuple):
  """A point-wise (1x1) projection ``x @ kernel + bias`` over the channel axis.

  Attributes:
    kernel: ``(in, out)`` (a linen 1x1 conv kernel is ``kernel[0, 0]``).
    bias: ``(out,)`` or None.
  """
  kernel: Array
  bias: Optional[Array] = None


class Affine(NamedTuple):
  """A BatchNorm's learned per-channel ``scale`` and ``bias``."""
  scale: Array
  bias: Array


class Moments(NamedTuple):
  """Per-channel ``mean`` and biased ``var`` (BatchNorm statistics, float32)."""
  mean: Array
  var: Array


class GateParams(NamedTuple):
  """The parameters of an ATAC gate ``sigmoid(BN_up(up(relu(BN_down(down(x))))))``.

  Projection kernels and biases in the compute dtype; BatchNorm affines in the parameter dtype.
  """
  down: Projection
  norm_down: Affine
  up: Projection
  norm_up: Affine


class GateStats(NamedTuple):
  """The two BatchNorms' statistics of a gate: running averages (inference) or batch moments."""
  down: Moments
  up: Moments


def cast_like(grads, like):
  """``grads`` cast leaf by leaf to the dtypes of ``like`` (same pytree; None where it has None)."""
  return jax.tree.map(lambda g, p: g.astype(p.dtype), grads, like)


def varying_axes(a: Any) -> frozenset:
  """The manual mesh axes ``a`` is typed as varying over: inside a ``jax.shard_map`` that checks
  them (``check_vma=True``), a device's shard; empty elsewhere."""
  manual = getattr(jax.typeof(a), "manual_axis_type", None)
  return frozenset(getattr(manual, "varying", None) or ())


def varying_like(x: jax.Array, tree: Any) -> Any:
  """``tree``'s arrays cast to varying over the axes ``x`` varies over (:func:`varying_axes`):
  what JAX does to a primitive's invariant operands where they meet a varying one, done by
  hand for a ``pallas_call``'s operands."""
  varying = varying_axes(x)
  if not varying:
    return tree

  def cast(leaf):
    missing = tuple(sorted(varying - varying_axes(leaf)))
    return lax.pcast(leaf, missing, to="varying") if missing else leaf

  return jax.tree.map(cast, tree)
