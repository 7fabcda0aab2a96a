"""The memory-lean ATAC gate: one op that recomputes the bottleneck in the backward pass.

Plain autodiff of :mod:`atac_jax.ops.reference` keeps ~4 activation-sized intermediates per
unit (bottleneck output, normalised values, gate, ...). :func:`gate` keeps only the unit's input
(which the caller keeps anyway), its parameters, the per-channel statistics and the bottleneck's
small Gram matrix, and recomputes the bottleneck from the input. The backward pass is the exact
BatchNorm/sigmoid chain rule (batch statistics included, also for cotangents flowing into the
returned statistics); gradients and statistics equal the reference's to rounding.

:func:`norm_gate` makes a preceding training-mode BatchNorm part of the same op: in a
pre-activation network the BatchNorm's output is the gate's input, and composing the two would
keep both the BatchNorm's input (for its gradient) and its output (the gate's residual). Here the
output is recomputed from the input, so a BatchNorm -> ATAC pair keeps what BatchNorm -> ReLU keeps.

Each op is a ``jax.custom_jvp`` whose tangent is a :func:`~atac_jax.ops.linear_map.linear_map`:
forward mode (``jvp``, ``jacfwd``, ``linearize``) evaluates the JVP of :func:`forward`; reverse
mode keeps only the residuals above and transposes the map with :func:`backward`; ``vmap`` and
higher-order derivatives work too. :func:`forward` and :func:`backward` are importable and
testable alone.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from atac_jax.ops import batch_norm, dispatch, policy, reductions, types
from atac_jax.ops.linear_map import linear_map
from atac_jax.ops.reductions import acc_dtype, colsum, pointwise, tdot
from atac_jax.ops.types import Affine, GateParams, GateStats, Moments, Projection, cast_like


@dataclasses.dataclass(frozen=True)
class Config:
  """Static options of the gate (hashable: a ``nondiff_argnums`` argument).

  ``choice``: how the backward pass runs, resolved when the op is traced for every platform
  (:func:`atac_jax.ops.dispatch.choose`); the backward pass, traced when the program is
  lowered, takes its platform's entry (:attr:`resolved`). None is the XLA backward with the
  ``"barrier"`` tie.
  ``axis_name``: the ``shard_map``/``pmap`` axis (or axes) over which batch statistics are
  global, or None.
  """
  epsilon: float
  inner_relu: bool
  choice: Optional[dispatch.Choice] = None
  axis_name: Any = None

  @property
  def resolved(self) -> Optional[dispatch.Choice]:
    """The choice for the platform the backward pass is traced (lowered) for."""
    return None if self.choice is None else self.choice.here()

  @property
  def kernels(self) -> bool:
    """Whether the training backward runs the Pallas kernels."""
    return self.choice is not None and self.resolved.kernels

  @property
  def tie(self) -> str:
    """How the backward pass's recomputation waits for the cotangent (:func:`_tie`)."""
    return "barrier" if self.choice is None else self.resolved.tie


class Gram(NamedTuple):
  """Column sums and Gram matrix ``a^T a`` of the bottleneck activation ``a`` (float32)."""
  total: jax.Array
  matrix: jax.Array


