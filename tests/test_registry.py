"""Registry: names, option validation, every model's forward pass, MAC counting, dtypes."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from atac_jax import models
from atac_jax.models import available_models, count_macs, count_params, create, init_shapes

EXPECTED = (
    [f"cifar_resnet{d}" for d in (8, 14, 20, 26, 32, 44, 56, 110)]
    + [f"resnet{d}" for d in (18, 34, 50, 101, 152)] + ["alexnet_cifar", "convnet_mnist"])

# name -> (input shape (H, W, C) of a small batch, whether to only trace it with eval_shape)
INPUTS = {
    **{n: ((8, 8, 3), False) for n in EXPECTED if n.startswith("cifar_resnet")},
    **{n: ((64, 64, 3), True) for n in EXPECTED if n.startswith("resnet")},
    "alexnet_cifar": ((64, 64, 3), False),
    "convnet_mnist": ((28, 28, 1), False),
}


def _key(seed: int) -> jax.Array:
  """A PRNG key; 'rbg' compiles much faster than threefry in eager CPU tests."""
  return jax.random.key(seed, impl="rbg")


def test_available_models():
  assert sorted(available_models()) == sorted(EXPECTED)
  assert set(INPUTS) == set(EXPECTED)


def _forward_both_modes(model, shape, *, abstract):
  """Initialises ``model`` and runs it in eval and in train mode on a batch of 2."""
  x = jnp.ones((2, *shape), jnp.float32)

  def run(x):
    variables = model.init(_key(0), x, train=False)
    logits = model.apply(variables, x, train=False)
    train_logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"],
                                        rngs={"dropout": _key(1)})
    return logits, train_logits, updates

  return jax.eval_shape(run, x) if abstract else run(x)


@pytest.mark.parametrize("name", EXPECTED)
def test_every_model_forward_train_and_eval(name):
  shape, abstract = INPUTS[name]
  logits, train_logits, updates = _forward_both_modes(create(name, num_classes=7), shape,
                                                      abstract=abstract)
  chex.assert_shape([logits, train_logits], (2, 7))
  assert logits.dtype == train_logits.dtype == jnp.float32
  has_bn = name.startswith(("cifar_resnet", "resnet"))
  assert bool(updates.get("batch_stats")) == has_bn
  if not abstract:
    chex.assert_tree_all_finite([logits, train_logits])


def test_unknown_name_lists_models():
  with pytest.raises(ValueError, match="accepted names: .*cifar_resnet20.*convnet_mnist"):
    create("vgg16", num_classes=10)


@pytest.mark.parametrize("name, accepted", [
    ("cifar_resnet21", "8, 14, 20, 26, 32, 44, 56, 110"),
    ("resnet20", "18, 34, 50, 101, 152"),
])
def test_bad_depth_lists_depths(name, accepted):
  with pytest.raises(ValueError, match=f"accepted depths: {accepted}"):
    create(name, num_classes=10)


def test_unknown_option_lists_options():
  with pytest.raises(ValueError, match=r"does not take option\(s\) \['width'\].*act_layers"):
    create("cifar_resnet8", num_classes=10, width=2)
  assert "awconv_stages" in models.model_options("resnet50")
  assert "awconv_stages" not in models.model_options("cifar_resnet8")


@pytest.mark.parametrize("kwargs, match", [
    (dict(act="nope"), "accepted names"),
    (dict(act="relu", act_options={"reduction": 2}), "accepted: none"),
    (dict(act_layers=5), r"act_layers must be an integer in \[0, 1, 2, 3, 4\]"),
    (dict(num_classes=0), "num_classes"),
])
def test_bad_option_values(kwargs, match):
  kwargs = {"num_classes": 10, **kwargs}
  with pytest.raises(ValueError, match=match):
    create("cifar_resnet8", **kwargs)


@pytest.mark.parametrize("name", ["cifar_resnet8", "resnet18", "alexnet_cifar", "convnet_mnist"])
def test_bad_input_rank(name):
  model = create(name, num_classes=10)
  with pytest.raises(ValueError, match=r"rank-4 NHWC batch \(N, H, W, C\)"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((32, 32, 3)), train=False))


def test_reduction_only_reaches_units_that_take_it():
  """``reduction`` is a model option; ReLU ignores it, SE and ATAC use it."""
  counts = {act: count_params(init_shapes(create("cifar_resnet8", num_classes=10, act=act,
                                                 reduction=4), (1, 8, 8, 3))["params"])
            for act in ("relu", "se", "atac")}
  assert counts["relu"] == 77_850
  assert counts["relu"] < counts["se"] < counts["atac"]


def test_jit_bfloat16_with_act_options():
  """Models built with dict options stay hashable; bf16 compute gives f32 params and logits."""
  model = create("cifar_resnet8", num_classes=10, act="atac", act_layers=1,
                 act_options={"inner_relu": False}, dtype=jnp.bfloat16)
  hash(model)
  x = jnp.ones((2, 8, 8, 3))
  variables = model.init(_key(0), x, train=False)
  assert {p.dtype for p in jax.tree.leaves(variables["params"])} == {jnp.dtype(jnp.float32)}
  step = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
  logits, _ = step(variables, x)
  chex.assert_shape(logits, (2, 10))
  assert logits.dtype == jnp.float32
  chex.assert_tree_all_finite(logits)
  assert "bf16" in str(jax.make_jaxpr(lambda v: model.apply(v, x, train=False))(variables))


def test_count_macs_counts_convs_and_dense_exactly():

  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, *, train):
      del train
      x = nn.Conv(4, (3, 3), strides=2, padding="SAME")(x)  # 4x4x4 outputs, 3*3*2 MACs each
      x = nn.relu(x).reshape(x.shape[0], -1)
      return nn.Dense(5)(x)  # 64 * 5

  assert count_macs(Tiny(), (8, 8, 2)) == 4 * 4 * 4 * 3 * 3 * 2 + 64 * 5


# MACs per image: (model, options, input shape, relu MACs, atac MACs).
MACS = [
    ("cifar_resnet20", {}, (32, 32, 3), 40_813_184, 45_793_920),
    ("resnet50", {"act_layers": 2, "reduction": 2}, (224, 224, 3), 4_089_184_256, 4_397_465_600),
    ("alexnet_cifar", {}, (128, 128, 3), 96_909_312, 107_370_496),
]


@pytest.mark.parametrize("name, options, shape, relu_macs, atac_macs", MACS)
def test_macs(name, options, shape, relu_macs, atac_macs):
  num_classes = 1000 if name == "resnet50" else 10
  assert count_macs(create(name, num_classes=num_classes), shape) == relu_macs
  assert count_macs(create(name, num_classes=num_classes, act="atac", **options),
                    shape) == atac_macs


def test_resnet50_macs_match_paper():
  """The ATAC paper quotes 4.09 G MACs for ResNet-50 and 4.40 G for ATAC-ResNet-50."""
  relu_macs, atac_macs = MACS[1][3:]
  assert (round(relu_macs / 1e9, 2), round(atac_macs / 1e9, 2)) == (4.09, 4.40)


class _Detector(nn.Module):
  """A parent module holding a registry model as a named submodule (a detection backbone)."""

  @nn.compact
  def __call__(self, x, *, train):
    features = create("resnet18", num_classes=1, return_features=True, name="backbone")(
        x, train=train)
    return nn.Dense(2, name="box_head")(jnp.mean(features["c5"], axis=(1, 2)))


@pytest.mark.parametrize("name", ["cifar_resnet20", "resnet18", "alexnet_cifar", "convnet_mnist"])
def test_create_takes_the_module_name(name):
  model = create(name, num_classes=10, name="backbone")
  assert model.name == "backbone"
  assert create(name, num_classes=10).name is None


def test_named_model_inside_a_parent():
  shapes = jax.eval_shape(lambda: _Detector().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                                   train=False))
  assert set(shapes["params"]) == {"backbone", "box_head"}
  assert "conv_init" in shapes["params"]["backbone"]


def test_check_input_lists_sizes_for_concrete_shapes():
  model = create("resnet18", num_classes=10)
  with pytest.raises(ValueError, match=r"at least 32x32 \(accepted: H, W >= 32\)"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 31, 3)), train=False))
