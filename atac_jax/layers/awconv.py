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

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from atac_jax.layers import _checks

Padding = str | int | Sequence[tuple[int, int]]
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
IMPLEMENTATIONS = ("grouped", "vmap")


def adaptive_avg_pool(x: jnp.ndarray, output_size: tuple[int, int]) -> jnp.ndarray:
  """PyTorch-style adaptive average pooling of NHWC ``x`` to ``output_size`` (bins may overlap)."""
  height, width = x.shape[1:3]
  out_h, out_w = output_size
  rows = []
  for i in range(out_h):
    top, bottom = (i * height) // out_h, math.ceil((i + 1) * height / out_h)
    cols = []
    for j in range(out_w):
      left, right = (j * width) // out_w, math.ceil((j + 1) * width / out_w)
      cols.append(jnp.mean(x[:, top:bottom, left:right, :], axis=(1, 2)))
    rows.append(jnp.stack(cols, axis=1))
  return jnp.stack(rows, axis=1)


class KernelAttention(nn.Module):
  """Reconstructed AW-conv attention generator: NHWC input -> ``(N, kh, kw, C_in, C_out)`` in (0, 1).

  Attributes:
    features: ``C_out`` of the convolution it modulates.
    kernel_size: ``(kh, kw)``.
    reduction: reduction ``r`` of the point-wise bottleneck (width ``max(C_in // r, 1)``).
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """
  features: int
  kernel_size: tuple[int, int]
  reduction: int = 16
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
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


def per_sample_conv(x: jnp.ndarray, kernels: jnp.ndarray, *, strides: tuple[int, int],
                    padding: str | list[tuple[int, int]], impl: str = "grouped") -> jnp.ndarray:
  """Convolves each sample ``x[n]`` (NHWC) with its own kernel ``kernels[n]`` (HWIO).

  Args:
    x: input of shape ``(N, H, W, C_in)``.
    kernels: per-sample kernels of shape ``(N, kh, kw, C_in, C_out)``.
    strides: spatial strides.
    padding: 'SAME', 'VALID' or explicit pairs.
    impl: ``'grouped'`` folds the batch into ``feature_group_count`` (one convolution call);
      ``'vmap'`` maps a single-sample convolution over the batch.

  Returns:
    Output of shape ``(N, H', W', C_out)``.
  """
  if impl == "vmap":
    def single(xi, ki):
      return lax.conv_general_dilated(xi[None], ki, strides, padding,
                                      dimension_numbers=_DIMENSION_NUMBERS)[0]
    return jax.vmap(single)(x, kernels)
  if impl != "grouped":
    raise ValueError(f"AWConv: impl must be one of {IMPLEMENTATIONS}, got {impl!r}.")
  n, h, w, c_in = x.shape
  kh, kw, _, c_out = kernels.shape[1:]
  folded_x = jnp.transpose(x, (1, 2, 0, 3)).reshape(1, h, w, n * c_in)
  folded_k = jnp.transpose(kernels, (1, 2, 3, 0, 4)).reshape(kh, kw, c_in, n * c_out)
  y = lax.conv_general_dilated(folded_x, folded_k, strides, padding,
                               dimension_numbers=_DIMENSION_NUMBERS, feature_group_count=n)
  out_h, out_w = y.shape[1:3]
  return jnp.transpose(y.reshape(out_h, out_w, n, c_out), (2, 0, 1, 3))


class AWConv(nn.Module):
  """Convolution whose kernel is modulated per sample by a kernel-shaped attention map.

  Parameters: ``kernel`` ``(kh, kw, C_in, features)`` (same layout as ``nn.Conv``), optional
  ``bias``, and the generator's parameters under ``attention``.

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
    impl: ``'grouped'`` (batch folded into feature groups) or ``'vmap'``.
    dtype: computation dtype.
    param_dtype: parameter dtype.
    kernel_init: kernel initializer.
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
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    """Applies the attention-weighted convolution to NHWC ``x``."""
    del train
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