class InputNorm(NamedTuple):
  """A training-mode BatchNorm ``p = x * scale + shift`` whose output is the gate's input.

  With ``fold``, ``p`` is never written: ``p @ W = x @ (scale W) + shift @ W``, and
  element-wise uses recompute ``p`` inside their fusions. Without (bfloat16, where the folded
  kernel loses precision: ``docs/ops_decisions.md``), the projection reads ``p`` computed once.
  Either way the BatchNorm's backward joins the gate's last pass (:meth:`backward`).
  ``axis_name``: as :class:`Config`'s (``stats`` are then the whole batch's).
  """
  stats: Moments
  affine: Affine
  epsilon: float
  dtype: Any
  fold: bool
  axis_name: Any = None

  def apply(self, x):
    return batch_norm.normalize(x, self.stats, self.affine, epsilon=self.epsilon,
                                dtype=self.dtype)

  def project(self, x, projection: Projection):
    if not self.fold:
      return _project(self.apply(x), projection, None)
    scale, shift = batch_norm.scale_shift(self.stats, self.affine, self.epsilon)
    k32 = projection.kernel.astype(scale.dtype)
    bias = shift @ k32 + (0.0 if projection.bias is None else projection.bias.astype(scale.dtype))
    # Accumulated and shifted in float32, then rounded once.
    h = pointwise(x.astype(self.dtype), (scale[:, None] * k32).astype(self.dtype),
                  preferred_element_type=acc_dtype(self.dtype))
    return (h + bias).astype(self.dtype)

  def projected_mean(self, projection: Projection) -> jax.Array:
    """The batch mean of ``p @ kernel + bias`` (float32) without a pass over the rows.

    A training-mode BatchNorm's output has batch mean exactly its bias (``sum(x - mean) = 0``),
    so the mean is ``bias_bn @ kernel + bias`` up to rounding, for every input.
    """
    beta = self.affine.bias.astype(acc_dtype(self.dtype))
    k32 = projection.kernel.astype(beta.dtype)
    return beta @ k32 + (0.0 if projection.bias is None else projection.bias.astype(beta.dtype))

  def backward(self, x, dh, sum_dh, kernel, gate_dy, dstats: Optional[Moments]):
    """``(dx, p^T dh, daffine)`` for ``dp = dh kernel^T + gate_dy``, ``dp`` never written.

    ``dx`` is the BatchNorm's input gradient ``scale * dp + c0 + c1 * xc`` (``xc = x - mean``):
    its two row sums come from small products (``sum(dp) = kernel sum(dh) + sum(gate_dy)``,
    ``sum(dp xc) = rowsum(kernel * xc^T dh) + sum(gate_dy xc)``) and ``scale`` folds into the
    transposed kernel, so ``dx`` is one pass after the down-projection's transpose instead of a
    write and two reads of ``dp``. ``p^T dh = scale xc^T dh + bias_bn sum(dh)``.
    ``sum_dh`` is ``sum(dh)`` over the rows (float32); ``dstats`` the cotangents of the
    BatchNorm's batch moments (None where zero).
    """
    f32 = acc_dtype(self.dtype)
    count = x.size // x.shape[-1]
    k32 = kernel.astype(f32)
    xc = x.astype(f32) - self.stats.mean
    # x is already in the compute dtype and sum(dh) vanishes to rounding, so the uncentred
    # product loses nothing; centring x first costs XLA:CPU an activation-sized write.
    xc_dh = tdot(x.astype(self.dtype), dh) - jnp.outer(self.stats.mean, sum_dh)  # (C, K)
    scale, c0, c1, dkernel, daffine = self.gradient_terms(
        k32, xc_dh, sum_dh, colsum(gate_dy), reductions.sum_product(gate_dy, xc), count, dstats)
    dx = (pointwise(dh, (scale[:, None] * k32).T.astype(dh.dtype)).astype(f32)
          + scale * gate_dy + c0 + c1 * xc)
    return dx.astype(x.dtype), dkernel, daffine

  def gradient_terms(self, kernel32, xc_dh, sum_dh, sum_gate_dy, sum_gate_dy_xc, count,
                     dstats: Optional[Moments]):
    """:meth:`backward` from its row sums: ``(scale, c0, c1, dkernel, daffine)``.

    ``dx = scale * dp + c0 + c1 * xc`` for ``dp = dh kernel^T + gate_dy``; ``xc_dh = xc^T dh``,
    ``sum_dh = sum(dh)``, ``sum_gate_dy = sum(gate_dy)``, ``sum_gate_dy_xc = sum(gate_dy xc)``
    (the Pallas backward accumulates the same sums in its kernel).
    """
    rs = lax.rsqrt(self.stats.var + self.epsilon)
    scale = rs * self.affine.scale  # scale_shift's multiplier
    sum_dp = kernel32 @ sum_dh + sum_gate_dy
    sum_dp_xc = jnp.sum(kernel32 * xc_dh, axis=1) + sum_gate_dy_xc
    c0, c1 = batch_norm.input_gradient_terms(scale, rs, sum_dp, sum_dp_xc, count, dstats,
                                             axis_name=self.axis_name)
    dkernel = scale[:, None] * xc_dh + jnp.outer(self.affine.bias.astype(kernel32.dtype), sum_dh)
    daffine = Affine((sum_dp_xc * rs).astype(self.affine.scale.dtype),
                     sum_dp.astype(self.affine.bias.dtype))
    return scale, c0, c1, dkernel, daffine


def _project(x, projection: Projection, norm: Optional[InputNorm]):
  if norm is not None:
    return norm.project(x, projection)
  y = pointwise(x.astype(projection.kernel.dtype), projection.kernel)
  return y if projection.bias is None else y + projection.bias


