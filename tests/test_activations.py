"""The activation registry: names, options, calling convention, bf16."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from atac_jax.layers import (Elementwise, activation_options, available_activations,
                             get_activation)

REQUIRED = {"relu", "prelu", "elu", "selu", "gelu", "swish", "mish", "arelu", "atac",
            "atac_global", "xunit", "se"}


def _run(act, x, train):
  if isinstance(act, Elementwise):
    return act(x, train=train)
  variables = act.init(jax.random.key(0), x, train=False)
  y, _ = act.apply(variables, x, train=train, mutable=["batch_stats"])
  return y


def test_registry_names():
  assert REQUIRED <= set(available_activations())


def test_unknown_name_lists_accepted():
  with pytest.raises(ValueError, match="accepted names: .*atac.*relu"):
    get_activation("atacc")


def test_unknown_option_lists_accepted():
  with pytest.raises(ValueError, match="accepted: .*reduction"):
    get_activation("atac", alpha_init=0.5)
  with pytest.raises(ValueError, match="accepted: none"):
    get_activation("relu", reduction=2)


@pytest.mark.parametrize("name,reference", [
    ("relu", lambda x: np.maximum(x, 0)),
    ("elu", lambda x: np.where(x > 0, x, np.expm1(x))),
    ("selu", lambda x: 1.0507009873554805 * np.where(x > 0, x, 1.6732632423543772 * np.expm1(x))),
    ("gelu", lambda x: 0.5 * x * (1 + special.erf(x / np.sqrt(2)))),
    ("swish", lambda x: x / (1 + np.exp(-x))),
    ("mish", lambda x: x * np.tanh(np.log1p(np.exp(x)))),
    ("prelu", lambda x: np.where(x >= 0, x, 0.25 * x)),
])
def test_elementwise_formulas(name, reference):
  x = np.linspace(-4, 4, 33, dtype=np.float32).reshape(1, 1, 33, 1)
  np.testing.assert_allclose(_run(get_activation(name), x, train=False), reference(x),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_bfloat16_output_is_finite(name):
  options = {"dtype": jnp.bfloat16} if "dtype" in activation_options(name) else {}
  if "reduction" in activation_options(name):
    options["reduction"] = 2
  x = (3 * jax.random.normal(jax.random.key(1), (2, 4, 4, 8))).astype(jnp.bfloat16)
  y = jax.jit(lambda x: _run(get_activation(name, **options), x, train=True))(x)
  chex.assert_shape(y, x.shape)
  chex.assert_type(y, jnp.bfloat16)
  chex.assert_tree_all_finite(y)


def test_module_name_is_used():
  act = get_activation("atac", reduction=2, name="act1")
  assert act.name == "act1"


MIN_RANK = {"xunit": 3}  # every other activation takes any channels-last rank >= 2


@pytest.mark.parametrize("shape", [(4, 8), (2, 5, 8), (2, 3, 4, 8), (2, 2, 3, 4, 8)])
@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_channels_last_ranks(name, shape):
  """``(N, C)``, ``(N, L, C)``, ``(N, H, W, C)``, ``(N, D, H, W, C)``; XUnit needs a spatial axis."""
  options = {"reduction": 2} if "reduction" in activation_options(name) else {}
  x = jax.random.normal(jax.random.key(0), shape)
  if len(shape) < MIN_RANK.get(name, 2):
    with pytest.raises(ValueError, match=r"rank >= 3 \(accepted: \(N, L, C\), \(N, H, W, C\)"):
      _run(get_activation(name, **options), x, train=True)
    return
  for train in (True, False):
    y = _run(get_activation(name, **options), x, train=train)
    chex.assert_shape(y, shape)
    chex.assert_tree_all_finite(y)


def test_prelu_sows_its_slope():
  prelu = get_activation("prelu")
  x = jnp.array([[-2.0, 3.0]])
  y, state = prelu.apply({"params": {"negative_slope": jnp.array([0.1])}}, x,
                         mutable=["intermediates"])
  np.testing.assert_allclose(y, [[-0.2, 3.0]], rtol=1e-6)
  np.testing.assert_allclose(state["intermediates"]["negative_slope"][0], [0.1])
