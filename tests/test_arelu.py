"""AReLU against the golden values of REFERENCE.md section 2."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atac_jax.layers import AReLU, arelu

X = jnp.array([-3, -1, -0.5, -1e-3, 0, 1e-3, 0.5, 1, 3], jnp.float32)
GOLDEN_Y = [-2.7, -0.9, -0.45, -9e-4, 0, 1.8807970780e-3, 0.94039853899, 1.8807970780,
            5.6423912339]


def _loss(params, x):
  return jnp.sum(AReLU().apply({"params": params}, x))


def test_init_params_have_shape_one():
  params = AReLU().init(jax.random.key(0), X)["params"]
  chex.assert_trees_all_close(params, {"alpha": jnp.array([0.9]), "beta": jnp.array([2.0])})


def test_forward_and_gradients_at_init():
  params = AReLU().init(jax.random.key(0), X)["params"]
  y = AReLU().apply({"params": params}, X)
  np.testing.assert_allclose(y, GOLDEN_Y, rtol=1e-6, atol=1e-9)
  grads = jax.grad(_loss)(params, X)
  np.testing.assert_allclose(grads["alpha"], [-4.501], rtol=1e-6)
  np.testing.assert_allclose(grads["beta"], [0.47257612790118325], rtol=1e-6)


def test_clamped_alpha_has_zero_gradient():
  params = {"alpha": jnp.array([1.5]), "beta": jnp.array([-1.0])}
  y = AReLU().apply({"params": params}, X)
  np.testing.assert_allclose(y[:4], 0.99 * np.asarray(X[:4]), rtol=1e-6)
  grads = jax.grad(_loss)(params, X)
  np.testing.assert_allclose(grads["alpha"], [0.0])
  np.testing.assert_allclose(grads["beta"], [0.8849503115199097], rtol=1e-6)


def test_input_gradient_is_zero_at_zero():
  params = AReLU().init(jax.random.key(0), X)["params"]
  dx = jax.grad(lambda x: jnp.sum(AReLU().apply({"params": params}, x)))(X)
  np.testing.assert_allclose(dx, [0.9] * 4 + [0.0] + [1.8807970779778822] * 4, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_dtype_and_nhwc(dtype):
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  module = AReLU(dtype=dtype)
  variables = module.init(jax.random.key(0), x)
  y = jax.jit(lambda v, x: module.apply(v, x, train=True))(variables, x)
  chex.assert_type(y, dtype)
  chex.assert_shape(y, x.shape)


@pytest.mark.parametrize("shape", [(5,), (4, 3), (2, 5, 3), (2, 3, 4, 3), (1, 2, 3, 4, 3)])
def test_any_rank(shape):
  x = np.random.RandomState(0).normal(size=shape).astype(np.float32)
  y = AReLU().apply({"params": {"alpha": jnp.array([0.3]), "beta": jnp.array([0.5])}}, x)
  expected = np.where(x >= 0, x * (1 + 1 / (1 + np.exp(-0.5))), 0.3 * x)
  np.testing.assert_allclose(y, expected, rtol=1e-6)


def test_slopes_are_exposed_by_method_and_sown():
  """Introspection contract: ``slopes()`` and the sown ``negative_slope``/``positive_slope``."""
  params = {"alpha": jnp.array([1.5]), "beta": jnp.array([-1.0])}
  expected = (0.99, 1 + 1 / (1 + np.exp(1.0)))  # clamp(alpha, 0.01, 0.99), 1 + sigmoid(beta)
  negative, positive = AReLU().apply({"params": params}, method="slopes")
  np.testing.assert_allclose([negative[0], positive[0]], expected, rtol=1e-6)
  y, state = AReLU().apply({"params": params}, X, mutable=["intermediates"])
  sown = state["intermediates"]
  np.testing.assert_allclose([sown["negative_slope"][0][0], sown["positive_slope"][0][0]],
                             expected, rtol=1e-6)
  np.testing.assert_allclose(y, np.where(X >= 0, X * expected[1], X * expected[0]), rtol=1e-6)
  np.testing.assert_allclose(arelu.slopes(params["alpha"], params["beta"]),
                             [[expected[0]], [expected[1]]], rtol=1e-6)


def test_parameter_contract():
  params = AReLU().init(jax.random.key(0), X)["params"]
  assert arelu.is_arelu_params(params)
  assert not arelu.is_arelu_params({**params, "gamma": jnp.zeros((1,))})
  assert not arelu.is_arelu_params({"alpha": jnp.zeros((2,)), "beta": jnp.zeros((1,))})
  assert not arelu.is_arelu_params(jnp.zeros((1,)))
