"""``linear_map``: a linear function with a hand-written transpose, under every transformation.

An op whose forward-mode tangent is ``T(r) t`` (linear in the tangent ``t``, with residuals
``r``) and whose reverse mode should run a hand-written ``T(r)^T c`` (e.g. one that recomputes
intermediates instead of storing them) is a ``jax.custom_jvp`` whose rule returns
``linear_map(T, T^T, r, t)``:

* ``jax.jvp`` / ``jacfwd`` / ``linearize`` evaluate ``T``;
* ``jax.grad`` / ``vjp`` partially evaluate the rule -- only ``r`` is kept for the backward pass
  -- and transpose the map by evaluating ``T^T``;
* ``vmap`` maps both functions (the map stays one op, so ``vmap(grad)`` is still lean);
* differentiating through the map with respect to ``r`` (grad-of-grad, ``jvp(grad)``)
  differentiates the plain JAX function ``T`` or ``T^T``;
* under ``jit`` the functions are traced when the program is lowered, once per platform it is
  lowered for, under that platform's choices (:mod:`atac_jax.ops.policy`).

``jax.custom_derivatives.linear_call`` does the first two only (no batching rule, and no
derivative with respect to its residuals), hence this small primitive.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from atac_jax.ops import policy
from atac_jax.ops.types import varying_axes

linear_map_p = Primitive("atac_linear_map")
linear_map_p.multiple_results = True


def linear_map(forward: Callable[[Any, Any], Any], transpose: Callable[[Any, Any], Any],
               residuals: Any, tangents: Any) -> Any:
  """``forward(residuals, tangents)``, linear in ``tangents``, with transpose ``transpose``.

  Args:
    forward: ``(residuals, tangents) -> outputs``, linear in ``tangents``.
    transpose: ``(residuals, output cotangents) -> tangent cotangents`` (the structure of
      ``tangents``; None leaves allowed where ``tangents`` has None).
    residuals: pytree of arrays the two functions are non-linear in.
    tangents: pytree of arrays.

  Returns:
    ``forward(residuals, tangents)``.
  """
  res_flat, res_tree = jax.tree.flatten(residuals)
  lin_flat, lin_tree = jax.tree.flatten(tangents)
  out_tree = jax.tree.structure(jax.eval_shape(forward, residuals, tangents))
  n_res = len(res_flat)

  def flat_forward(*args):
    res = jax.tree.unflatten(res_tree, args[:n_res])
    return jax.tree.leaves(forward(res, jax.tree.unflatten(lin_tree, args[n_res:])))

  def flat_transpose(*args):
    res = jax.tree.unflatten(res_tree, args[:n_res])
    cts = transpose(res, jax.tree.unflatten(out_tree, args[n_res:]))
    lin = jax.tree.unflatten(lin_tree, lin_flat)
    zeros = lambda ct, t: ct if ct is not None or t is None else jnp.zeros(t.shape, t.dtype)
    filled = jax.tree.map(zeros, cts, lin, is_leaf=lambda v: v is None)
    return [_summed_like(ct, t) for ct, t in zip(jax.tree.leaves(filled), lin_flat)]

  out = linear_map_p.bind(*res_flat, *lin_flat, fn=flat_forward, transpose=flat_transpose,
                          n_res=n_res)
  return jax.tree.unflatten(out_tree, out)


def _summed_like(ct, tangent):
  """A cotangent that varies over axes its input does not (a parameter shared by the devices,
  a gradient from this device's rows) summed over them: what the transpose of the cast JAX
  inserts where an invariant operand meets a varying one does."""
  extra = varying_axes(ct) - varying_axes(tangent)
  return jax.lax.psum(ct, tuple(sorted(extra))) if extra else ct


def _impl(*args, fn, transpose, n_res):
  del transpose, n_res
  return fn(*args)


def _abstract_eval(*avals, fn, transpose, n_res):
  del transpose, n_res
  # Traced on the avals themselves, so the outputs keep their sharding and varying axes
  # (explicit sharding, shard_map) as well as shape and dtype.
  return jax.make_jaxpr(fn)(*avals).out_avals


def _jvp(primals: Sequence[Any], tangents: Sequence[Any], *, fn, transpose, n_res):
  out = linear_map_p.bind(*primals, fn=fn, transpose=transpose, n_res=n_res)
  res, lin = list(primals[:n_res]), list(primals[n_res:])
  dres, dlin = tangents[:n_res], tangents[n_res:]
  total = None
  if any(type(t) is not ad.Zero for t in dlin):
    dlin = [ad.instantiate_zeros(t) for t in dlin]
    total = linear_map_p.bind(*res, *dlin, fn=fn, transpose=transpose, n_res=n_res)
  if any(type(t) is not ad.Zero for t in dres):
    dres = [ad.instantiate_zeros(t) for t in dres]
    _, through_res = jax.jvp(lambda *r: fn(*r, *lin), res, dres)
    total = through_res if total is None else [a + b for a, b in zip(total, through_res)]
  if total is None:
    total = [ad.Zero.from_primal_value(o) for o in out]
  return out, total


def _transpose(cts, *args, fn, transpose, n_res):
  res, lin = args[:n_res], args[n_res:]
  if any(ad.is_undefined_primal(r) for r in res):
    raise ValueError("atac_linear_map is not linear in its residuals.")
  cts = [ad.instantiate_zeros(ct) for ct in cts]
  out = linear_map_p.bind(*res, *cts, fn=transpose, transpose=fn, n_res=n_res)
  return [None] * n_res + [ct if ad.is_undefined_primal(t) else None for t, ct in zip(lin, out)]


def _batch(args, dims, *, fn, transpose, n_res):
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  res = [a if d is None else jnp.moveaxis(a, d, 0)
         for a, d in zip(args[:n_res], dims[:n_res])]
  res_axes = [None if d is None else 0 for d in dims[:n_res]]
  # Linear inputs are all batched, so the transpose's outputs (batched) match them.
  lin = [jnp.broadcast_to(a, (size, *a.shape)) if d is None
         else jnp.moveaxis(a, d, 0) for a, d in zip(args[n_res:], dims[n_res:])]
  axes = (*res_axes, *[0] * len(lin))
  batched_fn = lambda *a: jax.vmap(fn, in_axes=axes)(*a)
  out_count = len(_abstract_eval(*[jax.core.ShapedArray(a.shape[1:] if ax == 0 else a.shape,
                                                         a.dtype)
                                   for a, ax in zip((*res, *lin), axes)],
                                 fn=fn, transpose=transpose, n_res=n_res))
  batched_t = lambda *a: jax.vmap(transpose, in_axes=(*res_axes, *[0] * out_count))(*a)
  out = linear_map_p.bind(*res, *lin, fn=batched_fn, transpose=batched_t, n_res=n_res)
  return out, [0] * len(out)


linear_map_p.def_impl(_impl)
linear_map_p.def_abstract_eval(_abstract_eval)
ad.primitive_jvps[linear_map_p] = _jvp
ad.primitive_transposes[linear_map_p] = _transpose
batching.primitive_batchers[linear_map_p] = _batch
def _lowering_for(backend: str):
  """The lowering rule for JAX platform ``backend``: the functions are traced here, under the
  ops' choices for ``backend`` (:func:`atac_jax.ops.policy.lowering_for`), so an AOT compile
  and each platform of a multi-platform export get their own (e.g. the TPU kernels only in the
  TPU lowering)."""
  lowered = mlir.lower_fun(_impl, multiple_results=True)

  def rule(ctx, *args, **params):
    with policy.lowering_for(backend):
      return lowered(ctx, *args, **params)
  return rule


mlir.register_lowering(linear_map_p, mlir.lower_fun(_impl, multiple_results=True))
for _backend in ("cpu", "cuda", "rocm", "tpu"):
  mlir.register_lowering(linear_map_p, _lowering_for(_backend), platform=_backend)
