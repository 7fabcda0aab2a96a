"""CIFAR pre-activation ResNet-v2: exact parameter counts, layout, ATAC placement, training."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from atac_jax.models import CIFARResNetV2, count_params, create, init_shapes

# REFERENCE.md section 1: depth -> (ReLU 10 cls, ReLU 100 cls, ATAC r=2 100 cls, ATAC r=4 100 cls).
PARAM_COUNTS = {
    8: (77_850, 83_700, 95_428, 89_804),
    14: (175_066, 180_916, 204_068, 192_956),
    20: (272_282, 278_132, 312_708, 296_108),
    26: (369_498, 375_348, 421_348, 399_260),
    32: (466_714, 472_564, 529_988, 502_412),
}
SHAPE = (1, 32, 32, 3)


def _params(model, shape=SHAPE):
  return init_shapes(model, shape)["params"]


def _units_with(params, leaf_module):
  """Module paths (joined by '/') that own a submodule called ``leaf_module``."""
  paths = traverse_util.flatten_dict(params, sep="/")
  return {p.split(f"/{leaf_module}/")[0] for p in paths if f"/{leaf_module}/" in p}


@pytest.mark.parametrize("depth", sorted(PARAM_COUNTS))
def test_trainable_parameter_counts(depth):
  relu10, relu100, atac2, atac4 = PARAM_COUNTS[depth]
  name = f"cifar_resnet{depth}"
  assert count_params(_params(create(name, num_classes=10))) == relu10
  assert count_params(_params(create(name, num_classes=100))) == relu100
  assert count_params(_params(create(name, num_classes=100, act="atac", reduction=2))) == atac2
  assert count_params(_params(create(name, num_classes=100, act="atac", reduction=4))) == atac4


def test_layout():
  variables = init_shapes(create("cifar_resnet14", num_classes=10), SHAPE)
  params, stats = variables["params"], variables["batch_stats"]
  assert "bn_in" not in params  # input BN: no scale, no bias ...
  chex.assert_shape([stats["bn_in"]["mean"], stats["bn_in"]["var"]], (3,))  # ... but statistics
  chex.assert_shape(params["conv_in"]["kernel"], (3, 3, 3, 16))
  assert set(params) == {"conv_in", "bn_out", "head", *(f"stage{i}_block{j}" for i in (1, 2, 3)
                                                         for j in (1, 2))}
  # Projection shortcut (1x1 conv without BN) only where the shape changes; no conv has a bias.
  assert {k for k, v in params.items() if "shortcut" in v} == {"stage2_block1", "stage3_block1"}
  chex.assert_shape(params["stage2_block1"]["shortcut"]["kernel"], (1, 1, 16, 32))
  flat = traverse_util.flatten_dict(params)
  assert all(k[-1] == "kernel" for k in flat if k[-2].startswith(("conv", "shortcut")))
  assert set(params["stage1_block1"]) == {"bn1", "conv1", "bn2", "conv2"}


@pytest.mark.parametrize("act_layers, stages, head", [
    (4, {1, 2, 3}, True), (3, {2, 3}, True), (2, {3}, True), (1, set(), True), (0, set(), False),
])
def test_act_layers_placement(act_layers, stages, head):
  params = _params(create("cifar_resnet14", num_classes=10, act="atac", act_layers=act_layers))
  expected = {f"stage{i}_block{j}/act{k}" for i in stages for j in (1, 2) for k in (1, 2)}
  if head:
    expected.add("act_out")
  units = {p.rsplit("/conv_down", 1)[0] for p in traverse_util.flatten_dict(params, sep="/")
           if "/conv_down/" in p or p.startswith("act_out/conv_down")}
  assert units == expected


def test_act_widths_follow_the_block():
  """act1 acts on the block's input channels, act2 on its output channels."""
  params = _params(create("cifar_resnet8", num_classes=10, act="atac", reduction=2))
  chex.assert_shape(params["stage2_block1"]["act1"]["conv_down"]["kernel"], (1, 1, 16, 8))
  chex.assert_shape(params["stage2_block1"]["act2"]["conv_down"]["kernel"], (1, 1, 32, 16))
  chex.assert_shape(params["act_out"]["conv_up"]["kernel"], (1, 1, 32, 64))


def test_generic_depth_class_and_bad_depth():
  model = CIFARResNetV2(depth=38, num_classes=10)
  assert count_params(_params(model)) == 272_282 + 3 * 97_216  # 6 blocks per stage
  with pytest.raises(ValueError, match=r"depth must be 6b \+ 2 .*accepted: 8, 14, 20"):
    CIFARResNetV2(depth=21)


@pytest.mark.parametrize("shape, match", [
    ((2, 3, 8, 8, 3), "rank-4"),
    ((2, 3, 3, 3), r"at least 4x4 \(accepted: H, W >= 4\)"),
])
def test_bad_input(shape, match):
  model = create("cifar_resnet8", num_classes=10)
  with pytest.raises(ValueError, match=match):
    init_shapes(model, shape)


def test_channel_check_is_optional():
  """Any channel count by default (the offline quickstart uses 8x8x1 digits)."""
  params = _params(create("cifar_resnet8", num_classes=10), (1, 8, 8, 1))
  chex.assert_shape(params["conv_in"]["kernel"], (3, 3, 1, 16))
  with pytest.raises(ValueError, match="expects 3 input channel"):
    init_shapes(create("cifar_resnet8", num_classes=10, in_channels=3), (1, 8, 8, 1))


def test_jitted_training_reduces_loss():
  model = create("cifar_resnet8", num_classes=4, act="atac", reduction=2)
  images = np.random.default_rng(1).standard_normal((8, 8, 8, 3), dtype=np.float32)
  labels = jnp.arange(8) % 4
  variables = model.init(jax.random.key(0, impl="rbg"), images, train=False)
  tx = optax.adam(1e-2)

  @jax.jit
  def step(params, batch_stats, opt_state):
    def loss_fn(params):
      logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                    train=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, updates["batch_stats"]
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)
  losses = []
  for _ in range(5):
    params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0], losses
  # Running statistics moved, ATAC's included.
  before = variables["batch_stats"]["stage1_block1"]["act1"]["bn_down"]["mean"]
  after = batch_stats["stage1_block1"]["act1"]["bn_down"]["mean"]
  assert not jnp.allclose(before, after)
