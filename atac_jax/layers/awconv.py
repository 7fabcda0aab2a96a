"""AW-convolution (Zhu, Hofstee, Lee, Al-Ars, ICANN 2021): attention shaped like the conv kernel.

``O_n = Conv(I_n, A_n * K)``: a per-sample attention map ``A_n`` with the kernel's shape
``(kh, kw, C_in, C_out)`` modulates the shared kernel ``K`` before the convolution, which equals
attention applied to the input patches.

The paper's attention generator is only partly published. :class:`KernelAttention` is the
**reconstructed** generator documented in the project's REFERENCE notes: average-pool the input to
``kh x kw`` (``A0``: ``(kh, kw, C_in)``), two point-wise layers with a ReLU between (reduction
``r``) give a ``C_out`` branch, a per-channel affine of ``A0`` gives a ``C_in`` branch, and the two
are broadcast-added into ``(kh, kw, C_in, C_out)`` through a sigmoid. Any module with the same call
signature can replace it (``AWConv(generator=...)``).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from atac_jax.layers import _checks, _conventions, initializers

Padding = str | int | Sequence[tuple[int, int]]
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
IMPLEMENTATIONS = ("grouped", "vmap", "patches")


def _bin_weights(length: Any, bins: int) -> jax.Array:
  """``(bins, length)`` float32 averaging weights of PyTorch's adaptive pooling bins.

  Bin ``i`` spans ``[floor(i L / n), ceil((i + 1) L / n))``. Computed from ``iota`` at run time,
  so ``length`` may be a symbolic (``jax.export``) dimension.
  """
  index = lax.iota(jnp.int32, length)
  size = jnp.asarray(length, jnp.int32)
  i = jnp.arange(bins, dtype=jnp.int32)[:, None]
  start, stop = (i * size) // bins, -((-(i + 1) * size) // bins)
  inside = (index >= start) & (index < stop)
  return inside.astype(jnp.float32) / (stop - start).astype(jnp.float32)


def adaptive_avg_pool(x: jax.Array, output_size: tuple[int, int]) -> jax.Array:
  """PyTorch-style adaptive average pooling of NHWC ``x`` to ``output_size`` (bins may overlap).

  Each output is the mean of its bin, computed as a contraction with per-axis bin weights (in at
  least float32, at the highest matmul precision, returned in ``x``'s dtype). Heights and widths
  may be symbolic (``jax.export``).
  """
  out_h, out_w = output_size
  compute = jnp.promote_types(x.dtype, jnp.float32)
  rows = _bin_weights(x.shape[1], out_h).astype(compute)
  cols = _bin_weights(x.shape[2], out_w).astype(compute)
  pooled = jnp.einsum("nhwc,ih,jw->nijc", x.astype(compute), rows, cols,
                      precision=lax.Precision.HIGHEST)
  return pooled.astype(x.dtype)


class KernelAttention(nn.Module):
  """Reconstructed AW-conv attention generator: NHWC input -> ``(N, kh, kw, C_in, C_out)`` in (0, 1).

  Attributes:
    features: ``C_out`` of the convolution it modulates.
    kernel_size: ``(kh, kw)``.
    reduction: reduction ``r`` of the point-wise bottleneck (width ``max(C_in // r, 1)``).
    dtype: computation dtype; ``None``: the promotion of input and parameter dtypes.
    param_dtype: parameter dtype.
  """
  features: int
  kernel_size: tuple[int, int]
  reduction: int = 16
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    _checks.check_rank(x, rank=4, layer="KernelAttention")
    in_features = x.shape[-1]
    _checks.check_positive_int(self.reduction, option="reduction", layer="AWConv")
    hidden = max(in_features // self.reduction, 1)
    pooled = adaptive_avg_pool(x, self.kernel_size)  # (N, kh, kw, C_in)
    out_branch = nn.Dense(hidden, dtype=self.dtype, param_dtype=self.param_dtype,
                          name="fc_down")(pooled)
    out_branch = nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype,
                          name="fc_up")(nn.relu(out_branch))  # (N, kh, kw, C_out)
    scale = self.param("in_scale", nn.initializers.ones_init(), (in_features,), self.param_dtype)
    shift = self.param("in_shift", nn.initializers.zeros_init(), (in_features,), self.param_dtype)
    pooled, scale, shift = nn.dtypes.promote_dtype(pooled, scale, shift, dtype=self.dtype)
    in_branch = pooled * scale + shift  # (N, kh, kw, C_in)
    return nn.sigmoid(in_branch[..., :, None] + out_branch[..., None, :])


def _normalize_padding(padding: Padding) -> str | list[tuple[int, int]]:
  if isinstance(padding, str):
    if padding.upper() not in ("SAME", "VALID"):
      raise ValueError(f"AWConv: padding must be 'SAME', 'VALID', an int or ((top, bottom), "
                       f"(left, right)), got {padding!r}.")
    return padding.upper()
  if isinstance(padding, int):
    return [(padding, padding), (padding, padding)]
  pairs = [tuple(p) for p in padding]
  if len(pairs) != 2 or any(len(p) != 2 for p in pairs):
    raise ValueError(f"AWConv: explicit padding must be two (low, high) pairs, got {padding!r}.")
  return pairs


def per_sample_conv(x: jax.Array, kernels: jax.Array, *, strides: tuple[int, int],
                    padding: str | list[tuple[int, int]], impl: str = "grouped") -> jax.Array:
  """Convolves each sample ``x[n]`` (NHWC) with its own kernel ``kernels[n]`` (HWIO).

  Args:
    x: input of shape ``(N, H, W, C_in)``.
    kernels: per-sample kernels of shape ``(N, kh, kw, C_in, C_out)``.
    strides: spatial strides.
    padding: 'SAME', 'VALID' or explicit pairs.
    impl: ``'grouped'`` folds the batch into ``feature_group_count`` (one convolution call);
      ``'vmap'`` maps a single-sample convolution over the batch (which XLA also folds into
      feature groups); ``'patches'`` extracts the input patches (``kh * kw`` times the input's
      memory) and contracts them with the kernels in one batched matmul. A symbolic batch
      (``jax.export``) always takes ``'patches'``: feature groups need a static batch. All three
      give the same values.

  Returns:
    Output of shape ``(N, H', W', C_out)``.

  Raises:
    ValueError: for an unknown ``impl``.
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"AWConv: impl must be one of {IMPLEMENTATIONS}, got {impl!r}.")
  if impl == "patches" or jax.export.is_symbolic_dim(x.shape[0]):
    return _patches_conv(x, kernels, strides=strides, padding=padding)
  if impl == "vmap":
    def single(xi, ki):
      return lax.conv_general_dilated(xi[None], ki, strides, padding,
                                      dimension_numbers=_DIMENSION_NUMBERS)[0]
    return jax.vmap(single)(x, kernels)
  n, h, w, c_in = x.shape
  kh, kw, _, c_out = kernels.shape[1:]
  folded_x = jnp.transpose(x, (1, 2, 0, 3)).reshape(1, h, w, n * c_in)
  folded_k = jnp.transpose(kernels, (1, 2, 3, 0, 4)).reshape(kh, kw, c_in, n * c_out)
  y = lax.conv_general_dilated(folded_x, folded_k, strides, padding,
                               dimension_numbers=_DIMENSION_NUMBERS, feature_group_count=n)
  out_h, out_w = y.shape[1:3]
  return jnp.transpose(y.reshape(out_h, out_w, n, c_out), (2, 0, 1, 3))


def _patches_conv(x: jax.Array, kernels: jax.Array, *, strides: tuple[int, int],
                  padding: str | list[tuple[int, int]]) -> jax.Array:
  """:func:`per_sample_conv` as patch extraction and one batched matmul (any batch size)."""
  n, kh, kw, c_in, c_out = kernels.shape
  # Exact copies of the input (HIGHEST: no reduced-precision passes), features ordered (C, kh, kw).
  patches = lax.conv_general_dilated_patches(x, (kh, kw), strides, padding,
                                             dimension_numbers=_DIMENSION_NUMBERS,
                                             precision=lax.Precision.HIGHEST)
  flat = jnp.transpose(kernels, (0, 3, 1, 2, 4)).reshape(n, c_in * kh * kw, c_out)
  return jnp.einsum("nhwp,npo->nhwo", patches, flat)


class AWConv(nn.Module):
  """Convolution whose kernel is modulated per sample by a kernel-shaped attention map.

  Parameters: ``kernel`` ``(kh, kw, C_in, features)`` (same layout as ``nn.Conv``), optional
  ``bias``, and the generator's parameters under ``attention``. Input: NHWC images (rank 4).

  Introspection: each call sows ``kernel_attention`` (the per-sample map
  ``(N, kh, kw, C_in, features)`` that multiplies the kernel) into the ``intermediates``
  collection.

  Attributes:
    features: output channels.
    kernel_size: int or ``(kh, kw)``.
    strides: int or ``(sh, sw)``.
    padding: 'SAME', 'VALID', an int, or ``((top, bottom), (left, right))``.
    reduction: reduction of the default generator's bottleneck.
    use_bias: add a (non-modulated) bias.
    generator: factory ``(features=, kernel_size=, reduction=, dtype=, param_dtype=) -> Module``
      whose module maps the input to ``(N, kh, kw, C_in, features)``; default
      :class:`KernelAttention` (reconstructed).
    impl: ``'grouped'`` (batch folded into feature groups) or ``'vmap'``; see
      :func:`per_sample_conv`.
    dtype: computation and output dtype; ``None``: the promotion of input and parameter dtypes.
    param_dtype: parameter dtype.
    kernel_init: kernel initializer (default: LeCun normal, as ``nn.Conv``).
    train: accepted for the common convention (the result does not depend on it); give it here
      or at call time, not both.
  """
  features: int
  kernel_size: int | Sequence[int]
  strides: int | Sequence[int] = 1
  padding: Padding = "SAME"
  reduction: int = 16
  use_bias: bool = False
  generator: Callable[..., nn.Module] = KernelAttention
  impl: str = "grouped"
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = initializers.lecun_normal
  train: bool | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
    """Applies the attention-weighted convolution to NHWC ``x``."""
    _conventions.merge_train(self.train, train, required=False)
    _checks.check_rank(x, rank=4, layer="AWConv")
    _checks.check_positive_int(self.features, option="features", layer="AWConv")
    kernel_size = _pair(self.kernel_size, "kernel_size")
    strides = _pair(self.strides, "strides")
    padding = _normalize_padding(self.padding)
    kernel = self.param("kernel", self.kernel_init, (*kernel_size, x.shape[-1], self.features),
                        self.param_dtype)
    attention = self.generator(features=self.features, kernel_size=kernel_size,
                               reduction=self.reduction, dtype=self.dtype,
                               param_dtype=self.param_dtype, name="attention")(x)
    self.sow("intermediates", "kernel_attention", attention)
    x, kernel, attention = nn.dtypes.promote_dtype(x, kernel, attention, dtype=self.dtype)
    y = per_sample_conv(x, attention * kernel[None], strides=strides, padding=padding,
                        impl=self.impl)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
      y = y + jnp.asarray(bias, y.dtype)
    return y


def _pair(value: int | Sequence[int], option: str) -> tuple[int, int]:
  pair = (value, value) if isinstance(value, int) else tuple(value)
  if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair):
    raise ValueError(f"AWConv: {option} must be a positive int or a pair of them, got {value!r}.")
  return pair
