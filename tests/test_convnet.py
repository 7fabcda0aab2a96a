"""ConvMNIST (the AReLU paper's MNIST network) with any activation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atac_jax.models import count_params, create, init_shapes

SHAPE = (1, 28, 28, 1)
RELU_PARAMS = 260 + 5_020 + 7_240 + 410  # conv1, conv2, conv3, Linear(40, 10)


def test_relu_parameter_count_and_linear_40():
  params = init_shapes(create("convnet_mnist", num_classes=10), SHAPE)["params"]
  assert count_params(params) == RELU_PARAMS == 12_930
  chex.assert_shape(params["fc"]["kernel"], (40, 10))
  chex.assert_shape([params["conv1"]["kernel"], params["conv2"]["kernel"],
                     params["conv3"]["kernel"]], [(5, 5, 1, 10), (5, 5, 10, 20), (3, 3, 20, 40)])


def test_arelu_adds_two_scalars_per_unit():
  params = init_shapes(create("convnet_mnist", num_classes=10, act="arelu"), SHAPE)["params"]
  assert count_params(params) == RELU_PARAMS + 3 * 2
  assert {k for k in params if k.startswith("act")} == {"act1", "act2", "act3"}
  one_unit = init_shapes(create("convnet_mnist", num_classes=10, act="arelu", act_layers=1),
                         SHAPE)["params"]
  assert {k for k in one_unit if k.startswith("act")} == {"act3"}


# relu runs in tests/test_registry.py, ATAC in tests/test_cifar_resnet.py.
@pytest.mark.parametrize("act", ["arelu", "prelu"])
def test_forward_with_any_activation(act):
  model = create("convnet_mnist", num_classes=10, act=act)
  x = np.random.default_rng(0).standard_normal((2, *SHAPE[1:]), dtype=np.float32)
  variables = model.init(jax.random.key(1, impl="rbg"), x, train=False)
  logits = model.apply(variables, x, train=False)
  train_logits, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
  chex.assert_shape([logits, train_logits], (2, 10))
  chex.assert_tree_all_finite([logits, train_logits])


def test_no_batchnorm_for_plain_activations():
  variables = init_shapes(create("convnet_mnist", num_classes=10, act="arelu"), SHAPE)
  assert set(variables) == {"params"}


@pytest.mark.parametrize("shape, match", [
    ((1, 27, 27, 1), r"at least 28x28 \(accepted: H, W >= 28\)"),
    ((1, 28, 28, 3), r"expects 1 input channel\(s\)"),
    ((28, 28, 1), "rank-4"),
])
def test_bad_input(shape, match):
  with pytest.raises(ValueError, match=match):
    init_shapes(create("convnet_mnist", num_classes=10), shape)


def test_larger_inputs_widen_the_linear():
  params = init_shapes(create("convnet_mnist", num_classes=10), (1, 36, 36, 1))["params"]
  chex.assert_shape(params["fc"]["kernel"], (40 * 2 * 2, 10))  # 36->32->16->12->6->4->2
