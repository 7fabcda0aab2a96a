"""AlexNet for CIFAR-10 at 128x128 (Paddle AlexNet-ATAC reproduction): counts, layout, dropout."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from atac_jax.models import count_params, create, init_shapes
from atac_jax.models.alexnet import MIN_SIZE, output_size

SHAPE = (1, 128, 128, 3)


def _key(seed: int) -> jax.Array:
  """A PRNG key; 'rbg' compiles much faster than threefry in eager CPU tests."""
  return jax.random.key(seed, impl="rbg")


def test_counts_including_running_stats():
  relu = init_shapes(create("alexnet_cifar", num_classes=10), SHAPE)
  atac = init_shapes(create("alexnet_cifar", num_classes=10, act="atac", reduction=2), SHAPE)
  assert count_params(relu) == count_params(relu["params"]) == 7_524_042
  assert count_params(atac) == 7_638_002
  assert count_params(atac["params"]) == 7_635_938


def test_flatten_is_3x3x128_at_128():
  assert output_size(128) == 3
  params = init_shapes(create("alexnet_cifar", num_classes=10), SHAPE)["params"]
  chex.assert_shape(params["fc1"]["kernel"], (3 * 3 * 128, 2048))
  chex.assert_shape(params["conv1"]["kernel"], (11, 11, 3, 48))
  assert all("bias" in params[f"conv{i}"] for i in range(1, 6))


def test_atac_units_have_biases_and_bns():
  params = init_shapes(create("alexnet_cifar", num_classes=10, act="atac"), SHAPE)["params"]
  widths = {f"act{i}": c for i, c in enumerate((48, 128, 192, 192, 128), start=1)}
  for name, channels in widths.items():
    unit = params[name]
    assert set(unit) == {"conv_down", "bn_down", "conv_up", "bn_up"}
    chex.assert_shape(unit["conv_down"]["kernel"], (1, 1, channels, channels // 2))
    chex.assert_shape(unit["conv_down"]["bias"], (channels // 2,))
    chex.assert_shape(unit["conv_up"]["bias"], (channels,))
  no_bias = init_shapes(create("alexnet_cifar", num_classes=10, act="atac", act_bias=False),
                        SHAPE)["params"]
  assert "bias" not in no_bias["act1"]["conv_down"]


@pytest.mark.parametrize("act_layers, expected", [(5, {1, 2, 3, 4, 5}), (2, {4, 5}), (0, set())])
def test_act_layers_placement(act_layers, expected):
  params = init_shapes(create("alexnet_cifar", num_classes=10, act="arelu",
                              act_layers=act_layers), SHAPE)["params"]
  assert {k for k in params if k.startswith("act")} == {f"act{i}" for i in expected}


def test_dropout_in_train_mode():
  model = create("alexnet_cifar", num_classes=10)
  x = np.random.default_rng(0).standard_normal((2, 64, 64, 3), dtype=np.float32)
  variables = model.init(_key(1), x, train=False)
  eval_out = model.apply(variables, x, train=False)
  chex.assert_trees_all_close(eval_out, model.apply(variables, x, train=False))
  a = model.apply(variables, x, train=True, rngs={"dropout": _key(2)})
  b = model.apply(variables, x, train=True, rngs={"dropout": _key(3)})
  chex.assert_shape([a, b], (2, 10))
  assert not jnp.allclose(a, b)
  with pytest.raises(Exception, match="dropout"):
    model.apply(variables, x, train=True)


def test_minimum_input_size():
  assert MIN_SIZE == 57 and output_size(MIN_SIZE) == 1 and output_size(MIN_SIZE - 1) < 1
  model = create("alexnet_cifar", num_classes=10)
  with pytest.raises(ValueError, match=r"at least 57x57 \(accepted: H, W >= 57\)"):
    init_shapes(model, (1, 56, 56, 3))
  with pytest.raises(ValueError, match=r"expects 3 input channel\(s\)"):
    init_shapes(model, (1, 128, 128, 1))
  assert "fc1" in init_shapes(create("alexnet_cifar", num_classes=10, in_channels=None),
                              (1, 64, 64, 1))["params"]


def test_bfloat16_params_stay_float32():
  variables = init_shapes(create("alexnet_cifar", num_classes=10, act="atac",
                                 dtype=jnp.bfloat16), SHAPE)
  leaves = traverse_util.flatten_dict(variables)
  assert {v.dtype for v in leaves.values()} == {jnp.dtype(jnp.float32)}
