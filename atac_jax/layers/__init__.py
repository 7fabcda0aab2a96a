"""Pure Flax linen units: ATAC, AReLU, AW-convolution, attention baselines and the registry."""

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
