"""ATAC: attention as activation (Dai et al., ICPR 2020, arXiv 2007.07729).

``ATAC(x) = x * sigmoid(BN(PWConv_up(relu(BN(PWConv_down(x))))))`` -- a local channel-attention gate
computed point-wise at every pixel, used in place of ReLU. With ``use_global=True`` the input is
global-average-pooled first, which turns the unit into an SE-like channel gate that keeps its BNs.

Memory-lean gradient (``memory_lean=True``, the default for the point-wise gate): the unit is one
``jax.custom_vjp`` (:func:`gate`) whose backward pass keeps only the unit's input, its parameters,
the per-channel batch statistics and a small Gram matrix, and recomputes the bottleneck (two
point-wise matmuls and the gate) from the input. Plain autodiff keeps ~4 activation-sized
intermediates per unit (bottleneck output, normalised values, gate, ...). The backward pass is
the exact BatchNorm/sigmoid chain rule (batch statistics included, also for cotangents flowing
into the returned statistics), written so that XLA:CPU needs few passes over memory: the
BatchNorm sums are matmuls with the bottleneck (or with ones), and the up-projection's input
gradient is never materialised. Gradients and ``batch_stats`` updates equal the plain path's to
float32 rounding (as close to a float64 reference as the plain path is).

Fused BatchNorm (``ATAC(...)(x, train=True, norm=BatchNormVariables(...))``, what the host
networks use for every ``BN -> ATAC`` pair): the unit's input is itself a BatchNorm output, which
a separate ``nn.BatchNorm`` would keep for the gate while keeping its own input for its gradient.
:func:`norm_gate` makes the pair one op that keeps only the BatchNorm's input and recomputes its
output in the backward pass, so a ``BN -> ATAC`` pair keeps what a ``BN -> ReLU`` pair keeps. On a
CIFAR ResNet-20 (batch 128, float32) the ATAC network then needs ~1.04x the XLA scratch memory of
its ReLU twin (unfused lean units: 1.46x, plain autodiff: 2.8x). See the README, Performance.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from atac_jax.layers import _checks
from atac_jax.layers.pointwise import PointwiseConv


class ATAC(nn.Module):
  """Local channel attention gate ``x * sigmoid(bottleneck(x))`` on NHWC input.

  Submodules are named like the reference (MXNet) implementation so weights port 1:1:
  ``conv_down`` (kernel ``(1, 1, C, C // r)``), ``bn_down``, ``conv_up`` (kernel
  ``(1, 1, C // r, C)``), ``bn_up``. ``C // r`` is at least 1.

  Trainable parameters per unit: ``2C^2/r + 2C/r + 2C`` (BN scale and bias included; plus
  ``C/r + C`` with ``use_bias``); BN running statistics add ``2C/r + 2C``.

  Attributes:
    reduction: bottleneck reduction ``r`` (the reference README uses 2).
    use_global: global-average-pool before the bottleneck (one gate per channel, SE-like).
    inner_relu: apply ReLU between the two point-wise convs (the reference's ``useReLU``; on in
      the published commands, off by default in its CIFAR script).
    use_bias: give the point-wise convs biases (the Paddle AlexNet reproduction does).
    momentum: BatchNorm running-average momentum (reference: 0.9).
    epsilon: BatchNorm epsilon (reference: 1e-5).
    dtype: computation dtype (e.g. ``jnp.bfloat16``); ``None`` infers it from the input.
    param_dtype: parameter dtype.
    memory_lean: compute the point-wise gate as one custom-gradient op that recomputes the
      bottleneck in the backward pass instead of storing it (same variables, same values, same
      gradients; less memory and time). ``False`` composes ``PointwiseConv`` and
      ``nn.BatchNorm`` submodules and lets JAX differentiate them. ``use_global`` units (whose
      gate is one value per channel, so there is nothing to save) always take the plain path.
  """
  reduction: int = 2
  use_global: bool = False
  inner_relu: bool = True
  use_bias: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  memory_lean: bool = True

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool,
               norm: BatchNormVariables | None = None) -> jnp.ndarray:
    """Gates ``x`` (NHWC). ``train=True`` uses batch statistics and updates ``batch_stats``.

    Args:
      x: the input, ``(N, H, W, C)``.
      train: batch statistics (and ``batch_stats`` updates) instead of the running averages.
      norm: a preceding BatchNorm, given as its variables (a :class:`BatchNormVariables` the
        caller created where its ``nn.BatchNorm`` would be): the unit computes
        ``ATAC(BN(x))``. A memory-lean unit then fuses the two into one custom-gradient op
        that keeps only ``x`` for the backward pass, not also the BatchNorm's output (see
        :func:`norm_gate`); results, gradients and variables equal those of
        ``ATAC()(nn.BatchNorm()(x))``.
    """
    _checks.check_rank(x, rank=4, layer="ATAC")
    _checks.check_momentum(self.momentum, layer="ATAC")
    _checks.check_positive(self.epsilon, option="epsilon", layer="ATAC")
    channels = x.shape[-1]
    hidden = _checks.bottleneck_width(channels, self.reduction, layer="ATAC")
    if norm is not None and norm.features != channels:
      raise ValueError(f"ATAC: norm has features={norm.features} but the input has {channels} "
                       f"channels; accepted: BatchNormVariables(features=x.shape[-1]).")
    fuse = norm is not None and self.fuses_norm(train=train)
    if norm is not None and not fuse:
      x = norm.normalize(x, train=train)
    if self.dtype is not None:
      x = jnp.asarray(x, self.dtype)
    if self.memory_lean and not self.use_global:
      return self._lean(x, hidden, train=train, norm=norm if fuse else None)

    def batch_norm(name: str) -> nn.BatchNorm:
      return nn.BatchNorm(use_running_average=not train, momentum=self.momentum,
                          epsilon=self.epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                          name=name)

    h = jnp.mean(x, axis=(1, 2), keepdims=True) if self.use_global else x
    h = PointwiseConv(hidden, use_bias=self.use_bias, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="conv_down")(h)
    h = batch_norm("bn_down")(h)
    if self.inner_relu:
      h = nn.relu(h)
    h = PointwiseConv(channels, use_bias=self.use_bias, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="conv_up")(h)
    h = batch_norm("bn_up")(h)
    return x * nn.sigmoid(h).astype(x.dtype)

  def fuses_norm(self, *, train: bool) -> bool:
    """Whether a ``norm`` given to this unit joins its custom gradient (else it runs before it).

    True for a memory-lean point-wise unit in training.
    """
    return train and self.memory_lean and not self.use_global

  def _lean(self, x: jnp.ndarray, hidden: int, *, train: bool,
            norm: BatchNormVariables | None = None) -> jnp.ndarray:
    """The point-wise gate through :func:`gate` (variables created exactly as the plain path).

    With ``norm`` (training only), ``x`` is the BatchNorm's input and :func:`norm_gate` runs.
    """
    channels = x.shape[-1]
    compute_dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
    cast = lambda *arrays: tuple(None if a is None else jnp.asarray(a, compute_dtype)
                                 for a in arrays)
    batch_norm = lambda features, name: BatchNormVariables(
        features, momentum=self.momentum, epsilon=self.epsilon, param_dtype=self.param_dtype,
        name=name)
    kd, bd = _PointwiseVars(hidden, self.use_bias, self.param_dtype, name="conv_down")(channels)
    bn_down = batch_norm(hidden, "bn_down")
    ku, bu = _PointwiseVars(channels, self.use_bias, self.param_dtype, name="conv_up")(hidden)
    bn_up = batch_norm(channels, "bn_up")
    params = (*cast(kd, bd), bn_down.scale, bn_down.bias, *cast(ku, bu), bn_up.scale, bn_up.bias)
    if not train:
      stats = (bn_down.mean.value, bn_down.var.value, bn_up.mean.value, bn_up.var.value)
      return gate(x, params, stats, epsilon=self.epsilon, inner_relu=self.inner_relu)
    if norm is None:
      y, batch = gate(x, params, None, epsilon=self.epsilon, inner_relu=self.inner_relu)
    else:
      y, norm_batch, batch = norm_gate(
          x, (norm.scale, norm.bias), params, norm_epsilon=norm.epsilon, epsilon=self.epsilon,
          inner_relu=self.inner_relu, dtype=compute_dtype)
      norm.update(norm_batch)
    bn_down.update(batch[:2])
    bn_up.update(batch[2:])
    return y


class _PointwiseVars(nn.Module):
  """The ``kernel`` (and ``bias``) of a :class:`PointwiseConv`, same shapes and initialisers."""
  features: int
  use_bias: bool
  param_dtype: Any

  @nn.compact
  def __call__(self, in_features: int) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    defaults = PointwiseConv(self.features)
    kernel = self.param("kernel", defaults.kernel_init, (1, 1, in_features, self.features),
                        self.param_dtype)
    bias = self.param("bias", defaults.bias_init, (self.features,), self.param_dtype) \
        if self.use_bias else None
    return kernel[0, 0], bias


class BatchNormVariables(nn.Module):
  """The variables of an ``nn.BatchNorm`` (last axis, scale and bias), for :class:`ATAC`'s ``norm``.

  Created under the name the ``nn.BatchNorm`` would have, it holds the very same variables
  (``params``: ``scale``, ``bias``; ``batch_stats``: ``mean``, ``var``; same shapes, initial
  values and creation order), so checkpoints do not change when a host network fuses its
  BatchNorm into the following ATAC unit. ATAC's own ``bn_down`` and ``bn_up`` are these too.

  Attributes:
    features: channels (the input's last axis).
    momentum: running-average momentum (``nn.BatchNorm``'s meaning).
    epsilon: variance epsilon.
    dtype: output dtype of :meth:`normalize` (None: the input's, promoted with the params').
    param_dtype: parameter dtype.
  """
  features: int
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def setup(self):
    _checks.check_positive_int(self.features, option="features", layer="BatchNormVariables")
    _checks.check_momentum(self.momentum, layer="BatchNormVariables")
    _checks.check_positive(self.epsilon, option="epsilon", layer="BatchNormVariables")
    f = (self.features,)
    self.mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(f, jnp.float32))
    self.var = self.variable("batch_stats", "var", lambda: jnp.ones(f, jnp.float32))
    self.scale = self.param("scale", nn.initializers.ones, f, self.param_dtype)
    self.bias = self.param("bias", nn.initializers.zeros, f, self.param_dtype)

  def update(self, batch: tuple[jnp.ndarray, jnp.ndarray]) -> None:
    """Moves the running averages towards the batch's ``(mean, var)`` (not during init)."""
    if self.is_initializing():
      return
    for variable, value in zip((self.mean, self.var), batch):
      variable.value = self.momentum * variable.value + (1 - self.momentum) * value

  def normalize(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    """``nn.BatchNorm(use_running_average=not train)(x)`` with these variables."""
    dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
    stats = None if train else (self.mean.value, self.var.value)
    y, batch = _batch_norm(x, self.scale, self.bias, stats, epsilon=self.epsilon, dtype=dtype)
    if train:
      self.update(batch)
    return y


def _batch_stats(x):
  """``nn.BatchNorm``'s batch ``(mean, var)`` over all but the last axis (fast variance)."""
  x32 = x.reshape(-1, x.shape[-1]).astype(_f32(x.dtype))
  rows = x32.shape[0]
  mean = _colsum(x32) / rows
  return mean, jnp.maximum(0.0, _colsum(jnp.square(x32)) / rows - jnp.square(mean))


def _batch_norm(x, scale, bias, stats, *, epsilon, dtype):
  """``nn.BatchNorm`` over the last axis: ``(y, (mean, var))`` (the batch's, or ``stats``)."""
  mean, var = _batch_stats(x) if stats is None else stats
  return _normalize(x, mean, var, scale, bias, epsilon, dtype), (mean, var)


def norm_gate(x: jnp.ndarray, norm_params: tuple, params: tuple, *, norm_epsilon: float,
              epsilon: float, inner_relu: bool, dtype: Any):
  """``gate(BN(x))`` in training mode, as one op whose backward pass keeps only ``x``.

  In a pre-activation network the BatchNorm's output is the ATAC unit's input; composing
  ``nn.BatchNorm`` with :func:`gate` keeps both the BatchNorm's input (for its gradient) and its
  output (the gate's residual). Here the output is recomputed from ``x`` and the batch
  statistics in the backward pass (one element-wise pass), so the pair keeps what a
  BatchNorm + ReLU pair keeps.

  Args:
    x: ``(..., C)`` BatchNorm input.
    norm_params: ``(scale, bias)`` of the BatchNorm.
    params: the gate's parameters (as :func:`gate`).
    norm_epsilon: the BatchNorm's epsilon.
    epsilon: the gate's BatchNorm epsilon.
    inner_relu: ReLU between the point-wise convolutions.
    dtype: dtype of the BatchNorm's output (the gate's compute dtype).

  Returns:
    ``(y, (mean, var) of x, gate batch statistics)`` (as :func:`gate`'s).
  """
  return _norm_gate_op(float(norm_epsilon), float(epsilon), bool(inner_relu),
                       jnp.dtype(dtype))(x, tuple(norm_params), tuple(params))


@functools.lru_cache(maxsize=None)
def _norm_gate_op(norm_epsilon: float, epsilon: float, inner_relu: bool, dtype):
  """The ``jax.custom_vjp`` of :func:`norm_gate` for one static configuration."""

  # In float32 the BatchNorm folds into the down-projection (_Norm); in bfloat16 the folded
  # kernel measurably loses precision (bn_down gradients 5% off float32, against 1% for the
  # composed pair), so the normalised input is written out and the gate runs on it.
  fold = jnp.dtype(dtype).itemsize >= 4

  def gate_input(x, norm):
    return (x, norm) if fold else (norm.apply(x), None)

  def run(x, norm_params, params):
    norm_batch = _batch_stats(x)
    x, norm = gate_input(x, _Norm(*norm_batch, *norm_params, norm_epsilon, dtype))
    y, batch, gram = _forward(x, params, None, epsilon=epsilon, inner_relu=inner_relu, norm=norm)
    return (y, norm_batch, batch), gram

  def primal(x, norm_params, params):
    return run(x, norm_params, params)[0]

  def fwd(x, norm_params, params):
    x, norm_params, params = jax.tree.map(lambda p: p.value, (x, norm_params, params))
    out, gram = run(x, norm_params, params)
    return out, (x, norm_params, params, out[1], out[2], gram)

  def bwd(residuals, cotangent):
    x, norm_params, params, norm_batch, batch, gram = residuals
    dy, dnorm_batch, dbatch = cotangent
    dy = _live(dy)
    dy = jnp.zeros(x.shape, dtype) if dy is None else dy
    # As in gate(): tie the recomputation to the cotangent so it stays in the backward pass.
    zero = _opaque_zero(dy)
    norm_scale = norm_params[0] + zero.astype(norm_params[0].dtype)
    p, norm = gate_input(x, _Norm(*norm_batch, norm_scale, norm_params[1], norm_epsilon, dtype))
    dp, dparams, _ = _backward(p, params, batch, gram, dy, tuple(map(_live, dbatch)),
                               epsilon=epsilon, inner_relu=inner_relu, batch_stats=True,
                               norm=norm)
    dx, dscale, dbias = _batch_norm_backward(x, norm_params, norm_batch, dp,
                                             tuple(map(_live, dnorm_batch)),
                                             epsilon=norm_epsilon)
    return dx, (dscale, dbias), dparams

  op = jax.custom_vjp(primal)
  op.defvjp(fwd, bwd, symbolic_zeros=True)
  return op


class _Norm(NamedTuple):
  """A training-mode BatchNorm ``p = (x - mean) * rsqrt(var + eps) * scale + bias`` as an operand.

  The gate uses ``p`` element-wise (recomputed inside each fusion) and in two matmuls, which
  take ``x`` instead: ``p @ W = x @ (mul W) + (bias - mean mul) @ W`` and
  ``p^T d = mul (x^T d) + (bias - mean mul) sum(d)`` with ``mul = rsqrt(var + eps) scale``.
  ``p`` is never written to memory. The folded form rounds differently from normalising first
  (relative error ~1e-7 |mean| / std in float32; ``nn.BatchNorm``'s variance ``E[x^2] - E[x]^2``
  has the same dependence). Used in float32 only (see :func:`_norm_gate_op`).
  """
  mean: jnp.ndarray
  var: jnp.ndarray
  scale: jnp.ndarray
  bias: jnp.ndarray
  epsilon: float
  dtype: Any

  def _affine(self):
    mul = lax.rsqrt(self.var + self.epsilon) * self.scale
    return mul, self.bias - self.mean * mul

  def apply(self, x):
    return _normalize(x, self.mean, self.var, self.scale, self.bias, self.epsilon, self.dtype)

  def project(self, x, kernel, bias):
    mul, shift = self._affine()
    k32 = kernel.astype(mul.dtype)
    folded_bias = shift @ k32 + (0.0 if bias is None else bias.astype(mul.dtype))
    # Accumulated and shifted in float32, then rounded once: in bfloat16 the shift would cancel
    # against the product in 8-bit precision.
    h = jnp.dot(x.astype(self.dtype), (mul[:, None] * k32).astype(self.dtype),
                preferred_element_type=_f32(self.dtype))
    return (h + folded_bias).astype(self.dtype)

  def tdot(self, x, d):
    mul, shift = self._affine()
    return mul[:, None] * _tdot(x.astype(self.dtype), d) + jnp.outer(shift, _colsum(d))


def _batch_norm_input_terms(a, rs, sum_d, sum_d_centered, rows, dmean, dvar):
  """``(c0, c1)`` of a training-mode BatchNorm's input gradient ``dx = a * d + c0 + c1 * xc``.

  For ``p = xc * rs * g + b`` (``xc = x - mean``, ``rs = rsqrt(var + eps)``, ``a = rs * g``) with
  output cotangent ``d``: ``sum_d = sum(d)``, ``sum_d_centered = sum(d * xc)`` over the rows;
  ``dmean``, ``dvar`` are the cotangents of the returned batch statistics (None where zero).
  """
  c0 = -a * sum_d / rows + (0.0 if dmean is None else dmean / rows)
  c1 = -a * rs * rs * sum_d_centered / rows + (0.0 if dvar is None else 2.0 * dvar / rows)
  return c0, c1


def _batch_norm_backward(x, norm_params, stats, dp, dstats, *, epsilon):
  """``(dx, dscale, dbias)`` of a training-mode BatchNorm ``p = (x - m) rs g + b``.

  ``stats`` are the batch ``(mean, var)``, ``dstats`` their cotangents (None where zero).
  """
  scale, bias = norm_params
  mean, var = stats
  dmean, dvar = dstats
  f32 = _f32(x.dtype)
  shape = x.shape
  x = x.reshape(-1, shape[-1])
  dp = dp.reshape(x.shape).astype(f32)
  rows = x.shape[0]
  rs = lax.rsqrt(var + epsilon)
  a = rs * scale
  xc = x.astype(f32) - mean
  sum_dp = _colsum(dp)
  sum_dp_xc = _colsum(dp * xc)
  e0, e1 = _batch_norm_input_terms(a, rs, sum_dp, sum_dp_xc, rows, dmean, dvar)
  dx = (a * dp + e0 + e1 * xc).astype(x.dtype).reshape(shape)
  return dx, (sum_dp_xc * rs).astype(scale.dtype), sum_dp.astype(bias.dtype)


def gate(x: jnp.ndarray, params: tuple, stats: tuple | None, *, epsilon: float,
         inner_relu: bool):
  """The ATAC gate ``x * sigmoid(BN(relu(BN(x @ Wd + bd)) @ Wu + bu))`` with a lean gradient.

  Args:
    x: ``(..., C)`` input.
    params: ``(kernel_down (C, K), bias_down, scale_down, shift_down, kernel_up (K, C), bias_up,
      scale_up, shift_up)``; the biases may be None. Kernels and biases in the compute dtype,
      BatchNorm scales and shifts in the parameter dtype.
    stats: ``(mean_down, var_down, mean_up, var_up)`` running statistics (inference), or None
      to normalise with the batch statistics over all but the last axis (training).
    epsilon: BatchNorm epsilon.
    inner_relu: ReLU between the point-wise convolutions.

  Returns:
    With ``stats``: the gated ``x``. Without: ``(gated x, (mean_down, var_down, mean_up,
    var_up))``, the float32 batch statistics (biased variance, as ``nn.BatchNorm``).
  """
  return _gate_op(float(epsilon), bool(inner_relu), stats is None)(
      x, tuple(params), None if stats is None else tuple(stats))


@functools.lru_cache(maxsize=None)
def _gate_op(epsilon: float, inner_relu: bool, batch_stats: bool):
  """The ``jax.custom_vjp`` gate ``op(x, params, stats)`` for one static configuration."""

  def primal(x, params, stats):
    y, batch, _ = _forward(x, params, stats, epsilon=epsilon, inner_relu=inner_relu)
    return (y, batch) if batch_stats else y

  def fwd(x, params, stats):
    x, params, stats = jax.tree.map(lambda p: p.value, (x, params, stats))
    y, batch, gram = _forward(x, params, stats, epsilon=epsilon, inner_relu=inner_relu)
    # Residuals: the input (which the caller keeps anyway), the parameters, per-channel
    # statistics and the (K, K) Gram matrix of the bottleneck; nothing else activation-sized.
    residuals = (x, params, batch if batch_stats else stats, gram)
    return ((y, batch) if batch_stats else y), residuals

  def bwd(residuals, cotangent):
    x, params, stats, gram = residuals
    dy, dstats = cotangent if batch_stats else (cotangent, (None,) * 4)
    dy = _live(dy)
    dy = jnp.zeros_like(x) if dy is None else dy
    # The recomputation must be neither merged with the forward pass (CSE) nor scheduled early:
    # either would keep the bottleneck intermediates alive from the forward to the backward
    # pass. An optimisation barrier (jax.checkpoint's way) is dropped by XLA:CPU before CSE and
    # makes it copy the residuals, so the kernel is made to depend on the cotangent through an
    # exact zero instead.
    params = (params[0] + _opaque_zero(dy).astype(params[0].dtype), *params[1:])
    dx, dparams, dstats_in = _backward(x, params, stats, gram, dy, tuple(map(_live, dstats)),
                                       epsilon=epsilon, inner_relu=inner_relu,
                                       batch_stats=batch_stats)
    return dx, dparams, None if batch_stats else dstats_in

  op = jax.custom_vjp(primal)
  op.defvjp(fwd, bwd, symbolic_zeros=True)
  return op


def _opaque_zero(a: jnp.ndarray) -> jnp.ndarray:
  """A scalar 0 that depends on ``a`` in a way XLA cannot fold away (also for NaN/inf ``a``)."""
  first = lax.stop_gradient(a.reshape(-1)[0]).astype(jnp.float32)
  return jnp.where(jnp.isfinite(first), first * 0.0, 0.0)


def _live(ct):
  """``ct``, or None for a symbolic-zero cotangent."""
  return None if ct is None or isinstance(ct, SymbolicZero) else ct


def _f32(dtype) -> Any:
  return jnp.promote_types(dtype, jnp.float32)


def _tdot(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """``a^T b`` over all but the channel axis, accumulated and returned in at least float32."""
  a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                         preferred_element_type=_f32(jnp.result_type(a, b)))


def _colsum(a: jnp.ndarray) -> jnp.ndarray:
  """Sum over all but the channel axis, accumulated and returned in at least float32.

  Written as a matrix-vector product with ones: XLA:CPU rewrites a large ``jnp.sum`` into a
  tree of ``reduce-window`` ops that run at a fraction of the memory bandwidth (1.35 ms for an
  8 MiB ``(128, 32, 32, 16)`` activation on the 2-core dev machine, jaxlib 0.10.2), while the
  product streams the array once (0.55 ms). Each product with 1 is exact.
  """
  a = a.reshape(-1, a.shape[-1])
  ones = jnp.ones((a.shape[0],), a.dtype)
  return jnp.dot(ones, a, preferred_element_type=_f32(a.dtype))


def _dense(x, kernel, bias):
  y = jnp.dot(x, kernel)
  return y if bias is None else y + bias


def _normalize(h, mean, var, scale, shift, epsilon, dtype):
  """``(h - mean) * rsqrt(var + eps) * scale + shift`` in ``nn.BatchNorm``'s order of ops."""
  mul = lax.rsqrt(var + epsilon) * scale
  return (((h - mean) * mul) + shift).astype(dtype)


def _forward(x, params, stats, *, epsilon, inner_relu, intermediates=False, norm=None):
  """The gate. Returns ``(y, batch statistics or None, gram)``.

  Batch statistics are ``nn.BatchNorm``'s (mean, fast variance ``E[h^2] - E[h]^2`` clipped at
  0), with the sums of squares taken as the diagonal of a Gram matrix (a matmul; XLA:CPU would
  otherwise materialise the squares) and the up-projection's moments derived from the
  bottleneck's Gram matrix ``gram = (sum(a), a^T a)`` instead of another pass over the
  ``C``-wide output. With ``intermediates``, returns ``(h, p, a, u, z)`` instead (the
  bottleneck's input, pre-activation and activation, the up-projection and the gate logits).

  With ``norm`` (a :class:`_Norm`), ``x`` is a BatchNorm's input and the gate's input is
  ``norm.apply(x)``, computed only inside element-wise fusions: the down-projection takes ``x``
  with the BatchNorm folded into its kernel, so the normalised activation is never written
  (measured 4% off the ResNet-20 train step).
  """
  kd, bd, g1, b1, ku, bu, g2, b2 = params
  dtype = kd.dtype
  rows = x.size // x.shape[-1]
  h = _dense(x.astype(dtype), kd, bd) if norm is None else norm.project(x, kd, bd)
  if stats is None:
    m1 = _colsum(h) / rows
    v1 = jnp.maximum(0.0, jnp.diagonal(_tdot(h, h)) / rows - jnp.square(m1))
  else:
    m1, v1 = stats[:2]
  p = _normalize(h, m1, v1, g1, b1, epsilon, dtype)
  a = jax.nn.relu(p) if inner_relu else p
  u = _dense(a, ku, bu)
  gram = None
  if stats is None:
    gram = (_colsum(a), _tdot(a, a))
    mean_a = gram[0] / rows
    cov_a = gram[1] / rows - jnp.outer(mean_a, mean_a)
    ku32 = ku.astype(cov_a.dtype)
    m2 = mean_a @ ku32 + (0.0 if bu is None else bu.astype(cov_a.dtype))
    v2 = jnp.maximum(0.0, jnp.sum(ku32 * (cov_a @ ku32), axis=0))
  else:
    m2, v2 = stats[2:]
  z = _normalize(u, m2, v2, g2, b2, epsilon, dtype)
  if intermediates:
    return h, p, a, u, z
  xin = x if norm is None else norm.apply(x)
  s = jax.nn.sigmoid(z).astype(xin.dtype)
  y = xin * s
  return y, ((m1, v1, m2, v2) if stats is None else None), gram


def _backward(x, params, stats, gram, dy, dstats, *, epsilon, inner_relu, batch_stats,
              norm=None):
  """Cotangents ``(dx, dparams, dstats_in or None)``, recomputing the bottleneck from ``x``.

  ``dstats`` are the cotangents of the returned batch statistics (None where zero). The
  BatchNorm sums over rows are matmuls with the bottleneck (``a^T dz`` also gives the
  up-projection's weight gradient), so the ``C``-wide gradient of the up-projection's output is
  never materialised: ``da = dz (A2 * Wu)^T + a (Wu diag(c1) Wu^T) + r``. With ``norm`` (see
  :func:`_forward`), ``dx`` is the cotangent of the BatchNorm's output.
  """
  kd, bd, g1, b1, ku, bu, g2, b2 = params
  m1, v1, m2, v2 = stats
  dmean1, dvar1, dmean2, dvar2 = dstats
  dtype, f32 = kd.dtype, _f32(kd.dtype)
  h, _, a, u, z = _forward(x, params, stats, epsilon=epsilon, inner_relu=inner_relu,
                           intermediates=True, norm=norm)
  xin = x if norm is None else norm.apply(x)
  rows = x.size // x.shape[-1]
  cast = lambda v: None if v is None else v.astype(f32)
  ku32, bu32 = cast(ku), cast(bu)
  dy2 = dy.astype(f32)
  z32 = z.astype(f32)
  # The gate's derivative through tanh and dy * gate (below) through exp: the two share no
  # transcendental, so XLA fuses each into its consumer instead of writing exp(-z) out.
  s32 = (0.5 * jnp.tanh(0.5 * z32) + 0.5).astype(xin.dtype).astype(f32)
  dz = dy2 * xin.astype(f32) * (s32 * (1 - s32))

  # Up BatchNorm: z = (u - m2) * rs2 * g2 + b2, u = a @ Wu + bu.
  rs2 = lax.rsqrt(v2 + epsilon)
  a2 = rs2 * g2
  shift_u = -m2 if bu is None else bu32 - m2  # uc = u - m2 = a @ Wu + shift_u
  sum_dz = _colsum(dz)
  g_adz = _tdot(a, dz)  # (K, C): a^T dz
  sum_dz_uc = jnp.sum(ku32 * g_adz, axis=0) + shift_u * sum_dz
  dg2, db2 = sum_dz_uc * rs2, sum_dz
  if batch_stats:  # du = a2 * dz + c0 + c1 * uc
    c0, c1 = _batch_norm_input_terms(a2, rs2, sum_dz, sum_dz_uc, rows, dmean2, dvar2)
    sum_a, gram_a = gram
    a_uc = gram_a @ ku32 + jnp.outer(sum_a, shift_u)  # a^T uc
    dku = a2 * g_adz + jnp.outer(sum_a, c0) + c1 * a_uc
    sum_uc = sum_a @ ku32 + rows * shift_u
    dbu = None if bu is None else a2 * sum_dz + rows * c0 + c1 * sum_uc
    da = (jnp.dot(dz, (a2 * ku32).T) + jnp.dot(a.astype(f32), (ku32 * c1) @ ku32.T)
          + (c0 + c1 * shift_u) @ ku32.T)
    dm2 = dv2 = None
  else:  # du = a2 * dz
    dku = a2 * g_adz
    dbu = None if bu is None else a2 * sum_dz
    da = jnp.dot(dz, (a2 * ku32).T)
    dm2, dv2 = -a2 * sum_dz, -0.5 * g2 * rs2**3 * sum_dz_uc
  if inner_relu:
    da = jnp.where(a > 0, da, 0.0)  # a > 0 exactly where p > 0

  # Down BatchNorm: p = (h - m1) * rs1 * g1 + b1.
  rs1 = lax.rsqrt(v1 + epsilon)
  a1 = rs1 * g1
  sum_da = _colsum(da)
  sum_da_hc = jnp.diagonal(_tdot(da, h)) - m1 * sum_da
  dg1, db1 = sum_da_hc * rs1, sum_da
  if batch_stats:
    e0, e1 = _batch_norm_input_terms(a1, rs1, sum_da, sum_da_hc, rows, dmean1, dvar1)
    dh = a1 * da + e0 + e1 * (h.astype(f32) - m1)
    dm1 = dv1 = None
  else:
    dh = a1 * da
    dm1, dv1 = -a1 * sum_da, -0.5 * g1 * rs1**3 * sum_da_hc
  dh = dh.astype(dtype)
  dbd = None if bd is None else _colsum(dh)
  dkd = _tdot(x.astype(dtype), dh) if norm is None else norm.tdot(x, dh)
  # dy * s written as a division: XLA does not duplicate divisions into several consumers, so
  # dx is written once instead of being re-derived (with everything it reads kept alive) inside
  # each consumer, through the whole chain of units of a network.
  gate_dy = dy2 / (1.0 + jnp.exp(-z32))
  dx = (jnp.dot(dh, kd.T).astype(f32) + gate_dy).astype(xin.dtype)
  like = lambda grad, ref: None if ref is None else grad.astype(ref.dtype)
  dparams = (like(dkd, kd), like(dbd, bd), like(dg1, g1), like(db1, b1), like(dku, ku),
             like(dbu, bu), like(dg2, g2), like(db2, b2))
  if batch_stats:
    return dx, dparams, None
  return dx, dparams, tuple(like(d, m) for d, m in zip((dm1, dv1, dm2, dv2), stats))
