"""Units and models under JAX/Flax transformations: forward-mode autodiff and the ``train`` flag.

Forward mode (``jax.jvp``, ``jax.linearize``, ``jax.jacfwd``) is checked against reverse mode:
the JVP of a unit equals the Jacobian built row by row from VJPs (``jax.jacrev``) times the
tangent; for models, ``<u, J v>`` from the JVP equals ``<J^T u, v>`` from the VJP for random
cotangents ``u``. The ``train`` convention (constructor attribute or call argument, merged like
``nn.merge_param``) is checked in ``nn.Sequential``, ``nn.remat`` and ``nn.scan`` against the
plain call.
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from atac_jax import models
from atac_jax.layers import (ATAC, SE, AReLU, AWConv, Elementwise, PReLU, XUnit,
                             get_activation)
from conftest import randomize

# name -> (unit factory, input shape). Every unit.
UNITS = {
    "arelu": (AReLU, (2, 3, 3, 4)),
    "prelu": (PReLU, (2, 3, 3, 4)),
    "se": (functools.partial(SE, reduction=2), (2, 3, 3, 4)),
    "xunit": (XUnit, (2, 3, 3, 4)),
    "awconv": (functools.partial(AWConv, 5, 3, reduction=2), (2, 4, 4, 4)),
    "atac_global": (functools.partial(ATAC, reduction=2, use_global=True), (2, 3, 3, 4)),
    "atac": (functools.partial(ATAC, reduction=2), (2, 3, 3, 4)),
}
ELEMENTWISE = ("relu", "elu", "selu", "gelu", "swish", "mish")







def _unit_fn(name, train):
  """``f(params, x) -> (y, batch_stats updates)`` for unit ``name``, and its primals."""
  factory, shape = UNITS[name]
  unit = factory()
  x = jnp.asarray(np.random.RandomState(0).normal(size=shape), jnp.float32)
  variables = randomize(unit.init(jax.random.key(0), x, train=False), 1)
  batch_stats = variables.get("batch_stats", {})

  def f(params, x):
    y, updates = unit.apply({"params": params, "batch_stats": batch_stats}, x, train=train,
                            mutable=["batch_stats"])
    return y, updates
  return f, (variables["params"], x)


def _random_like(tree, seed):
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), tree)


def _jvp_matches_reverse_jacobian(f, primals, tangents, *, rtol=1e-4, atol=1e-5):
  """``jvp(f)``, ``linearize(f)`` and ``jacfwd(f)`` equal what ``jacrev(f)`` (VJPs) implies."""
  flat_primals, unravel_in = ravel_pytree(primals)
  flat_tangents, _ = ravel_pytree(tangents)

  def flat_f(z):
    return ravel_pytree(f(*unravel_in(z)))[0]

  @jax.jit
  def both_modes(z, v):
    _, tangent_out = jax.jvp(flat_f, (z,), (v,))
    linearized = jax.linearize(flat_f, z)[1](v)
    return tangent_out, linearized, jax.jacfwd(flat_f)(z), jax.jacrev(flat_f)(z)

  tangent_out, linearized, jac_fwd, jacobian = both_modes(flat_primals, flat_tangents)
  expected = jacobian @ flat_tangents  # the Jacobian built from one VJP per output element
  np.testing.assert_allclose(tangent_out, expected, rtol=rtol, atol=atol)
  np.testing.assert_allclose(linearized, expected, rtol=rtol, atol=atol)
  np.testing.assert_allclose(jac_fwd, jacobian, rtol=rtol, atol=atol)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("name", list(UNITS))
def test_unit_forward_mode_matches_reverse_mode(name, train):
  f, primals = _unit_fn(name, train)
  tangents = _random_like(primals, 2)
  _jvp_matches_reverse_jacobian(f, primals, tangents)


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_elementwise_forward_mode_matches_reverse_mode(name):
  act = get_activation(name)
  x = jnp.asarray(np.random.RandomState(0).normal(size=(2, 5)) * 2, jnp.float32)
  f = lambda x: act(x, train=True)
  _jvp_matches_reverse_jacobian(f, (x,), (_random_like(x, 1),))


MODEL_CASES = [  # (model, act, options, input shape, train)
    ("cifar_resnet8", "arelu", {}, (2, 4, 4, 3), False),
    ("cifar_resnet8", "se", {"reduction": 4}, (2, 4, 4, 3), True),
    ("cifar_resnet8", "xunit", {}, (2, 4, 4, 3), False),
    ("cifar_resnet8", "xunit", {}, (2, 4, 4, 3), True),
    ("cifar_resnet8", "atac", {"reduction": 2}, (2, 4, 4, 3), False),
    ("cifar_resnet8", "atac", {"reduction": 2}, (2, 4, 4, 3), True),
]


@pytest.mark.parametrize("name,act,options,shape,train", MODEL_CASES)
def test_model_forward_mode_matches_reverse_mode(name, act, options, shape, train):
  """``<u, J v>`` (jvp, linearize) equals ``<J^T u, v>`` (vjp) for random ``u`` and ``v``.

  In float64 (the models still return float32 logits), so rounding does not blur it. The tangent covers parameters and
  input together; the outputs are the logits and, in training, the ``batch_stats`` updates.
  ``jacfwd`` with respect to the input equals ``jacrev``.
  """
  with jax.enable_x64(True):
    model = models.create(name, num_classes=3, act=act, dtype=jnp.float64,
                          param_dtype=jnp.float64, **options)
    x = jnp.asarray(np.random.RandomState(0).normal(size=shape), jnp.float64)
    variables = model.init(jax.random.key(0), x, train=False)
    batch_stats = variables.get("batch_stats", {})

    def f(params, x):
      return model.apply({"params": params, "batch_stats": batch_stats}, x, train=train,
                         mutable=["batch_stats"])

    primals = (variables["params"], x)
    tangents = _random_like(primals, 1)
    out = jax.eval_shape(f, *primals)
    cotangents = [_random_like(out, 10 + seed) for seed in range(3)]

    @jax.jit
    def both_modes(primals, tangents, cotangents):
      _, tangent_out = jax.jvp(f, primals, tangents)
      linearized = jax.linearize(f, *primals)[1](*tangents)
      pullback = jax.vjp(f, *primals)[1]
      dot = lambda a, b: ravel_pytree(a)[0] @ ravel_pytree(b)[0]
      forward = jnp.stack([dot(u, tangent_out) for u in cotangents])
      reverse = jnp.stack([dot(pullback(u), tangents) for u in cotangents])
      logits = lambda x: f(primals[0], x)[0]
      return (tangent_out, linearized, forward, reverse, jax.jacfwd(logits)(primals[1]),
              jax.jacrev(logits)(primals[1]))

    tangent_out, linearized, forward, reverse, jac_fwd, jac_rev = both_modes(
        primals, tangents, cotangents)
    chex.assert_trees_all_close(linearized, tangent_out, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(forward, reverse, rtol=1e-6)
    np.testing.assert_allclose(jac_fwd, jac_rev, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------ train convention


def _call_at_call_time(name, x, variables, train):
  factory, _ = UNITS[name]
  return factory().apply(variables, x, train=train, mutable=["batch_stats"])


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("name", list(UNITS))
def test_constructor_train_equals_call_train(name, train):
  factory, shape = UNITS[name]
  x = jnp.asarray(np.random.RandomState(0).normal(size=shape), jnp.float32)
  variables = randomize(factory().init(jax.random.key(0), x, train=False), 1)
  expected = _call_at_call_time(name, x, variables, train)
  got = factory(train=train).apply(variables, x, mutable=["batch_stats"])
  chex.assert_trees_all_close(got, expected)
  # Positional, as flax's own flags (so nn.remat's static_argnums can name it).
  chex.assert_trees_all_close(factory().apply(variables, x, train, mutable=["batch_stats"]),
                              expected)


@pytest.mark.parametrize("name", list(UNITS))
def test_train_given_twice_raises(name):
  factory, shape = UNITS[name]
  x = jnp.zeros(shape)
  with pytest.raises(ValueError, match="train"):
    factory(train=True).init(jax.random.key(0), x, train=True)


@pytest.mark.parametrize("name", ["xunit", "atac"])
def test_units_with_batch_norm_need_train(name):
  factory, shape = UNITS[name]
  with pytest.raises(ValueError, match="train"):
    factory().init(jax.random.key(0), jnp.zeros(shape))


@pytest.mark.parametrize("name", ["arelu", "prelu", "se", "awconv"])
def test_units_without_batch_norm_do_not_need_train(name):
  factory, shape = UNITS[name]
  x = jnp.asarray(np.random.RandomState(0).normal(size=shape), jnp.float32)
  variables = factory().init(jax.random.key(0), x)
  chex.assert_trees_all_close(factory().apply(variables, x),
                              factory().apply(variables, x, train=True))


def test_elementwise_accepts_train_positionally():
  relu = get_activation("relu")
  assert isinstance(relu, Elementwise)
  x = jnp.array([-1.0, 2.0])
  np.testing.assert_array_equal(relu(x, True), [0.0, 2.0])
  np.testing.assert_array_equal(relu(x), [0.0, 2.0])


@pytest.mark.parametrize("name", ["xunit", "arelu", "prelu", "se", "awconv", "relu",
                                  "atac"])
def test_unit_in_sequential(name):
  """``nn.Sequential([nn.Conv, unit(train=True)])`` equals the two layers applied by hand."""
  unit = UNITS[name][0](train=True) if name in UNITS else get_activation(name)
  x = jnp.asarray(np.random.RandomState(0).normal(size=(2, 4, 4, 3)), jnp.float32)
  seq = nn.Sequential([nn.Conv(4, (3, 3)), unit])
  variables = seq.init(jax.random.key(0), x)
  y, updates = seq.apply(variables, x, mutable=["batch_stats"])
  conv = nn.Conv(4, (3, 3)).apply({"params": variables["params"]["layers_0"]}, x)
  if isinstance(unit, Elementwise):
    expected, expected_updates = unit(conv), {}
  else:
    unit_vars = {c: v["layers_1"] for c, v in variables.items()}
    expected, expected_updates = unit.apply(unit_vars, conv, mutable=["batch_stats"])
  np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(updates.get("batch_stats", {}).get("layers_1", {}),
                              expected_updates.get("batch_stats", {}))


class _Remat(nn.Module):
  """A parent using a rematerialised unit, configured with ``train`` at construction."""
  unit_name: str
  train: bool

  @nn.compact
  def __call__(self, x):
    return nn.remat(UNITS[self.unit_name][0])(train=self.train, name="unit")(x)


class _Plain(nn.Module):
  unit_name: str
  train: bool

  @nn.compact
  def __call__(self, x):
    return UNITS[self.unit_name][0](name="unit")(x, train=self.train)


@pytest.mark.parametrize("name", list(UNITS))
def test_remat_with_constructor_train(name):
  """``nn.remat(Unit)(train=True)``: values, ``batch_stats`` updates and gradients unchanged."""
  x = jnp.asarray(np.random.RandomState(0).normal(size=UNITS[name][1]), jnp.float32)
  variables = randomize(_Plain(name, False).init(jax.random.key(0), x), 1)

  def loss(params, module):
    y, updates = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
    return jnp.sum(y * jnp.cos(y)), updates

  expected = jax.value_and_grad(loss, has_aux=True)(variables["params"], _Plain(name, True))
  got = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(
      variables["params"], _Remat(name, True))
  # atol: BatchNorm parameter gradients that vanish up to float32 rounding (jit vs eager).
  chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-5)


def test_remat_with_static_call_train():
  x = jnp.asarray(np.random.RandomState(0).normal(size=(2, 3, 3, 4)), jnp.float32)
  variables = XUnit().init(jax.random.key(0), x, train=False)
  expected = XUnit().apply(variables, x, train=True, mutable=["batch_stats"])
  got = nn.remat(XUnit, static_argnums=(2,))().apply(variables, x, True, mutable=["batch_stats"])
  chex.assert_trees_all_close(got, expected, rtol=1e-6, atol=1e-6)


class _Step(nn.Module):
  """One scanned layer: ``carry -> unit(train=...)(carry)``."""
  make: object

  @nn.compact
  def __call__(self, carry, _):
    return self.make(name="unit")(carry), None


@pytest.mark.parametrize("name", ["xunit", "arelu", "se",
                                  "atac"])
def test_scan_over_layers_equals_applying_each_layer(name):
  """``nn.scan`` of a unit built with ``train=True``: equal to 3 layers applied in turn."""
  factory, shape = UNITS[name]
  make = functools.partial(factory, train=True)
  layers = 3
  scanned = nn.scan(_Step, variable_axes={"params": 0, "batch_stats": 0},
                    split_rngs={"params": True}, length=layers)(make)
  x = jnp.asarray(np.random.RandomState(0).normal(size=shape), jnp.float32)
  variables = randomize(scanned.init(jax.random.key(0), x, None), 1)
  (y, _), updates = scanned.apply(variables, x, None, mutable=["batch_stats"])

  expected, expected_stats = x, []
  for i in range(layers):
    layer_vars = jax.tree.map(lambda v: v[i], {c: v["unit"] for c, v in variables.items()})
    expected, new = factory().apply(layer_vars, expected, train=True, mutable=["batch_stats"])
    expected_stats.append(new.get("batch_stats", {}))
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
  if name == "xunit":
    stacked = jax.tree.map(lambda *v: jnp.stack(v), *expected_stats)
    chex.assert_trees_all_close(updates["batch_stats"]["unit"], stacked, rtol=1e-5, atol=1e-6)


MODEL_TRAIN_CASES = [
    ("cifar_resnet8", {"act": "xunit"}, (2, 8, 8, 3)),
    ("resnet18", {"awconv_stages": (3,), "act": "arelu"}, (2, 32, 32, 3)),
    ("convnet_mnist", {"act": "prelu"}, (2, 28, 28, 1)),
    ("alexnet_cifar", {"act": "se"}, (2, 64, 64, 3)),
]


def _remat(model):
  """``nn.remat`` of the model's class with the model's own attributes (``train`` included)."""
  fields = {f: getattr(model, f) for f in model.__dataclass_fields__
            if f not in ("parent", "name")}
  return nn.remat(type(model))(**fields)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("name,options,shape", MODEL_TRAIN_CASES)
def test_model_train_attribute_is_the_call_argument(name, options, shape, train):
  """``create(..., train=t)`` (also under ``nn.remat``) traces the program of ``apply(train=t)``.

  Equal programs give equal results; tracing abstractly keeps this fast for every model. Giving
  ``train`` twice, or not at all, raises.
  """
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  model = models.create(name, num_classes=3, **options)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  rngs = {"dropout": jax.random.key(1)}

  def program(module, **kwargs):
    return str(jax.make_jaxpr(lambda v, x: module.apply(v, x, rngs=rngs, mutable=["batch_stats"],
                                                        **kwargs))(variables, x))

  expected = program(model, train=train)
  with_attribute = models.create(name, num_classes=3, train=train, **options)
  assert program(with_attribute) == expected
  jax.eval_shape(lambda v, x: _remat(with_attribute).apply(v, x, rngs=rngs,
                                                            mutable=["batch_stats"]),
                 variables, x)
  with pytest.raises(ValueError, match="train"):
    program(with_attribute, train=train)
  with pytest.raises(ValueError, match="train"):
    program(model)


def test_remat_model_with_train_attribute_gives_equal_values_and_gradients():
  x = jnp.asarray(np.random.RandomState(0).normal(size=(4, 8, 8, 3)), jnp.float32)
  model = models.create("cifar_resnet8", num_classes=3, act="xunit")
  variables = model.init(jax.random.key(0), x, train=False)

  def loss(params, module, **kwargs):
    logits, updates = module.apply({**variables, "params": params}, x, mutable=["batch_stats"],
                                   **kwargs)
    return jnp.sum(logits ** 2), updates

  grad = jax.value_and_grad(loss, has_aux=True)
  expected = jax.jit(functools.partial(grad, module=model, train=True))(variables["params"])
  remat = _remat(models.create("cifar_resnet8", num_classes=3, act="xunit", train=True))
  got = jax.jit(functools.partial(grad, module=remat))(variables["params"])
  chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-5)
