"""ConvMNIST, the AReLU paper's MNIST network: 3 x (Conv -> MaxPool2 -> act), then a Linear layer.

Convolutions 1->10 (5x5), 10->20 (5x5), 20->40 (3x3), unpadded and with biases, each followed by a
2x2 max-pool and the activation; no BatchNorm. A 28x28 image ends at 1x1x40 (28 -> 24 -> 12 -> 8 ->
4 -> 2 -> 1), so the classifier is ``Linear(40, num_classes)``; larger images give a wider flatten.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from atac_jax.models import _common

CONVS = ((10, 5), (20, 5), (40, 3))  # (features, kernel)
MIN_SIZE = 28


class ConvMNIST(nn.Module, kw_only=True):
  """The AReLU paper's ConvMNIST on NHWC images (at least 28x28).

  Submodules: ``conv1`` .. ``conv3``, ``act1`` .. ``act3``, ``fc``.

  Attributes:
    num_classes: classifier outputs.
    act: activation after each pooled convolution (any registered activation).
    act_layers: 0..3 (default 3: all), counted from the back: block ``i`` (0..2) uses ``act`` iff
      ``i + act_layers >= 3``, else ReLU.
    reduction: reduction ``r`` for activations that take one (``None``: the unit's default).
    act_options: further options for the activation.
    in_channels: expected input channels (1), or ``None`` for any.
    dtype: computation dtype; logits are returned in float32.
    param_dtype: parameter dtype.
    axis_name: a ``shard_map``/``pmap`` axis over which every BatchNorm and activation with batch
      statistics (ATAC) takes them (as ``nn.BatchNorm(axis_name=...)``); None: per device.
    train: training mode (batch statistics of the activations that have them); give it here or
      at call time (``model.apply(variables, x, train=...)``), not both.
  """
  num_classes: int = 10
  act: str = "relu"
  act_layers: int = len(CONVS)
  reduction: int | None = None
  act_options: Mapping[str, Any] = FrozenDict()
  in_channels: int | None = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  axis_name: Any = None
  train: bool | None = None

  def __post_init__(self) -> None:
    _common.check_int_range(self.act_layers, option="act_layers", model="ConvMNIST", low=0,
                            high=len(CONVS))
    _common.activation_factory(self.act, reduction=self.reduction, dtype=self.dtype,
                               param_dtype=self.param_dtype, act_options=self.act_options,
                               axis_name=self.axis_name)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
    """Returns float32 logits ``(N, num_classes)`` for NHWC images ``x``."""
    train = nn.merge_param("train", self.train, train)
    _common.check_input(x, model="convnet_mnist", in_channels=self.in_channels,
                        min_size=MIN_SIZE)
    chosen = _common.activation_factory(self.act, reduction=self.reduction, dtype=self.dtype,
                                        param_dtype=self.param_dtype, act_options=self.act_options,
                                        axis_name=self.axis_name)
    flags = tuple(i + self.act_layers >= len(CONVS) for i in range(len(CONVS)))
    acts = _common.placement_factories(chosen, flags)

    x = jnp.asarray(x, self.dtype)
    for i, ((features, kernel), act) in enumerate(zip(CONVS, acts)):
      x = nn.Conv(features, (kernel, kernel), padding="VALID", dtype=self.dtype,
                  param_dtype=self.param_dtype, name=f"conv{i + 1}")(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
      x = act(name=f"act{i + 1}")(x, train=train)
    x = x.reshape(x.shape[0], -1)
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="fc")(x)
    return jnp.asarray(x, jnp.float32)
