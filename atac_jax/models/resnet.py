"""ImageNet ResNet v1b (stride on the 3x3 conv): ResNet-18/34/50/101/152 with ATAC and AW-conv.

Stem: 7x7/2 conv 64 (padding 3) -> BN -> ReLU -> 3x3/2 max-pool (padding 1), as torchvision. Basic
blocks for 18/34, bottlenecks (expansion 4) for 50/101/152; the shortcut is a 1x1 strided conv + BN
when the shape changes. The chosen activation replaces the block-internal ReLUs only (``relu1`` and
``relu2`` of a bottleneck, ``relu1`` of a basic block); the ReLU after the addition and the stem
stay ReLU, as in the ATAC reference.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from atac_jax.layers import AWConv
from atac_jax.models import _common

# depth -> (blocks per stage, bottleneck?)
STAGE_SIZES: dict[int, tuple[tuple[int, ...], bool]] = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
    152: ((3, 8, 36, 3), True),
}
WIDTHS = (64, 128, 256, 512)
NUM_STAGES = 4
FEATURE_NAMES = ("c2", "c3", "c4", "c5")  # stage outputs at strides 4, 8, 16, 32 (FPN naming)


def check_depth(depth: Any) -> tuple[tuple[int, ...], bool]:
  """Returns ``(blocks per stage, uses bottlenecks)`` for an ImageNet ResNet depth.

  Raises:
    ValueError: for a depth other than 18, 34, 50, 101 or 152.
  """
  if depth not in STAGE_SIZES or isinstance(depth, bool):
    raise ValueError(f"ResNet: depth must be one of {sorted(STAGE_SIZES)}, got {depth!r}.")
  return STAGE_SIZES[depth]


def stage_uses_act(stage: int, act_layers: int) -> bool:
  """Whether stage ``stage`` (0..3) uses the chosen activation: ``act_layers >= 4 - stage``."""
  return act_layers >= NUM_STAGES - stage


class BasicBlock(nn.Module):
  """``conv3x3(stride) -> BN -> act1 -> conv3x3 -> BN -> + shortcut -> ReLU``.

  Attributes:
    features: output channels.
    strides: stride of the first 3x3 convolution and of the projection shortcut.
    conv: convolution factory (no bias).
    conv3x3: factory for the 3x3 convolutions (``conv`` or an AW-conv).
    norm: BatchNorm factory (training mode already bound).
    last_norm: BatchNorm factory for the block's last BN (zero-gamma option).
    act: activation factory for ``act1``.
    train: training mode for the activation; here or at call time, not both.
  """
  features: int
  strides: int
  conv: _common.ModuleDef
  conv3x3: _common.ModuleDef
  norm: _common.ModuleDef
  last_norm: _common.ModuleDef
  act: _common.ActivationFactory
  train: bool | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
    train = nn.merge_param("train", self.train, train)
    y = self.conv3x3(self.features, (3, 3), strides=self.strides, name="conv1")(x)
    y = _common.norm_act(y, norm=self.norm, act=self.act, norm_name="bn1",
                         act_name="act1", train=train)
    y = self.conv3x3(self.features, (3, 3), name="conv2")(y)
    y = self.last_norm(name="bn2")(y)
    return nn.relu(y + _shortcut(self, x, self.features))


class Bottleneck(nn.Module):
  """``1x1 -> BN -> act1 -> 3x3(stride) -> BN -> act2 -> 1x1 (x4) -> BN -> + shortcut -> ReLU``.

  Attributes:
    features: bottleneck width (the block outputs ``4 * features`` channels).
    strides: stride of the 3x3 convolution and of the projection shortcut.
    conv: convolution factory (no bias).
    conv3x3: factory for the 3x3 convolution (``conv`` or an AW-conv).
    norm: BatchNorm factory (training mode already bound).
    last_norm: BatchNorm factory for the block's last BN (zero-gamma option).
    act: activation factory for ``act1`` and ``act2``.
    expansion: output channels per bottleneck channel.
    train: training mode for the activations; here or at call time, not both.
  """
  features: int
  strides: int
  conv: _common.ModuleDef
  conv3x3: _common.ModuleDef
  norm: _common.ModuleDef
  last_norm: _common.ModuleDef
  act: _common.ActivationFactory
  expansion: int = 4
  train: bool | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
    train = nn.merge_param("train", self.train, train)
    out_features = self.features * self.expansion
    y = self.conv(self.features, (1, 1), name="conv1")(x)
    y = _common.norm_act(y, norm=self.norm, act=self.act, norm_name="bn1",
                         act_name="act1", train=train)
    y = self.conv3x3(self.features, (3, 3), strides=self.strides, name="conv2")(y)
    y = _common.norm_act(y, norm=self.norm, act=self.act, norm_name="bn2",
                         act_name="act2", train=train)
    y = self.conv(out_features, (1, 1), name="conv3")(y)
    y = self.last_norm(name="bn3")(y)
    return nn.relu(y + _shortcut(self, x, out_features))


def _shortcut(block: BasicBlock | Bottleneck, x: jnp.ndarray, out_features: int) -> jnp.ndarray:
  """Identity, or a 1x1 strided conv + BN (``downsample_conv``, ``downsample_bn``) on a change."""
  if block.strides == 1 and x.shape[-1] == out_features:
    return x
  x = block.conv(out_features, (1, 1), strides=block.strides, name="downsample_conv")(x)
  return block.norm(name="downsample_bn")(x)


class ResNet(nn.Module, kw_only=True):
  """ImageNet ResNet v1b of depth 18, 34, 50, 101 or 152 on NHWC images.

  Submodules: ``conv_init``, ``bn_init``, ``stage{1..4}_block{j}`` (``conv1``, ``bn1``, ``act1``,
  ``conv2``, ``bn2``, [``act2``, ``conv3``, ``bn3``,] and ``downsample_conv``/``downsample_bn`` on a
  shape change), ``fc``.

  Attributes:
    depth: 18, 34, 50, 101 or 152.
    num_classes: classifier outputs (unused with ``return_features``).
    act: activation name replacing the block-internal ReLUs (see ``available_activations``).
    act_layers: 0..4 (default 4: every stage), counted from the back: stage ``s`` (0..3) uses
      ``act`` iff ``act_layers >= 4 - s``. The ATAC paper's model is ``act_layers=2``,
      ``reduction=2`` (stages 3 and 4, 18 units in ResNet-50).
    reduction: reduction ``r`` for activations that take one (``None``: the unit's default).
    act_options: further options for the activation.
    zero_init_last_bn: initialise the scale (gamma) of each block's last BN to 0 ("last gamma").
    awconv_stages: stage indices (0..3) whose 3x3 convolutions are AW-convolutions.
    awconv_reduction: reduction of the AW-conv attention generator.
    return_features: return ``{"c2", "c3", "c4", "c5"}`` stage outputs (strides 4/8/16/32)
      instead of logits, as a detection backbone (no classifier parameters are created).
    in_channels: expected input channels (3), or ``None`` for any.
    momentum: BatchNorm momentum of the host network (0.9, as the reference).
    epsilon: BatchNorm epsilon of the host network.
    dtype: computation dtype (e.g. ``jnp.bfloat16``); logits are returned in float32.
    param_dtype: parameter dtype.
    axis_name: a ``shard_map``/``pmap`` axis over which every BatchNorm and activation with batch
      statistics (ATAC) takes them (as ``nn.BatchNorm(axis_name=...)``); None: per device.
    train: use batch statistics (and update ``batch_stats``); give it here or at call time
      (``model.apply(variables, x, train=...)``), not both.
  """
  depth: int = 50
  num_classes: int = 1000
  act: str = "relu"
  act_layers: int = 4
  reduction: int | None = None
  act_options: Mapping[str, Any] = FrozenDict()
  zero_init_last_bn: bool = False
  awconv_stages: tuple[int, ...] = ()
  awconv_reduction: int = 16
  return_features: bool = False
  in_channels: int | None = 3
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  axis_name: Any = None
  train: bool | None = None

  def __post_init__(self) -> None:
    check_depth(self.depth)
    _common.check_int_range(self.act_layers, option="act_layers", model="ResNet", low=0,
                            high=NUM_STAGES)
    bad = [s for s in self.awconv_stages if s not in range(NUM_STAGES)]
    if bad:
      raise ValueError(f"ResNet: awconv_stages must be a subset of {list(range(NUM_STAGES))}, "
                       f"got {self.awconv_stages!r}.")
    _common.activation_factory(self.act, reduction=self.reduction, dtype=self.dtype,
                               param_dtype=self.param_dtype, act_options=self.act_options,
                               axis_name=self.axis_name)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool | None = None
               ) -> jax.Array | dict[str, jax.Array]:
    """Returns float32 logits ``(N, num_classes)``, or stage outputs with ``return_features``."""
    train = nn.merge_param("train", self.train, train)
    _common.check_input(x, model=f"resnet{self.depth}", in_channels=self.in_channels, min_size=32)
    stage_sizes, bottleneck = check_depth(self.depth)
    block_cls = Bottleneck if bottleneck else BasicBlock
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=_common.he_normal,
                             padding=[(0, 0), (0, 0)], dtype=self.dtype,
                             param_dtype=self.param_dtype)
    padded = functools.partial(conv, padding=[(1, 1), (1, 1)])  # 3x3 convs
    awconv = functools.partial(AWConv, padding=1, reduction=self.awconv_reduction,
                               kernel_init=_common.he_normal, dtype=self.dtype,
                               param_dtype=self.param_dtype)
    norm = _common.NormSpec(train, self.momentum, self.epsilon, self.dtype, self.param_dtype,
                            self.axis_name)
    last_norm = functools.partial(norm, scale_init=nn.initializers.zeros_init()) \
        if self.zero_init_last_bn else norm
    chosen = _common.activation_factory(self.act, reduction=self.reduction, dtype=self.dtype,
                                        param_dtype=self.param_dtype, act_options=self.act_options,
                                        axis_name=self.axis_name)
    flags = tuple(stage_uses_act(s, self.act_layers) for s in range(NUM_STAGES))
    stage_acts = _common.placement_factories(chosen, flags)

    x = jnp.asarray(x, self.dtype)
    x = conv(64, (7, 7), strides=2, padding=[(3, 3), (3, 3)], name="conv_init")(x)
    x = nn.relu(norm(name="bn_init")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    features = {}
    for s, (blocks, width, act) in enumerate(zip(stage_sizes, WIDTHS, stage_acts)):
      conv3x3 = awconv if s in self.awconv_stages else padded
      for j in range(blocks):
        strides = 2 if s > 0 and j == 0 else 1
        x = block_cls(width, strides, conv=conv, conv3x3=conv3x3, norm=norm, last_norm=last_norm,
                      act=act, name=f"stage{s + 1}_block{j + 1}")(x, train=train)
      features[FEATURE_NAMES[s]] = x
    if self.return_features:
      return features
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="fc")(x)
    return jnp.asarray(x, jnp.float32)
