"""atac_jax.nnx: the NNX units and models against the linen implementation (a second path)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import atac_jax.nnx as anx
from atac_jax import layers, models

KEY = jax.random.key(0)


def _close(a, b, tol=1e-5):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=tol,
                                                       atol=tol), a, b)


def _perturbed(variables, seed=7):
  """Linen variables with every leaf moved off its initial value (so the mapping is exercised)."""
  leaves, tree = jax.tree.flatten(variables)
  rng = np.random.RandomState(seed)  # in NumPy: jax.random compiled once per leaf shape (~16 s)
  new = [jnp.asarray((np.asarray(v, np.float32) + 0.1 * rng.uniform(size=v.shape)).astype(v.dtype))
         for v in leaves]
  return jax.tree.unflatten(tree, new)


ATAC_CASES = [
    (dict(), (4, 3, 3, 8)), (dict(), (6, 8)), (dict(use_global=True), (4, 3, 3, 8)),
    (dict(use_bias=True, inner_relu=False), (4, 3, 3, 8)), (dict(memory_lean=False), (3, 5, 8)),
    (dict(reduction=4), (4, 3, 3, 8)), (dict(dtype=jnp.bfloat16), (4, 3, 3, 8)),
]


@pytest.mark.parametrize("options,shape", ATAC_CASES)
def test_atac_matches_linen_train_and_eval(options, shape):
  x = jax.random.normal(KEY, shape) * 2 + 0.5
  linen = layers.ATAC(**options)
  variables = _perturbed(linen.init(jax.random.key(1), x, train=False))
  unit = anx.from_linen(anx.ATAC(shape[-1], **options, rngs=nnx.Rngs(2)), variables)

  y_ref, updates = linen.apply(variables, x, train=True, mutable=["batch_stats"])
  y = unit(x)
  assert y.dtype == y_ref.dtype
  _close(y.astype(jnp.float32), y_ref.astype(jnp.float32))
  _close(anx.to_linen(unit)["batch_stats"], updates["batch_stats"])  # running stats moved alike

  unit.eval()
  evaluated = {"params": variables["params"], **updates}
  before = anx.to_linen(unit)
  _close(unit(x).astype(jnp.float32),
         linen.apply(evaluated, x, train=False).astype(jnp.float32))
  _close(anx.to_linen(unit), before)  # eval mode leaves the statistics alone


def test_atac_gradients_match_linen():
  x = jax.random.normal(KEY, (4, 2, 2, 8))
  linen = layers.ATAC()
  variables = _perturbed(linen.init(jax.random.key(1), x, train=False))
  unit = anx.from_linen(anx.ATAC(8, rngs=nnx.Rngs(0)), variables)

  def linen_loss(params):
    y, _ = linen.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
    return jnp.sum(jnp.sin(y))

  expected = jax.grad(linen_loss)(variables["params"])
  grads = nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(unit)
  holder = anx.ATAC(8, rngs=nnx.Rngs(0))
  nnx.update(holder, grads)
  _close(anx.to_linen(holder)["params"], expected)


def test_train_eval_and_call_override():
  unit = anx.ATAC(4, rngs=nnx.Rngs(0))
  assert unit.use_running_average is False  # training by default, as nnx.BatchNorm
  x = jax.random.normal(KEY, (8, 4)) + 3.0
  start = anx.to_linen(unit)["batch_stats"]
  y_eval = unit(x, use_running_average=True)
  _close(anx.to_linen(unit)["batch_stats"], start)
  unit(x)
  assert not np.allclose(anx.to_linen(unit)["batch_stats"]["bn_down"]["mean"],
                         start["bn_down"]["mean"])
  viewed = nnx.view(unit, use_running_average=True)
  assert viewed.use_running_average is True and unit.use_running_average is False
  _close(viewed(x), unit(x, use_running_average=True))
  seq = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(1)), unit)
  seq.eval()
  assert unit.use_running_average is True
  seq.train()
  assert unit.use_running_average is False
  assert y_eval.shape == x.shape


def test_atac_under_nnx_jit_updates_statistics():
  unit = anx.ATAC(4, rngs=nnx.Rngs(0))
  x = jax.random.normal(KEY, (8, 4)) + 3.0
  eager = anx.ATAC(4, rngs=nnx.Rngs(0))
  y = nnx.jit(lambda m, v: m(v))(unit, x)
  _close(y, eager(x))
  _close(anx.to_linen(unit), anx.to_linen(eager))


def test_round_trip_is_identity():
  x = jnp.ones((2, 8))
  variables = _perturbed(layers.ATAC(use_bias=True).init(KEY, x, train=False))
  unit = anx.from_linen(anx.ATAC(8, use_bias=True, rngs=nnx.Rngs(0)), variables)
  back = anx.to_linen(unit)
  assert jax.tree.structure(back) == jax.tree.structure(variables)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), back, variables)
  other = anx.from_linen(anx.ATAC(8, use_bias=True, rngs=nnx.Rngs(5)), back)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), nnx.state(other),
               nnx.state(unit))
  assert anx.to_linen(unit)["params"]["conv_down"]["kernel"].shape == (1, 1, 8, 4)
  assert unit.conv_down.kernel.get_value().shape == (8, 4)


def test_from_linen_rejects_mismatch_without_changing():
  unit = anx.ATAC(8, rngs=nnx.Rngs(0))
  before = anx.to_linen(unit)
  wrong = layers.ATAC(reduction=4).init(KEY, jnp.ones((2, 8)), train=False)
  with pytest.raises(ValueError, match="shape mismatch"):
    anx.from_linen(unit, wrong)
  with pytest.raises(ValueError, match="Missing"):
    anx.from_linen(unit, {"params": before["params"]})
  _close(anx.to_linen(unit), before)


def test_atac_bad_input():
  with pytest.raises(ValueError, match="in_features"):
    anx.ATAC(8, rngs=nnx.Rngs(0))(jnp.ones((2, 4)))
  with pytest.raises(ValueError, match="rank >= 2"):
    anx.ATAC(8, rngs=nnx.Rngs(0))(jnp.ones((8,)))
  with pytest.raises(ValueError, match="Divisors"):
    anx.ATAC(6, reduction=4, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name,cls,options", [
    ("arelu", layers.AReLU, dict(alpha_init=0.3, beta_init=-1.0)),
    ("prelu", layers.PReLU, dict(negative_slope_init=0.1)),
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_elementwise_units_match_linen(name, cls, options, dtype):
  x = jax.random.normal(KEY, (3, 5, 4)).astype(dtype)
  linen = cls(**options)
  variables = _perturbed(linen.init(KEY, x))
  unit = anx.get_activation(name, rngs=nnx.Rngs(0), **options)
  assert type(unit).__name__ == cls.__name__
  np.testing.assert_allclose(anx.to_linen(unit)["params"]["negative_slope" if name == "prelu"
                                                         else "alpha"],
                             [options.get("negative_slope_init", options.get("alpha_init"))])
  anx.from_linen(unit, variables)
  y = unit(x)
  assert y.dtype == linen.apply(variables, x).dtype
  _close(y.astype(jnp.float32), linen.apply(variables, x).astype(jnp.float32))


@pytest.mark.parametrize("name,options", [
    ("se", dict(reduction=2)), ("xunit", dict(kernel_size=3)), ("atac_global", dict(reduction=2))])
def test_registry_units_match_linen(name, options):
  x = jax.random.normal(KEY, (2, 5, 5, 8))
  linen = layers.get_activation(name, **options)
  variables = _perturbed(linen.init(KEY, x, train=False))
  unit = anx.from_linen(anx.get_activation(name, 8, rngs=nnx.Rngs(0), **options), variables)
  y_ref, updates = linen.apply(variables, x, train=True, mutable=["batch_stats"])
  _close(unit(x), y_ref)
  if updates:
    _close(anx.to_linen(unit)["batch_stats"], updates["batch_stats"])
  unit.eval()
  _close(unit(x), linen.apply({**variables, **updates}, x, train=False))


def test_get_activation_names_and_errors():
  assert anx.available_activations() == layers.available_activations()
  x = jnp.linspace(-3, 3, 12).reshape(2, 6)
  for name in ("relu", "gelu", "mish", "swish"):
    np.testing.assert_allclose(anx.get_activation(name)(x), layers.get_activation(name)(x))
  assert isinstance(anx.get_activation("atac", 6, rngs=nnx.Rngs(0), reduction=3), anx.ATAC)
  with pytest.raises(ValueError, match="accepted names"):
    anx.get_activation("softsign")
  with pytest.raises(ValueError, match="in_features"):
    anx.get_activation("atac", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="rngs"):
    anx.get_activation("arelu")
  with pytest.raises(ValueError, match="accepted"):
    anx.get_activation("atac", 8, rngs=nnx.Rngs(0), width=3)


def _loss(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def test_model_matches_linen_and_trains():
  x = jax.random.normal(KEY, (4, 8, 8, 3))
  labels = jnp.array([0, 1, 2, 3])
  model = anx.models.create("cifar_resnet8", num_classes=4, act="atac", rngs=nnx.Rngs(0),
                            input_shape=(8, 8, 3))
  linen = models.create("cifar_resnet8", num_classes=4, act="atac")
  variables = _perturbed(anx.to_linen(model))
  anx.from_linen(model, variables)

  y_ref, updates = jax.jit(functools.partial(linen.apply, train=True, mutable=["batch_stats"]))(
      variables, x)
  # Jitted (as the eval below): eagerly, each of ResNet-8's ops compiled on its own (~10 s);
  # the units' eager calls are compared with linen in the tests above.
  _close(nnx.jit(lambda m, v: m(v))(model, x), y_ref, tol=1e-4)
  _close(anx.to_linen(model)["batch_stats"], updates["batch_stats"], tol=1e-4)
  model.eval()
  _close(nnx.jit(lambda m, v: m(v))(model, x),
         jax.jit(functools.partial(linen.apply, train=False))({**variables, **updates}, x),
         tol=1e-4)

  model.train()
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, labels):
    loss, grads = nnx.value_and_grad(lambda m: _loss(m(x), labels))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer, x, labels)) for _ in range(4)]
  assert losses[-1] < losses[0]


def test_models_registry_errors():
  assert anx.models.available_models() == models.available_models()
  with pytest.raises(ValueError):
    anx.models.create("resnet7", num_classes=10, rngs=nnx.Rngs(0))


def test_awconv_wrapper_matches_linen():
  x = jax.random.normal(KEY, (2, 6, 6, 4))
  linen = layers.AWConv(features=6, kernel_size=3, reduction=2, use_bias=True)
  variables = _perturbed(linen.init(KEY, x))
  unit = anx.from_linen(anx.AWConv(4, 6, 3, reduction=2, use_bias=True, rngs=nnx.Rngs(0)),
                        variables)
  assert set(anx.to_linen(unit)) == {"params"}
  _close(unit(x), linen.apply(variables, x), tol=1e-4)


def test_nested_modules_convert_by_attribute_path():
  """A user's NNX container of native and wrapped units maps onto a linen module with the same
  submodule names (the wrapper's ``params`` attribute is the collection, not a path segment)."""
  import flax.linen as nn

  class LinenPair(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      return layers.SE(reduction=2, name="se")(layers.ATAC(name="unit")(x, train=train))

  class Pair(nnx.Module):
    def __init__(self, rngs):
      self.unit = anx.ATAC(8, rngs=rngs)
      self.se = anx.SE(8, reduction=2, rngs=rngs)

    def __call__(self, x):
      return self.se(self.unit(x))

  x = jax.random.normal(KEY, (2, 3, 3, 8))
  variables = _perturbed(LinenPair().init(KEY, x, train=False))
  pair = anx.from_linen(Pair(nnx.Rngs(0)), variables)
  assert set(anx.to_linen(pair)["params"]) == {"unit", "se"}
  y_ref, updates = LinenPair().apply(variables, x, train=True, mutable=["batch_stats"])
  _close(pair(x), y_ref)
  _close(anx.to_linen(pair)["batch_stats"], updates["batch_stats"])


def test_arelu_slopes():
  unit = anx.AReLU(alpha_init=1.5, beta_init=-1.0)
  negative, positive = unit.slopes()
  np.testing.assert_allclose(negative, [0.99])
  np.testing.assert_allclose(positive, [1 + 1 / (1 + np.exp(1.0))], rtol=1e-6)
  np.testing.assert_allclose(unit(jnp.array([-2.0, 3.0])), [-2 * 0.99, 3 * positive[0]],
                             rtol=1e-6)


@pytest.mark.parametrize("use_global", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_atac_gate_matches_linen_sown_gate(use_global, train):
  x = jax.random.normal(KEY, (4, 3, 3, 8))
  linen = layers.ATAC(use_global=use_global)
  variables = _perturbed(linen.init(KEY, x, train=False))
  unit = anx.from_linen(anx.ATAC(8, use_global=use_global, rngs=nnx.Rngs(0)), variables)
  _, state = linen.apply(variables, x, train=train, mutable=["intermediates", "batch_stats"])
  before = anx.to_linen(unit)
  _close(unit.gate(x, use_running_average=not train), state["intermediates"]["gate"][0])
  _close(anx.to_linen(unit), before)