class Intermediates(NamedTuple):
  """The bottleneck recomputed from the input (for the backward pass)."""
  h: jax.Array  # down-projection
  a: jax.Array  # bottleneck activation
  z: jax.Array  # gate logits


def forward(x: jax.Array, params: GateParams, stats: Optional[GateStats], cfg: Config, *,
            norm: Optional[InputNorm] = None, intermediates: bool = False):
  """The gate: ``(y, batch GateStats or None, Gram or None)`` (or :class:`Intermediates`).

  Batch statistics are ``nn.BatchNorm``'s (mean and biased variance). The down BatchNorm's
  variance is centred (two passes over ``h``; with input offsets ``E[h^2] - E[h]^2`` cancels,
  gradients 5x further from float64 than nn.BatchNorm's at an offset of 100); after a fused
  BatchNorm its mean needs no pass (:meth:`InputNorm.projected_mean`), so the variance joins
  the projection's pass. The up BatchNorm's moments come from the bottleneck's :class:`Gram`
  (``mean_u = mean_a Wu + bu``, ``var_u = diag(Wu^T cov_a Wu)``) instead of another pass over
  the ``C``-wide output. With ``norm``, ``x`` is a BatchNorm's input and the gate's input is
  ``norm.apply(x)``. With ``cfg.axis_name`` the statistics are the whole batch's (sums
  ``psum``-ed over the axis) and the returned :class:`Gram` is this device's.
  """
  p_down, p_up = params.down, params.up
  dtype = p_down.kernel.dtype
  total = functools.partial(batch_norm.whole_batch, axis_name=cfg.axis_name)
  count = batch_norm.global_count(x.size // x.shape[-1], cfg.axis_name)
  h = _project(x, p_down, norm)
  if stats is None:
    m1 = total(colsum(h)) / count if norm is None else norm.projected_mean(p_down)
    hc = h.astype(acc_dtype(dtype)) - m1
    v1 = total(colsum(jnp.square(hc))) / count
    down = Moments(m1, v1)
  else:
    down = stats.down
  a = batch_norm.normalize(h, down, params.norm_down, epsilon=cfg.epsilon, dtype=dtype)
  if cfg.inner_relu:
    a = jax.nn.relu(a)
  u = _project(a, p_up, None)
  gram = None
  if stats is None:
    gram = Gram(*reductions.gram(a))  # this device's: its parameter gradients' part
    whole = total(gram)
    mean_a = whole.total / count
    cov_a = whole.matrix / count - jnp.outer(mean_a, mean_a)
    ku = p_up.kernel.astype(cov_a.dtype)
    m2 = mean_a @ ku + (0.0 if p_up.bias is None else p_up.bias.astype(cov_a.dtype))
    up = Moments(m2, jnp.maximum(0.0, jnp.sum(ku * (cov_a @ ku), axis=0)))
  else:
    up = stats.up
  z = batch_norm.normalize(u, up, params.norm_up, epsilon=cfg.epsilon, dtype=dtype)
  if intermediates:
    return Intermediates(h, a, z)
  xin = x if norm is None else norm.apply(x)
  y = xin * jax.nn.sigmoid(z).astype(xin.dtype)
  return y, (GateStats(down, up) if stats is None else None), gram


def backward(x: jax.Array, params: GateParams, stats: GateStats, gram: Optional[Gram],
             dy: jax.Array, dstats: Optional[GateStats], cfg: Config, *, batch_stats: bool,
             norm: Optional[InputNorm] = None, norm_dstats: Optional[Moments] = None,
             input_mean: Optional[jax.Array] = None):
  """Cotangents ``(dx, dparams, dstats_in or None)``, recomputing the bottleneck from ``x``.

  With ``norm``: ``(dx, dparams, daffine)``, ``dx`` and ``daffine`` the BatchNorm's input and
  affine gradients (:meth:`InputNorm.backward`).

  Args:
    x: the input (with ``norm``: the BatchNorm's input).
    params: the parameters.
    stats: the statistics the forward pass used (batch moments when ``batch_stats``).
    gram: the forward pass's :class:`Gram` (``batch_stats`` only).
    dy: the output cotangent.
    dstats: cotangents of the returned batch moments (None, or None fields, where zero).
    cfg: static options.
    batch_stats: whether the forward pass normalised with batch moments (training).
    norm: a :class:`InputNorm` (see :func:`forward`); training mode only.
    norm_dstats: with ``norm``, cotangents of its batch moments (None where zero).
    input_mean: without ``norm``, the mean of ``x`` over the rows (float32), or None to take
      it here; the down kernel's gradient is taken from ``x`` centred on it.

  Three stages, each a function: the up BatchNorm and projection (:func:`_up_backward`), the
  down BatchNorm (:func:`_down_backward`), the down-projection and the input
  (:func:`_input_backward`). Each BatchNorm's multiplier ``rsqrt(var + eps) * gamma`` is its
  ``scale``; ``a`` is only the bottleneck activation.
  """
  dtype, f32 = params.down.kernel.dtype, acc_dtype(params.down.kernel.dtype)
  h, a, z = forward(x, params, stats, cfg, norm=norm, intermediates=True)
  xin = x if norm is None else norm.apply(x)
  count = x.size // x.shape[-1]
  cast = lambda v: None if v is None else v.astype(f32)
  up_kernel32, up_bias32 = cast(params.up.kernel), cast(params.up.bias)
  dy32 = dy.astype(f32)
  z32 = z.astype(f32)
  sig = jax.nn.sigmoid(z32).astype(xin.dtype).astype(f32)  # accurate in both tails
  dsig = sig * (1 - sig)
  dz = dy32 * xin.astype(f32) * dsig  # (..., C)
  ddown, dup = (None, None) if dstats is None else dstats
  up = _up_backward(a, dz, up_kernel32, up_bias32, params.norm_up, stats.up, gram, dup, cfg,
                    batch_stats=batch_stats, dtype=dtype, count=count)
  down = _down_backward(up.da, h, params.norm_down, stats.down, ddown, cfg,
                        batch_stats=batch_stats, count=count, f32=f32)
  dh = down.dh.astype(dtype)  # (..., K)
  dbd = None if params.down.bias is None else down.sum_dh
  # dy * sigmoid(z) written as a division: XLA does not duplicate divisions into several
  # consumers, so dx is written once instead of being re-derived inside each consumer.
  gate_dy = dy32 / (1.0 + jnp.exp(-z32))  # (..., C)
  dx, dkd, daffine = _input_backward(x, xin, dh, down.sum_dh, gate_dy, params.down.kernel,
                                     count, norm=norm, norm_dstats=norm_dstats,
                                     input_mean=input_mean)
  dparams = cast_like(GateParams(Projection(dkd, dbd), down.daffine,
                                 Projection(up.dkernel, up.dbias), up.daffine), params)
  if norm is not None:
    return dx, dparams, daffine
  if batch_stats:
    return dx, dparams, None
  return dx, dparams, cast_like(GateStats(down.dstats_in, up.dstats_in), stats)


class _UpBackward(NamedTuple):
  """The up BatchNorm's and projection's backward (:func:`_up_backward`)."""
  da: jax.Array  # (..., K) the bottleneck activation's gradient (masked by its ReLU)
  dkernel: jax.Array
  dbias: Optional[jax.Array]
  daffine: Affine
  dstats_in: Optional[Moments]  # with running statistics: their cotangents


def _up_backward(a, dz, kernel32, bias32, affine: Affine, moments: Moments, gram: Optional[Gram],
                 dmoments: Optional[Moments], cfg: Config, *, batch_stats: bool, dtype,
                 count: int) -> _UpBackward:
  """``z = (u - mean) * scale + beta``, ``u = a @ Wu + bu``: from ``dz`` to ``da``.

  The BatchNorm sums over rows are products with the bottleneck (``a^T dz`` also gives the
  projection's weight gradient), so the ``C``-wide ``du`` is never materialised:
  ``da = dz (scale Wu)^T + a (Wu diag(c1) Wu^T) + (c0 + c1 shift) Wu^T``.
  """
  f32 = kernel32.dtype
  rs = lax.rsqrt(moments.var + cfg.epsilon)
  scale = rs * affine.scale
  shift = -moments.mean if bias32 is None else bias32 - moments.mean  # u - mean = a Wu + shift
  sum_dz = colsum(dz)
  if dtype != f32 and policy.choice("materialize_dz"):
    # Written once in the compute dtype (what the MXU reads anyway) for the two products.
    dz = lax.optimization_barrier(dz.astype(dtype))
  a_dz = tdot(a, dz)  # (K, C): a^T dz
  sum_dz_uc = jnp.sum(kernel32 * a_dz, axis=0) + shift * sum_dz  # sum(dz (u - mean))
  dscale, dbeta = sum_dz_uc * rs, sum_dz
  if batch_stats:  # du = scale * dz + c0 + c1 * (u - mean)
    c0, c1, dkernel, dbias = batch_norm.projection_gradients(
        gram.total, gram.matrix, kernel32, shift, scale, rs, sum_dz, sum_dz_uc, a_dz, count,
        dmoments, bias=bias32 is not None, axis_name=cfg.axis_name)
    da = (reductions.pointwise_sum((dz, (scale * kernel32).T),
                                   (a, (kernel32 * c1) @ kernel32.T))
          + (c0 + c1 * shift) @ kernel32.T)
    dstats_in = None
  else:  # du = scale * dz
    dkernel = scale * a_dz
    dbias = None if bias32 is None else scale * sum_dz
    da = pointwise(dz, (scale * kernel32).T)
    dstats_in = Moments(-scale * sum_dz, -0.5 * affine.scale * rs**3 * sum_dz_uc)
  if cfg.inner_relu:
    da = jnp.where(a > 0, da, 0.0)  # a > 0 exactly where the pre-activation is
  return _UpBackward(da, dkernel, dbias, Affine(dscale, dbeta), dstats_in)


class _DownBackward(NamedTuple):
  """The down BatchNorm's backward (:func:`_down_backward`)."""
  dh: jax.Array  # (..., K) float32
  sum_dh: jax.Array  # (K,)
  daffine: Affine
  dstats_in: Optional[Moments]


def _down_backward(da, h, affine: Affine, moments: Moments, dmoments: Optional[Moments],
                   cfg: Config, *, batch_stats: bool, count: int, f32) -> _DownBackward:
  """``a = relu((h - mean) * scale + beta)``: from ``da`` (masked) to ``dh``.

  Sums against ``h`` are centred (``sum(da (h - mean))``), so input offsets do not cancel.
  """
  rs = lax.rsqrt(moments.var + cfg.epsilon)
  scale = rs * affine.scale
  hc = h.astype(f32) - moments.mean  # (..., K)
  sum_da = colsum(da)
  sum_da_hc = reductions.sum_product(da, hc)
  dscale, dbeta = sum_da_hc * rs, sum_da
  # sum(dh) from per-channel sums, so dh need not be written for a reduction of its own: the
  # products with it (dx, the kernel gradient) recompute it inside their fusions.
  if batch_stats:
    e0, e1 = batch_norm.input_gradient_terms(scale, rs, sum_da, sum_da_hc, count, dmoments,
                                             axis_name=cfg.axis_name)
    dh = scale * da + e0 + e1 * hc
    sum_dh = scale * sum_da + count * e0 + e1 * colsum(hc)
    dstats_in = None
  else:
    dh = scale * da
    sum_dh = scale * sum_da
    dstats_in = Moments(-scale * sum_da, -0.5 * affine.scale * rs**3 * sum_da_hc)
  return _DownBackward(dh, sum_dh, Affine(dscale, dbeta), dstats_in)


def _input_backward(x, xin, dh, sum_dh, gate_dy, kernel, count: int, *,
                    norm: Optional[InputNorm], norm_dstats: Optional[Moments],
                    input_mean: Optional[jax.Array]):
  """``y = xin * sigmoid(z)``, ``h = xin @ Wd + bd``: ``(dx, dWd, daffine of norm or None)``."""
  if norm is not None:
    return norm.backward(x, dh, sum_dh, kernel, gate_dy, norm_dstats)
  f32 = gate_dy.dtype
  # centred: sum(dh) vanishes only to rounding, so an input offset would not
  mean_x = colsum(x) / count if input_mean is None else input_mean
  dkd = tdot((x.astype(f32) - mean_x).astype(dh.dtype), dh) + jnp.outer(mean_x, sum_dh)
  dx = (pointwise(dh, kernel.T).astype(f32) + gate_dy).astype(xin.dtype)
  return dx, dkd, None


def _train_backward(x, params, stats, gram, dy, dstats, cfg: Config, *, kernels: bool,
                    norm=None, norm_dstats=None, input_mean=None):
  """:func:`backward` with batch statistics; through the Pallas kernels with ``kernels``
  (``cfg.kernels``).

  The kernels' result is differentiated as the XLA backward's (same values; a ``pallas_call``
  has no derivative rule), so grad-of-grad and ``jvp`` of ``grad`` work either way.
  """
  def with_norm(moments, affine):  # norm's arrays as arguments, its static fields kept
    return None if norm is None else norm._replace(stats=moments, affine=affine)

  def xla(x, params, stats, gram, dy, dstats, norm_moments, norm_affine, norm_dstats,
          input_mean):
    kwargs = ({"input_mean": input_mean} if norm is None else
              {"norm": with_norm(norm_moments, norm_affine), "norm_dstats": norm_dstats})
    return backward(x, params, stats, gram, dy, dstats, cfg, batch_stats=True, **kwargs)

  args = (x, params, stats, gram, dy, dstats, None if norm is None else norm.stats,
          None if norm is None else norm.affine, norm_dstats, input_mean)
  if not kernels:
    return xla(*args)

  @jax.custom_jvp
  def pallas(x, params, stats, gram, dy, dstats, norm_moments, norm_affine, norm_dstats,
             input_mean):
    del input_mean  # the kernels take the sums they need in their own passes
    choice = cfg.resolved
    return dispatch.kernels_for(choice.platform).backward(
        x, params, stats, gram, dy, dstats, epsilon=cfg.epsilon,
        norm=with_norm(norm_moments, norm_affine), norm_dstats=norm_dstats,
        interpret=choice.interpret, parallel=choice.split.parallel, axis_name=cfg.axis_name)

  pallas.defjvp(lambda primals, tangents: jax.jvp(xla, primals, tangents))
  return pallas(*args)


def _tie(x, small, dy, *, mode: str, with_input: bool = False, centre=None):
  """``(x, small, centre)``, made to depend on the cotangent ``dy`` so the recomputation runs late.

  The backward pass recomputes the bottleneck from ``x`` and the (small) parameters ``small``;
  without a dependency on ``dy`` XLA may merge it with the forward pass (CSE) or schedule it
  early, either of which keeps the bottleneck alive from the forward to the backward pass.
  ``mode`` (``cfg.tie``, from :func:`atac_jax.ops.dispatch.choose` and policy ``'tie'``):

  * ``"barrier"``: an optimisation barrier over the parameters and ``dy`` (no extra memory
    traffic).
  * ``"scalar"`` (XLA:CPU, which drops barriers): an exact zero from one element of ``dy``
    (``reductions.opaque_zero``) added to ``small`` and ``centre``; nothing activation-sized is
    written, but on a batch split over devices the element would be broadcast by a collective,
    so it is chosen only where the batch lies on one device.
  * ``"zeros"``: exact zeros derived element-wise from ``dy`` (``reductions.opaque_zero_like``)
    added to ``x``; no collective.

  ``centre``: small arrays derived from ``x`` alone (its batch mean) that the backward pass
  subtracts from ``x`` before a product; under ``"scalar"`` they are tied too, else XLA:CPU
  computes the centred input early and keeps it until the backward pass. The other modes return
  it unchanged.

  ``with_input`` puts ``x`` under the barrier too (where the Pallas kernels run), so they read
  the buffer the forward pass wrote instead of a copy XLA:TPU derives afresh from ``x``'s
  producers (``docs/ops_decisions.md``); the XLA backward compiles to the same bytes either way.
  """
  if mode == "barrier":
    if with_input:
      (x, small), _ = jax.lax.optimization_barrier(((x, small), dy))
      return x, small, centre
    small, _ = jax.lax.optimization_barrier((small, dy))
    return x, small, centre
  if mode == "scalar":
    zero = reductions.opaque_zero(dy)
    small, centre = jax.tree.map(lambda a: a + zero.astype(a.dtype), (small, centre))
    return x, small, centre
  return x + reductions.opaque_zero_like(dy).astype(x.dtype), small, centre


def _lean_jvp(run, backward_fn, primals, tangents):
  """A custom-JVP rule: primal ``run(*primals)``, tangent through a :func:`linear_map`.

  ``run(*primals) -> (outputs, extra residuals)``. The tangent map is the JVP of ``run``'s
  outputs (forward mode recomputes the op); its transpose is ``backward_fn(primals, extra,
  outputs, cotangents)`` (reverse mode keeps only the primals, the small extra residuals and
  the outputs' statistics).
  """
  out, extra = run(*primals)
  residuals = (primals, extra, out[1:])

  def tangent_map(res, lin):
    return jax.jvp(lambda *p: run(*p)[0], res[0], lin)[1]

  def cotangent_map(res, ct):
    primals, extra, stats = res
    return backward_fn(primals, extra, stats, ct)

  return out, linear_map(tangent_map, cotangent_map, residuals, tuple(tangents))


def _whole_batch_cotangents(ct: Any, x: jax.Array, axis_name: Any) -> Any:
  """Cotangents of the whole batch's statistics (``axis_name``) summed over the devices.

  Each device's loss adds its own cotangent to statistics every device shares; their gradient
  is the sum (the reference op's ``psum`` transposes to one). A ``shard_map`` that checks varying
  axes has summed them already, in the transpose of the cast JAX inserts where the invariant
  statistics meet a device's values; the input is then typed as varying.
  """
  if ct is None or types.varying_axes(x):
    return ct
  return batch_norm.whole_batch(ct, axis_name)


def _input_mean(x, cfg: Config) -> Optional[jax.Array]:
  """The batch mean of an unnormalised gate's input for its backward pass, taken before the
  tie where the tie leaves ``x`` as it is (``"scalar"``), else None (taken in :func:`backward`
  from the tied input)."""
  return colsum(x) / (x.size // x.shape[-1]) if cfg.tie == "scalar" else None


# ----- gate(x, params, stats=None) -----

def _train_gate_run(cfg, x, params):
  y, batch, gram = forward(x, params, None, cfg)
  return (y, batch), gram


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _train_gate(cfg, x, params):
  return _train_gate_run(cfg, x, params)[0]


@_train_gate.defjvp
def _train_gate_jvp(cfg, primals, tangents):
  def backward_fn(primals, gram, stats, ct):
    (x, params), (batch,) = primals, stats
    dy, dstats = ct
    dstats = _whole_batch_cotangents(dstats, x, cfg.axis_name)
    kernels = cfg.kernels
    mean = _input_mean(x, cfg)
    x, params, mean = _tie(x, params, dy, mode=cfg.tie, with_input=kernels, centre=mean)
    dx, dparams, _ = _train_backward(x, params, batch, gram, dy, dstats, cfg, kernels=kernels,
                                     input_mean=mean)
    return dx, dparams
  return _lean_jvp(functools.partial(_train_gate_run, cfg), backward_fn, primals, tangents)


def _eval_gate_run(cfg, x, params, stats):
  return (forward(x, params, stats, cfg)[0],), None


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _eval_gate(cfg, x, params, stats):
  return _eval_gate_run(cfg, x, params, stats)[0][0]


@_eval_gate.defjvp
def _eval_gate_jvp(cfg, primals, tangents):
  def backward_fn(primals, _, __, ct):
    x, params, stats = primals
    (dy,) = ct
    mean = _input_mean(x, cfg)
    x, params, mean = _tie(x, params, dy, mode=cfg.tie, centre=mean)
    return backward(x, params, stats, None, dy, None, cfg, batch_stats=False, input_mean=mean)
  out, tangent = _lean_jvp(functools.partial(_eval_gate_run, cfg), backward_fn, primals,
                           tangents)
  return out[0], tangent[0]


def _lean_choice(kernel: str, x, params, inner_relu: bool, axis_name: Any) -> dispatch.Choice:
  """How the lean op's backward runs for a direct caller asking for ``kernel``."""
  return dispatch.choose(dispatch.Request("lean", kernel), train=True, axis_name=axis_name, x=x,
                         params=params, inner_relu=inner_relu)


def _hashable(axis_name: Any) -> Any:
  """``axis_name`` as a static option (a list of axes becomes a tuple)."""
  return tuple(axis_name) if isinstance(axis_name, list) else axis_name


def gate(x: jax.Array, params: GateParams, stats: Optional[GateStats] = None, *,
         epsilon: float, inner_relu: bool, kernel: str = "xla", axis_name: Any = None):
  """The gate with the lean backward; same signature and results as ``reference.gate``.

  ``kernel``: the training backward asked for, ``"xla"``, ``"pallas"`` or ``"auto"``
  (:func:`atac_jax.ops.dispatch.choose`, rows 8-13). ``axis_name``: a ``shard_map``/``pmap``
  axis over which batch statistics are global (as the reference op's).

  Returns:
    With ``stats``: ``y``. Without: ``(y, GateStats)``, the float32 batch moments.
  """
  return gate_op(x, params, stats, epsilon=epsilon, inner_relu=inner_relu,
                 choice=_lean_choice(kernel, x, params, inner_relu, axis_name),
                 axis_name=axis_name)


def gate_op(x: jax.Array, params: GateParams, stats: Optional[GateStats] = None, *,
            epsilon: float, inner_relu: bool, choice: dispatch.Choice, axis_name: Any = None):
  """:func:`gate` with its backward already chosen (what :func:`atac_jax.ops.gate` calls)."""
  cfg = Config(float(epsilon), bool(inner_relu), choice, _hashable(axis_name))
  if stats is None:
    return _train_gate(cfg, x, params)
  return _eval_gate(cfg, x, params, stats)


# ----- norm_gate(x, norm, params) -----

@dataclasses.dataclass(frozen=True)
class NormConfig:
  """Static options of :func:`norm_gate`."""
  gate: Config
  norm_epsilon: float
  dtype: Any
  fold: bool


def _norm_gate_run(cfg: NormConfig, x, norm_affine, params):
  moments = batch_norm.moments(x, axis_name=cfg.gate.axis_name)
  norm = InputNorm(moments, norm_affine, cfg.norm_epsilon, cfg.dtype, cfg.fold,
                   cfg.gate.axis_name)
  y, batch, gram = forward(x, params, None, cfg.gate, norm=norm)
  return (y, moments, batch), gram


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _norm_gate(cfg, x, norm_affine, params):
  return _norm_gate_run(cfg, x, norm_affine, params)[0]


@_norm_gate.defjvp
def _norm_gate_jvp(cfg, primals, tangents):
  def backward_fn(primals, gram, stats, ct):
    (x, norm_affine, params), (moments, batch) = primals, stats
    dy, dmoments, dbatch = ct
    dmoments, dbatch = _whole_batch_cotangents((dmoments, dbatch), x, cfg.gate.axis_name)
    kernels = cfg.gate.kernels
    x_tied, (norm_tied, params), moments = _tie(x, (norm_affine, params), dy, mode=cfg.gate.tie,
                                                with_input=kernels, centre=moments)
    norm = InputNorm(moments, norm_tied, cfg.norm_epsilon, cfg.dtype, cfg.fold,
                     cfg.gate.axis_name)
    dx, dparams, daffine = _train_backward(x_tied, params, batch, gram, dy, dbatch, cfg.gate,
                                           kernels=kernels, norm=norm, norm_dstats=dmoments)
    return dx, daffine, dparams
  return _lean_jvp(functools.partial(_norm_gate_run, cfg), backward_fn, primals, tangents)


def norm_gate(x: jax.Array, norm: Affine, params: GateParams, *, norm_epsilon: float,
              epsilon: float, inner_relu: bool, dtype: Any, kernel: str = "xla",
              axis_name: Any = None) -> tuple[jax.Array, Moments, GateStats]:
  """``gate(BN(x))`` in training mode as one op whose backward pass keeps only ``x``.

  Same signature and results as ``reference.norm_gate``. Whether the BatchNorm folds into the
  down-projection follows :func:`atac_jax.ops.policy.choice` ``'fold_norm'``, in float32 only.
  ``kernel``, ``axis_name``: as :func:`gate`'s.
  """
  return norm_gate_op(x, norm, params, norm_epsilon=norm_epsilon, epsilon=epsilon,
                      inner_relu=inner_relu, dtype=dtype,
                      choice=_lean_choice(kernel, x, params, inner_relu, axis_name),
                      axis_name=axis_name)


def norm_gate_op(x: jax.Array, norm: Affine, params: GateParams, *, norm_epsilon: float,
                 epsilon: float, inner_relu: bool, dtype: Any, choice: dispatch.Choice,
                 axis_name: Any = None) -> tuple[jax.Array, Moments, GateStats]:
  """:func:`norm_gate` with its backward already chosen (what :func:`atac_jax.ops.norm_gate`
  calls)."""
  fold = bool(policy.choice("fold_norm")) and jnp.dtype(dtype).itemsize >= 4
  cfg = NormConfig(Config(float(epsilon), bool(inner_relu), choice, _hashable(axis_name)),
                   float(norm_epsilon),
                   jnp.dtype(dtype), fold)
  return _norm_gate(cfg, x, norm, params)
