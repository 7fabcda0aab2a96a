"""ImageNet ResNet v1b: exact parameter counts, ATAC placement, zero-gamma, AW-conv, backbones."""

import chex
import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util

from atac_jax.models import ResNet, count_params, create, init_shapes

SHAPE = (1, 224, 224, 3)
# torchvision's counts for the plain networks; REFERENCE.md for ResNet-50 and ATAC-ResNet-50.
RELU_COUNTS = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032, 101: 44_549_160,
               152: 60_192_808}


def _params(model, shape=SHAPE):
  return init_shapes(model, shape)["params"]


def _act_units(params):
  """Paths ``stageS_blockJ/actK`` of the activation units that have parameters."""
  return {"/".join(k[:2]) for k in traverse_util.flatten_dict(params) if k[1].startswith("act")}


@pytest.mark.parametrize("depth", [18, 50])
def test_relu_parameter_counts(depth):
  assert count_params(_params(create(f"resnet{depth}", num_classes=1000))) == RELU_COUNTS[depth]


def test_atac_resnet50_parameter_count():
  model = create("resnet50", num_classes=1000, act="atac", act_layers=2, reduction=2)
  assert count_params(_params(model)) == 27_934_760


@pytest.mark.parametrize("act_layers, stages", [(4, {1, 2, 3, 4}), (2, {3, 4}), (1, {4}),
                                                (0, set())])
def test_act_layers_placement(act_layers, stages):
  params = _params(create("resnet50", num_classes=10, act="atac", act_layers=act_layers))
  blocks = {1: 3, 2: 4, 3: 6, 4: 3}
  expected = {f"stage{s}_block{j}/act{k}" for s in stages for j in range(1, blocks[s] + 1)
              for k in (1, 2)}
  assert _act_units(params) == expected
  if act_layers == 2:
    assert len(expected) == 18  # the paper's model: layer3 + layer4
    # relu1 of the first stage-3 block sees the 28x28 input width 256, relu2 the strided output.
    chex.assert_shape(params["stage3_block1"]["act1"]["conv_down"]["kernel"], (1, 1, 256, 128))


def test_basic_block_replaces_only_the_inner_relu():
  params = _params(create("resnet18", num_classes=10, act="prelu"))
  assert _act_units(params) == {f"stage{s}_block{j}/act1" for s in range(1, 5) for j in (1, 2)}


def test_layout_and_shortcuts():
  params = _params(create("resnet50", num_classes=10))
  chex.assert_shape(params["conv_init"]["kernel"], (7, 7, 3, 64))
  chex.assert_shape(params["stage2_block1"]["conv2"]["kernel"], (3, 3, 128, 128))
  shortcuts = {k for k, v in params.items() if "downsample_conv" in v}
  assert shortcuts == {f"stage{s}_block1" for s in range(1, 5)}
  assert set(params["stage1_block1"]["downsample_bn"]) == {"scale", "bias"}
  chex.assert_shape(params["fc"]["kernel"], (2048, 10))


def test_stride_on_the_3x3_conv():
  """v1b: the first 1x1 conv of a strided block runs at full resolution, the 3x3 conv strides."""
  model = ResNet(depth=50, num_classes=10)
  x = jnp.zeros((1, 64, 64, 3))
  _, state = jax.eval_shape(
      lambda: model.init_with_output(jax.random.key(0), x, train=False,
                                     capture_intermediates=lambda m, _: m.name in ("conv1",
                                                                                   "conv2")))
  inter = state["intermediates"]["stage2_block1"]
  chex.assert_shape(inter["conv1"]["__call__"][0], (1, 16, 16, 128))
  chex.assert_shape(inter["conv2"]["__call__"][0], (1, 8, 8, 128))


@pytest.mark.parametrize("zero_init", [True, False])
def test_zero_init_last_bn(zero_init):
  x = jnp.zeros((1, 32, 32, 3))
  for depth, last in ((18, "bn2"), (50, "bn3")):
    model = create(f"resnet{depth}", num_classes=10, zero_init_last_bn=zero_init)

    @jax.jit
    def bn_scales(model=model, last=last):
      # Only the BN scales leave the jitted init, so XLA drops the rest of the work.
      params = model.init(jax.random.key(0), x, train=False)["params"]
      return {name: {bn: block[bn]["scale"] for bn in block if bn.endswith("bn")
                     or bn.startswith("bn")} for name, block in params.items()
              if name.startswith("stage")}

    for name, block in bn_scales().items():
      assert bool(jnp.all(block[last] == 0)) == zero_init, (depth, name)
      others = [scale for bn, scale in block.items() if bn != last]
      assert all(bool(jnp.all(scale == 1)) for scale in others), (depth, name)


def test_awconv_stages():
  params = _params(create("resnet50", num_classes=10, awconv_stages=(2, 3)), (1, 64, 64, 3))
  aw = {"/".join(k[:2]) for k in traverse_util.flatten_dict(params) if "attention" in k}
  assert aw == {f"stage{s}_block{j}/conv2" for s, n in ((3, 6), (4, 3)) for j in range(1, n + 1)}
  chex.assert_shape(params["stage4_block1"]["conv2"]["kernel"], (3, 3, 512, 512))
  with pytest.raises(ValueError, match=r"awconv_stages must be a subset of \[0, 1, 2, 3\]"):
    create("resnet50", num_classes=10, awconv_stages=(4,))


def test_awconv_forward_traces():
  """Train- and eval-mode forward passes with ATAC and AW-convs trace to the right shapes."""
  model = create("resnet18", num_classes=5, act="atac", act_layers=1, awconv_stages=(3,))
  x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  variables = init_shapes(model, x.shape)
  for train in (False, True):
    logits, _ = jax.eval_shape(
        lambda v, x, t=train: model.apply(v, x, train=t, mutable=["batch_stats"]), variables, x)
    chex.assert_shape(logits, (2, 5))


@pytest.mark.parametrize("depth, channels", [(18, (64, 128, 256, 512)),
                                             (50, (256, 512, 1024, 2048))])
def test_return_features(depth, channels):
  model = create(f"resnet{depth}", num_classes=10, return_features=True)
  x = jax.ShapeDtypeStruct((2, 128, 96, 3), jnp.float32)
  variables = init_shapes(model, x.shape)
  assert "fc" not in variables["params"]
  features = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  assert list(features) == ["c2", "c3", "c4", "c5"]
  for (key, feature), stride, width in zip(features.items(), (4, 8, 16, 32), channels):
    chex.assert_shape(feature, (2, 128 // stride, 96 // stride, width))


@pytest.mark.parametrize("shape, match", [
    ((1, 64, 64, 1), r"expects 3 input channel\(s\)"),
    ((1, 16, 16, 3), "at least 32x32"),
])
def test_bad_input(shape, match):
  with pytest.raises(ValueError, match=match):
    init_shapes(create("resnet18", num_classes=10), shape)


def test_bad_depth():
  with pytest.raises(ValueError, match=r"depth must be one of \[18, 34, 50, 101, 152\]"):
    ResNet(depth=20)
