"""Pre-activation ResNet-v2 for CIFAR (GluonCV ``CIFARResNetV2`` layout), the ATAC paper's host.

Layout (depth ``6b + 2``): input BN without scale or bias, conv3x3 -> 16, three stages of ``b``
basic blocks of widths 16/32/64 (stride 2 at the first block of stages 2 and 3), head
``BN -> act -> global average pool -> Dense``. A block is
``BN -> act1 -> conv3x3(stride) -> BN -> act2 -> conv3x3 -> + shortcut``, the shortcut being the raw
block input or, when the shape changes, a 1x1 strided convolution without BN. Convolutions have no
bias; BatchNorm uses momentum 0.9 and epsilon 1e-5.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from atac_jax.models import _common

WIDTHS = (16, 32, 64)
MAX_ACT_LAYERS = 4


def check_depth(depth: Any) -> int:
  """Returns the blocks per stage ``b`` for ``depth = 6b + 2``.

  Raises:
    ValueError: if ``depth`` is not of the form ``6b + 2`` with ``b >= 1``.
  """
  if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
    raise ValueError(f"CIFARResNetV2: depth must be 6b + 2 with b >= 1 (accepted: 8, 14, 20, 26, "
                     f"32, 38, 44, 50, 56, ..., 110, ...), got {depth!r}.")
  return (depth - 2) // 6


def stage_uses_act(stage: int, act_layers: int) -> bool:
  """Whether stage ``stage`` (0, 1 or 2) uses the chosen activation: ``stage + act_layers >= 4``."""
  return stage + act_layers >= MAX_ACT_LAYERS


class BasicBlockV2(nn.Module):
  """Pre-activation basic block ``BN -> act1 -> conv3x3 -> BN -> act2 -> conv3x3 + shortcut``.

  Attributes:
    features: output channels.
    strides: stride of the first convolution (and of the projection shortcut).
    conv: convolution factory (no bias, padding 1).
    norm: BatchNorm factory (training mode already bound).
    act: activation factory ``act(name=...)``.
    train: training mode for the activations; here or at call time, not both.
  """
  features: int
  strides: int
  conv: _common.ModuleDef
  norm: _common.ModuleDef
  act: _common.ActivationFactory
  train: bool | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
    train = nn.merge_param("train", self.train, train)
    residual = x
    y = _common.norm_act(x, norm=self.norm, act=self.act, norm_name="bn1",
                         act_name="act1", train=train)
    if self.strides != 1 or x.shape[-1] != self.features:
      residual = self.conv(self.features, (1, 1), strides=self.strides, padding="VALID",
                           name="shortcut")(x)
    y = self.conv(self.features, (3, 3), strides=self.strides, name="conv1")(y)
    y = _common.norm_act(y, norm=self.norm, act=self.act, norm_name="bn2",
                         act_name="act2", train=train)
    y = self.conv(self.features, (3, 3), name="conv2")(y)
    return y + residual


class CIFARResNetV2(nn.Module, kw_only=True):
  """Pre-activation ResNet-v2 of depth ``6b + 2`` on NHWC images (any size >= 4x4).

  Submodules: ``bn_in``, ``conv_in``, ``stage{1,2,3}_block{j}`` (with ``bn1``, ``act1``, ``conv1``,
  ``bn2``, ``act2``, ``conv2`` and, where the shape changes, ``shortcut``), ``bn_out``,
  ``act_out``, ``head``.

  Attributes:
    depth: ``6b + 2`` (8, 14, 20, 26, 32, 44, 56, 110, ...).
    num_classes: classifier outputs.
    act: activation name (see ``atac_jax.layers.available_activations``).
    act_layers: 0..4, counted from the back: stage ``i`` (0, 1, 2) uses ``act`` iff
      ``i + act_layers >= 4``, the head activation iff ``act_layers > 0``; the others are ReLU.
      4 (default) means every activation.
    reduction: reduction ``r`` for activations that take one (``None``: the unit's default).
    act_options: further options for the activation (e.g. ``{"inner_relu": False}``).
    in_channels: expected input channels, or ``None`` (default) for any.
    momentum: BatchNorm momentum of the host network.
    epsilon: BatchNorm epsilon of the host network.
    dtype: computation dtype (e.g. ``jnp.bfloat16``); logits are returned in float32.
    param_dtype: parameter dtype.
    axis_name: a ``shard_map``/``pmap`` axis over which every BatchNorm and activation with batch
      statistics (ATAC) takes them (as ``nn.BatchNorm(axis_name=...)``); None: per device.
    train: use batch statistics (and update ``batch_stats``); give it here or at call time
      (``model.apply(variables, x, train=...)``), not both.
  """
  depth: int = 20
  num_classes: int = 10
  act: str = "relu"
  act_layers: int = 4
  reduction: int | None = None
  act_options: Mapping[str, Any] = FrozenDict()
  in_channels: int | None = None
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  axis_name: Any = None
  train: bool | None = None

  def __post_init__(self) -> None:
    check_depth(self.depth)
    _common.check_int_range(self.act_layers, option="act_layers", model="CIFARResNetV2", low=0,
                            high=MAX_ACT_LAYERS)
    _common.activation_factory(self.act, reduction=self.reduction, dtype=self.dtype,
                               param_dtype=self.param_dtype, act_options=self.act_options,
                               axis_name=self.axis_name)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
    """Returns float32 logits ``(N, num_classes)`` for NHWC images ``x``."""
    train = nn.merge_param("train", self.train, train)
    _common.check_input(x, model=f"cifar_resnet{self.depth}", in_channels=self.in_channels,
                        min_size=4)
    blocks = check_depth(self.depth)
    # Padding 1 on both sides, as the reference (XLA's 'SAME' pads (0, 1) at stride 2).
    conv = functools.partial(nn.Conv, use_bias=False, padding=((1, 1), (1, 1)),
                             kernel_init=_common.he_normal, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    norm = _common.NormSpec(train, self.momentum, self.epsilon, self.dtype, self.param_dtype,
                            self.axis_name)
    chosen = _common.activation_factory(self.act, reduction=self.reduction, dtype=self.dtype,
                                        param_dtype=self.param_dtype, act_options=self.act_options,
                                        axis_name=self.axis_name)
    flags = tuple(stage_uses_act(i, self.act_layers) for i in range(len(WIDTHS)))
    stage_acts = _common.placement_factories(chosen, flags)
    (head_act,) = _common.placement_factories(chosen, (self.act_layers > 0,))

    x = jnp.asarray(x, self.dtype)
    x = norm(use_scale=False, use_bias=False, name="bn_in")(x)
    x = conv(WIDTHS[0], (3, 3), name="conv_in")(x)
    for i, (features, act) in enumerate(zip(WIDTHS, stage_acts)):
      for j in range(blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = BasicBlockV2(features, strides, conv=conv, norm=norm, act=act,
                         name=f"stage{i + 1}_block{j + 1}")(x, train=train)
    x = _common.norm_act(x, norm=norm, act=head_act, norm_name="bn_out",
                         act_name="act_out", train=train)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="head")(x)
    return jnp.asarray(x, jnp.float32)
