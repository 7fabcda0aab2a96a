"""AW-convolution against a slow unfold/einsum reference written in NumPy."""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atac_jax.layers import AWConv, KernelAttention, adaptive_avg_pool, per_sample_conv


def _explicit_padding(size, kernel, stride, padding):
  if padding == "VALID":
    return (0, 0)
  if padding == "SAME":
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return (total // 2, total - total // 2)
  return padding


def _unfold_conv(x, kernels, stride, padding):
  """Per-sample convolution by explicit patch extraction (im2col) and einsum."""
  n, h, w, c_in = x.shape
  kh, kw, _, c_out = kernels.shape[1:]
  pad_h = _explicit_padding(h, kh, stride, padding if isinstance(padding, str) else padding[0])
  pad_w = _explicit_padding(w, kw, stride, padding if isinstance(padding, str) else padding[1])
  xp = np.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
  out_h = (xp.shape[1] - kh) // stride + 1
  out_w = (xp.shape[2] - kw) // stride + 1
  patches = np.empty((n, out_h, out_w, kh, kw, c_in), x.dtype)
  for i in range(out_h):
    for j in range(out_w):
      patches[:, i, j] = xp[:, i * stride:i * stride + kh, j * stride:j * stride + kw]
  return np.einsum("nijabc,nabcd->nijd", patches, kernels)


PADDINGS = ["SAME", "VALID", ((1, 2), (0, 1))]


@pytest.mark.parametrize("impl", ["grouped", "vmap", "patches"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", PADDINGS)
def test_per_sample_conv_matches_unfold(impl, stride, padding):
  rng = np.random.RandomState(0)
  x = rng.normal(size=(3, 7, 6, 4)).astype(np.float32)
  kernels = rng.normal(size=(3, 3, 2, 4, 5)).astype(np.float32)
  pad = padding if isinstance(padding, str) else [tuple(p) for p in padding]
  y = per_sample_conv(jnp.asarray(x), jnp.asarray(kernels), strides=(stride, stride), padding=pad,
                      impl=impl)
  np.testing.assert_allclose(y, _unfold_conv(x, kernels, stride, padding), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_awconv_matches_unfold_with_its_attention(stride, padding):
  x = np.random.RandomState(1).normal(size=(2, 8, 8, 4)).astype(np.float32)
  layer = AWConv(6, 3, strides=stride, padding=padding, reduction=2)
  variables = layer.init(jax.random.key(0), x)
  y, state = layer.apply(variables, x, capture_intermediates=lambda m, _: m.name == "attention")
  attention = np.asarray(state["intermediates"]["attention"]["__call__"][0])
  chex.assert_shape(attention, (2, 3, 3, 4, 6))
  kernels = attention * np.asarray(variables["params"]["kernel"])[None]
  np.testing.assert_allclose(y, _unfold_conv(x, kernels, stride, padding), rtol=1e-4, atol=1e-4)
  grouped = layer.clone(impl="vmap").apply(variables, x)
  np.testing.assert_allclose(y, grouped, rtol=1e-5, atol=1e-5)


class _Ones(nn.Module):
  features: int
  kernel_size: tuple
  reduction: int
  dtype: object = None
  param_dtype: object = jnp.float32

  def __call__(self, x):
    return jnp.ones((x.shape[0], *self.kernel_size, x.shape[-1], self.features))


def test_generator_is_replaceable_and_all_ones_is_plain_conv():
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
  layer = AWConv(4, (3, 3), generator=_Ones, use_bias=True)
  variables = layer.init(jax.random.key(1), x)
  plain = nn.Conv(4, (3, 3), use_bias=True)
  expected = plain.apply({"params": variables["params"]}, x)
  np.testing.assert_allclose(layer.apply(variables, x), expected, rtol=1e-5, atol=1e-5)


def test_awconv_sows_its_kernel_attention():
  x = np.random.RandomState(1).normal(size=(2, 6, 6, 4)).astype(np.float32)
  layer = AWConv(5, 3, reduction=2)
  variables = layer.init(jax.random.key(0), x)
  y, state = layer.apply(variables, x, mutable=["intermediates"])
  (attention,) = state["intermediates"]["kernel_attention"]
  expected = KernelAttention(5, (3, 3), reduction=2).apply(
      {"params": variables["params"]["attention"]}, x)
  np.testing.assert_allclose(attention, expected, rtol=1e-6)
  kernels = attention * np.asarray(variables["params"]["kernel"])[None]
  np.testing.assert_allclose(y, _unfold_conv(x, kernels, 1, "SAME"), rtol=1e-4, atol=1e-4)
  # Nothing is sown unless the collection is mutable.
  assert layer.apply(variables, x).shape == y.shape


def test_adaptive_avg_pool_bins():
  x = np.arange(2 * 5 * 4 * 1, dtype=np.float32).reshape(2, 5, 4, 1)
  y = np.asarray(adaptive_avg_pool(jnp.asarray(x), (3, 2)))
  assert y.dtype == np.float32
  rows = [(0, 2), (1, 4), (3, 5)]  # floor(i*5/3) .. ceil((i+1)*5/3)
  cols = [(0, 2), (2, 4)]
  for i, (t, b) in enumerate(rows):
    for j, (l, r) in enumerate(cols):
      np.testing.assert_allclose(y[:, i, j], x[:, t:b, l:r].mean(axis=(1, 2)))


def test_bfloat16_and_jit_grad():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  layer = AWConv(8, 3, strides=2, dtype=jnp.bfloat16, reduction=2)
  variables = layer.init(jax.random.key(1), x)
  y = jax.jit(layer.apply)(variables, x)
  chex.assert_shape(y, (2, 4, 4, 8))
  chex.assert_type(y, jnp.bfloat16)
  grads = jax.grad(lambda v: jnp.sum(layer.clone(dtype=None).apply(v, x) ** 2))(variables)
  chex.assert_tree_all_finite(grads)


@pytest.mark.parametrize("kwargs,match", [
    ({"padding": "FULL"}, "padding must be"),
    ({"kernel_size": 0}, "kernel_size must be"),
    ({"impl": "loop"}, "impl must be one of"),
    ({"features": -1}, "features must be"),
])
def test_bad_options(kwargs, match):
  options = {"features": 4, "kernel_size": 3, **kwargs}
  with pytest.raises(ValueError, match=match):
    AWConv(**options).init(jax.random.key(0), jnp.zeros((1, 6, 6, 3)))
