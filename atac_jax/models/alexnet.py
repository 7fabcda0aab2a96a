"""AlexNet for CIFAR-10 at 128x128, as in the Paddle reproduction of AlexNet-ATAC.

Features: conv11x11/4 3->48 (padding 5) -> act -> max-pool 3/2 -> conv5x5 48->128 (padding 2) ->
act -> max-pool 3/2 -> conv3x3 128->192 -> act -> conv3x3 192->192 -> act -> conv3x3 192->128 ->
act -> max-pool 3/2 (3x3/1 convs padded by 1, pools unpadded). Classifier: flatten (3*3*128 at
128x128) -> Dense 2048 -> ReLU -> Dropout 0.5 -> Dense 2048 -> ReLU -> Dropout 0.5 -> Dense.
Convolutions have biases, and so do the ATAC units' point-wise convolutions by default
(``act_bias``), as in that reproduction.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from atac_jax.layers import activation_options
from atac_jax.models import _common

# (features, kernel, stride, padding, max-pool after)
CONVS = ((48, 11, 4, 5, True), (128, 5, 1, 2, True), (192, 3, 1, 1, False),
         (192, 3, 1, 1, False), (128, 3, 1, 1, True))
HIDDEN = 2048
POOL = 3  # max-pool window; stride 2, no padding


def output_size(size: int) -> int:
  """Spatial size after the feature extractor for a ``size`` x ``size`` input (<= 0: too small)."""
  for _, kernel, stride, pad, pool in CONVS:
    size = (size + 2 * pad - kernel) // stride + 1
    if pool:
      size = (size - POOL) // 2 + 1 if size >= POOL else 0
  return size


def _min_input_size() -> int:
  size = 1
  while output_size(size) < 1:
    size += 1
  return size


MIN_SIZE = _min_input_size()  # 57


class AlexNet(nn.Module, kw_only=True):
  """AlexNet (CIFAR-10 at 128x128 variant) on NHWC images.

  Submodules: ``conv1`` .. ``conv5``, ``act1`` .. ``act5``, ``fc1``, ``fc2``, ``fc3``.

  Attributes:
    num_classes: classifier outputs.
    act: activation after each convolution (the classifier keeps ReLU).
    act_layers: 0..5 (default 5: all), counted from the back: convolution ``i`` (0..4) is followed
      by ``act`` iff ``i + act_layers >= 5``, else by ReLU.
    reduction: reduction ``r`` for activations that take one (``None``: the unit's default, 2 for
      ATAC).
    act_bias: give the activation's point-wise convolutions biases (``use_bias``), when it has
      that option (ATAC does; the reproduction uses them).
    act_options: further options for the activation.
    dropout_rate: classifier dropout; train mode needs a ``dropout`` rng.
    in_channels: expected input channels (3), or ``None`` for any.
    dtype: computation dtype; logits are returned in float32.
    param_dtype: parameter dtype.
    axis_name: a ``shard_map``/``pmap`` axis over which every BatchNorm and activation with batch
      statistics (ATAC) takes them (as ``nn.BatchNorm(axis_name=...)``); None: per device.
    train: use batch statistics and dropout (which needs a ``dropout`` rng); give it here or at
      call time (``model.apply(variables, x, train=...)``), not both.
  """
  num_classes: int = 10
  act: str = "relu"
  act_layers: int = len(CONVS)
  reduction: int | None = None
  act_bias: bool = True
  act_options: Mapping[str, Any] = FrozenDict()
  dropout_rate: float = 0.5
  in_channels: int | None = 3
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  axis_name: Any = None
  train: bool | None = None

  def _chosen_activation(self) -> _common.ActivationFactory:
    options = dict(self.act_options)
    if "use_bias" in activation_options(self.act):
      options.setdefault("use_bias", self.act_bias)
    return _common.activation_factory(self.act, reduction=self.reduction, dtype=self.dtype,
                                      param_dtype=self.param_dtype, act_options=options,
                                      axis_name=self.axis_name)

  def __post_init__(self) -> None:
    _common.check_int_range(self.act_layers, option="act_layers", model="AlexNet", low=0,
                            high=len(CONVS))
    self._chosen_activation()
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
    """Returns float32 logits ``(N, num_classes)``; ``train=True`` applies dropout."""
    train = nn.merge_param("train", self.train, train)
    _common.check_input(x, model="alexnet_cifar", in_channels=self.in_channels,
                        min_size=MIN_SIZE)
    flags = tuple(i + self.act_layers >= len(CONVS) for i in range(len(CONVS)))
    acts = _common.placement_factories(self._chosen_activation(), flags)
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)

    x = jnp.asarray(x, self.dtype)
    for i, ((features, kernel, stride, pad, pool), act) in enumerate(zip(CONVS, acts)):
      x = nn.Conv(features, (kernel, kernel), strides=stride, padding=[(pad, pad), (pad, pad)],
                  dtype=self.dtype, param_dtype=self.param_dtype, name=f"conv{i + 1}")(x)
      x = act(name=f"act{i + 1}")(x, train=train)
      if pool:
        x = nn.max_pool(x, (POOL, POOL), strides=(2, 2), padding="VALID")
    x = x.reshape(x.shape[0], -1)
    for i in range(2):
      x = nn.relu(dense(HIDDEN, name=f"fc{i + 1}")(x))
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = dense(self.num_classes, name="fc3")(x)
    return jnp.asarray(x, jnp.float32)
