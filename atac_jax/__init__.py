"""atac-jax: Attention as Activation (ATAC), AReLU and AW-convolution in JAX/Flax."""

__version__ = "0.1.0"
