"""ATAC: attention as activation (Dai et al., ICPR 2020, arXiv 2007.07729).

``ATAC(x) = x * sigmoid(BN(PWConv_up(relu(BN(PWConv_down(x))))))`` -- a local channel-attention gate
computed point-wise at every position, used in place of ReLU. With ``use_global=True`` the input
is average-pooled over all but the batch and channel axes first, which turns the unit into an
SE-like channel gate that keeps its BNs.

The module declares the variables (named like the reference so weights port 1:1) and calls the
pure ops of :mod:`atac_jax.ops`: the memory-lean gate in training by default, the
reference gate otherwise (:func:`atac_jax.ops.dispatch.choose` says which runs when, and why).

Fused BatchNorm (``ATAC(...)(x, train=True, norm=BatchNormVariables(...))``, what the host
networks use for every ``BN -> ATAC`` pair): the unit's input is itself a BatchNorm output; the
memory-lean op makes the pair one op that keeps only the BatchNorm's input for the backward pass
(:func:`atac_jax.ops.lean.norm_gate`), so a ``BN -> ATAC`` pair keeps what ``BN -> ReLU`` keeps.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from atac_jax import ops
from atac_jax.layers import _checks
from atac_jax.layers.batch_norm import BatchNormVariables
from atac_jax.layers.pointwise import PointwiseConv


class ATAC(nn.Module):
  """Local channel attention gate ``x * sigmoid(bottleneck(x))`` over the last (channel) axis.

  Input: channels last, any rank >= 2 (``(N, C)``, ``(N, L, C)``, ``(N, H, W, C)``,
  ``(N, D, H, W, C)``); BatchNorm statistics are over all but the last axis.

  Submodules are named like the reference (MXNet) implementation so weights port 1:1:
  ``conv_down`` (kernel ``(1, 1, C, C // r)``), ``bn_down``, ``conv_up`` (kernel
  ``(1, 1, C // r, C)``), ``bn_up``. ``C // r`` is at least 1.

  Trainable parameters per unit: ``2C^2/r + 2C/r + 2C`` (BN scale and bias included; plus
  ``C/r + C`` with ``use_bias``); BN running statistics add ``2C/r + 2C``.

  Output dtype (flax's rule, as every unit here): ``dtype`` if given, else the promotion of the
  input's and the parameters' dtypes.

  Introspection: with the ``intermediates`` collection mutable, the unit sows its gate
  ``sigmoid(...)`` as ``intermediates/<path>/gate``: shaped like the input for the point-wise
  unit, ``(N, 1, ..., 1, C)`` for a global one (as SE); ``unit(x) == x * gate`` either way.

  Attributes:
    reduction: bottleneck reduction ``r`` (the reference README uses 2).
    use_global: average-pool before the bottleneck (one gate per channel, SE-like).
    inner_relu: apply ReLU between the two point-wise convs (the reference's ``useReLU``; on in
      the published commands, off by default in its CIFAR script).
    use_bias: give the point-wise convs biases (the Paddle AlexNet reproduction does).
    momentum: BatchNorm running-average momentum (reference: 0.9).
    epsilon: BatchNorm epsilon (reference: 1e-5).
    dtype: computation dtype (e.g. ``jnp.bfloat16``); ``None`` infers it from input and params.
    param_dtype: parameter dtype.
    memory_lean: in training, run the memory-lean op (recomputes the bottleneck in the backward
      pass; same variables, values and gradients, less memory and time; every transformation).
      ``False`` runs the reference op (plain autodiff). Inference always runs the reference op.
    backward_kernel: with ``memory_lean``, ``"auto"`` (the per-backend policy: ``"pallas"``
      on TPU and GPU where the batch's split is known: one device, JAX's mesh context,
      ``shard_map``, or a ``pallas_backward.data_parallel`` step; ``"xla"`` on the CPU),
      ``"xla"``, or ``"pallas"``: the training backward pass as Pallas kernels where they
      apply (``atac_jax.ops.pallas_backward``: Mosaic on TPU, float32, Pallas' interpreter on
      the CPU; ``atac_jax.ops.pallas_gpu``: Triton on NVIDIA GPUs). Which backward
      runs, and why: :func:`atac_jax.ops.dispatch.choose`.
    axis_name: a ``shard_map``/``pmap`` axis name: batch statistics are then global over it (as
      ``nn.BatchNorm(axis_name=...)``); every backward takes it (the lean op and the kernels
      sum their batch sums over it).
    train: training mode (batch statistics, ``batch_stats`` updates); flax's convention: the
      attribute or the call argument, merged with ``nn.merge_param``.
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
  backward_kernel: str = "auto"
  axis_name: Any = None
  train: Optional[bool] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: Optional[bool] = None, *,
               norm: BatchNormVariables | None = None) -> jax.Array:
    """Gates ``x``; in training uses batch statistics and updates ``batch_stats``.

    Args:
      x: the input, ``(..., C)``, rank >= 2.
      train: training mode (or the ``train`` attribute; exactly one of the two).
      norm: a preceding BatchNorm, given as its variables (a :class:`BatchNormVariables` the
        caller created where its ``nn.BatchNorm`` would be): the unit computes
        ``ATAC(BN(x))``. A memory-lean unit in training fuses the two into one op that keeps
        only ``x`` for the backward pass; results, gradients and variables equal those of
        ``ATAC()(nn.BatchNorm()(x))``.
    """
    train = nn.merge_param("train", self.train, train)
    _checks.check_min_rank(x, min_rank=2, layer="ATAC")
    _checks.check_momentum(self.momentum, layer="ATAC")
    _checks.check_positive(self.epsilon, option="epsilon", layer="ATAC")
    channels = x.shape[-1]
    hidden = _checks.bottleneck_width(channels, self.reduction, layer="ATAC")
    if norm is not None and norm.features != channels:
      raise ValueError(f"ATAC: norm has features={norm.features} but the input has {channels} "
                       f"channels; accepted: BatchNormVariables(features=x.shape[-1]).")
    # A norm with statistics over other devices than the unit's runs on its own.
    fuse = (norm is not None and self.fuses_norm(train=train)
            and norm.axis_name == self.axis_name)
    if norm is not None and not fuse:
      x = norm.normalize(x, train=train)
    dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
    x = jnp.asarray(x, dtype)
    params, bn_down, bn_up = self._variables(channels, hidden, dtype)
    running = ops.GateStats(bn_down.running, bn_up.running)
    impl = self._impl()
    kwargs = dict(epsilon=self.epsilon, inner_relu=self.inner_relu)
    if self.use_global:
      pooled = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)), keepdims=True)
      z, stats = ops.reference.gate_logits(pooled, params, None if train else running,
                                           axis_name=self.axis_name, **kwargs)
      y = x * jax.nn.sigmoid(z).astype(dtype)
    elif not train:
      y, stats = ops.gate(x, params, running, impl=impl, axis_name=self.axis_name,
                          **kwargs), running
    elif fuse:
      y, norm_batch, stats = ops.norm_gate(
          x, norm.affine, params, norm_epsilon=norm.epsilon, dtype=dtype, impl=impl,
          axis_name=self.axis_name, **kwargs)
      norm.update(norm_batch)
      if self.is_mutable_collection("intermediates"):  # the gate's input is BN(x)
        x = ops.batch_norm.normalize(x, norm_batch, norm.affine, epsilon=norm.epsilon,
                                     dtype=dtype)
    else:
      y, stats = ops.gate(x, params, impl=impl, axis_name=self.axis_name, **kwargs)
    if train:
      bn_down.update(stats.down)
      bn_up.update(stats.up)
    if self.is_mutable_collection("intermediates"):
      self._sow_gate(x, params, stats, pooled=self.use_global)
    return y

  def fuses_norm(self, *, train: bool) -> bool:
    """Whether a ``norm`` given to this unit joins its op (else it runs before it).

    True for a memory-lean point-wise unit in training; a ``norm`` whose ``axis_name`` differs
    from the unit's still runs on its own (``__call__``).
    """
    return train and self.memory_lean and not self.use_global

  def _impl(self) -> ops.Request:
    """The unit's request to :func:`atac_jax.ops.choose` (which backward runs, and why)."""
    return ops.Request.from_module(memory_lean=self.memory_lean,
                                   backward_kernel=self.backward_kernel)

  def _variables(self, channels: int, hidden: int, dtype: Any):
    """Declares the variables (same tree as linen ``Conv``/``BatchNorm`` submodules)."""
    cast = lambda a: None if a is None else jnp.asarray(a, dtype)
    batch_norm = lambda features, name: BatchNormVariables(
        features, momentum=self.momentum, epsilon=self.epsilon, param_dtype=self.param_dtype,
        axis_name=self.axis_name, name=name)
    down = _PointwiseVars(hidden, self.use_bias, self.param_dtype, name="conv_down")(channels)
    bn_down = batch_norm(hidden, "bn_down")
    up = _PointwiseVars(channels, self.use_bias, self.param_dtype, name="conv_up")(hidden)
    bn_up = batch_norm(channels, "bn_up")
    params = ops.GateParams(ops.Projection(*map(cast, down)), bn_down.affine,
                            ops.Projection(*map(cast, up)), bn_up.affine)
    return params, bn_down, bn_up

  def _sow_gate(self, x, params, stats, *, pooled: bool) -> None:
    """Sows ``sigmoid(z)`` (recomputed with the statistics used) as ``intermediates/gate``."""
    source = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)), keepdims=True) if pooled else x
    z, _ = ops.reference.gate_logits(source, params, stats, epsilon=self.epsilon,
                                     inner_relu=self.inner_relu)
    # Point-wise: shaped like x; global: one value per example and channel, (N, 1, ..., 1, C).
    self.sow("intermediates", "gate", jax.nn.sigmoid(z).astype(x.dtype))


class _PointwiseVars(nn.Module):
  """The ``kernel`` (and ``bias``) of a :class:`PointwiseConv`, same shapes and initialisers."""
  features: int
  use_bias: bool
  param_dtype: Any

  @nn.compact
  def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array | None]:
    defaults = PointwiseConv(self.features)
    kernel = self.param("kernel", defaults.kernel_init, (1, 1, in_features, self.features),
                        self.param_dtype)
    bias = self.param("bias", defaults.bias_init, (self.features,), self.param_dtype) \
        if self.use_bias else None
    return kernel[0, 0], bias
