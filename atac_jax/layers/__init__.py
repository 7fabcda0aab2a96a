"""Pure Flax linen units: ATAC, AReLU, AW-convolution, attention baselines and the registry.

Conventions shared by every unit:

- ``train`` (flax's own convention): an optional constructor attribute ``train`` and an optional
  call argument ``unit(x, train=...)``, merged with ``nn.merge_param`` (giving both raises), so
  ``nn.Sequential([nn.Conv(8, (3, 3)), XUnit(train=True)])``, ``nn.remat(XUnit)(train=True)`` and
  ``nn.scan`` work. Units with BatchNorm statistics (ATAC, XUnit) need it from one of the two;
  units whose result does not depend on it (AReLU, PReLU, SE, AWConv, the element-wise
  activations) accept it and may be called without it.
- Output dtype (flax's rule, ``nn.dtypes.promote_dtype``): with ``dtype=None`` a unit computes
  in, and returns, the promotion of its input dtype and its ``param_dtype`` (bfloat16 input with
  float32 parameters gives float32); with ``dtype`` set, it computes in and returns ``dtype``.
  Parameter-free activations return their input's dtype.
- Input: channels last. AReLU, PReLU, the element-wise activations and ``PointwiseConv`` take any
  rank; SE any rank >= 2 (``(N, C)``, ``(N, L, C)``, ``(N, H, W, C)``, ...), XUnit any rank >= 3
  (at least one spatial axis), AWConv rank 4 (NHWC). Other ranks raise a ValueError listing what is
  accepted.
- ``axis_name`` on units with BatchNorm statistics (ATAC, XUnit), as on ``nn.BatchNorm``: under
  ``shard_map``/``pmap`` the statistics are averaged over that axis.
- Introspection: units sow what they compute into the ``intermediates`` collection when it is
  mutable (``unit.apply(variables, x, mutable=["intermediates"])``), as tuples (one entry per
  call): gate units (ATAC, SE, XUnit) sow ``gate``, with ``unit(x) == x * gate`` (broadcast);
  AReLU sows ``negative_slope`` and ``positive_slope``, PReLU ``negative_slope``, AWConv its
  ``kernel_attention``. ``train.gates`` (``atac-viz``) reads gates through this contract only.
- Units and registered activations pickle (initialisers come from :mod:`.initializers`).
"""

from atac_jax.layers.activations import (Elementwise, PReLU, activation_options,
                                         available_activations, get_activation, mish)
from atac_jax.layers.arelu import AReLU
from atac_jax.layers.atac import ATAC
from atac_jax.layers.batch_norm import BatchNormVariables
from atac_jax.layers.attention import SE, XUnit
from atac_jax.layers.awconv import AWConv, KernelAttention, adaptive_avg_pool, per_sample_conv
from atac_jax.layers.pointwise import PointwiseConv

__all__ = [
    "ATAC", "AReLU", "AWConv", "BatchNormVariables", "Elementwise", "KernelAttention", "PReLU",
    "PointwiseConv", "SE", "XUnit", "activation_options", "adaptive_avg_pool",
    "available_activations", "get_activation", "mish", "per_sample_conv",
]
