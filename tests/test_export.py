"""``jax.export`` of every model family in eval mode, with symbolic batch (and height and width).

The smallest member of each family keeps this fast: ``cifar_resnet8`` (the deeper CIFAR ResNets
repeat the same blocks), ``resnet18`` with AW-convolutions (ResNet-34/50/... only add blocks),
``alexnet_cifar`` and ``convnet_mnist``. AlexNet and ConvMNIST flatten their last feature map into
a dense layer whose parameter shape fixes the input size, so only their batch is symbolic.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from atac_jax import models
from atac_jax.layers import AWConv, adaptive_avg_pool

# (model, options, symbolic input shape, concrete shapes to run)
CASES = [
    ("cifar_resnet8", {"act": "xunit"}, "b, h, w, 3", [(1, 8, 8, 3), (3, 12, 20, 3)]),
    ("cifar_resnet8", {"act": "se", "reduction": 4}, "b, h, w, 3", [(2, 10, 6, 3)]),
    ("cifar_resnet8", {"act": "atac", "reduction": 2}, "b, h, w, 3", [(2, 10, 6, 3)]),
    # In float64: at random init the logits reach ~300 and the AW-conv's summation order differs
    # between the symbolic (patches) and the concrete (feature-group) batch.
    ("resnet18", {"act": "arelu", "awconv_stages": (2, 3), "dtype": jnp.float64,
                  "param_dtype": jnp.float64}, "b, h, w, 3", [(1, 32, 32, 3), (2, 40, 56, 3)]),
    ("alexnet_cifar", {"act": "prelu"}, "b, 64, 64, 3", [(1, 64, 64, 3), (3, 64, 64, 3)]),
    ("convnet_mnist", {"act": "arelu"}, "b, 28, 28, 1", [(1, 28, 28, 1), (4, 28, 28, 1)]),
]


@pytest.mark.parametrize("name,options,spec,sizes", CASES)
def test_export_with_symbolic_shapes_matches_apply(name, options, spec, sizes):
  with jax.enable_x64(options.get("dtype") == jnp.float64):
    model = models.create(name, num_classes=5, **options)
    dtype = options.get("dtype", jnp.float32)
    variables = model.init(jax.random.key(0), jnp.zeros((1, *sizes[0][1:]), dtype), train=False)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    symbolic = jax.ShapeDtypeStruct(export.symbolic_shape(spec), dtype)
    exported = export.export(apply)(variables, symbolic)
    for i, shape in enumerate(sizes):
      x = jnp.asarray(np.random.RandomState(i).normal(size=shape), dtype)
      np.testing.assert_allclose(exported.call(variables, x), apply(variables, x), rtol=1e-5,
                                 atol=1e-5)


def test_symbolic_size_check_uses_the_constraints():
  """Undecidable sizes are not checked; constraints that rule a size out raise as before."""
  model = models.create("resnet18", num_classes=5)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                                train=False))
  apply = lambda v, x: model.apply(v, x, train=False)
  too_small = export.symbolic_shape("b, h, w, 3", constraints=("h <= 16",))
  with pytest.raises(ValueError, match="at least 32x32"):
    export.export(jax.jit(apply))(variables, jax.ShapeDtypeStruct(too_small, jnp.float32))
  with pytest.raises(ValueError, match="at least 32x32"):
    model.apply(variables, jnp.zeros((1, 16, 40, 3)), train=False)


@pytest.mark.parametrize("impl", ["grouped", "vmap", "patches"])
def test_awconv_symbolic_shapes(impl):
  """Feature-group convolutions need a static batch; a symbolic one takes the patches path.

  Strided 'SAME' padding depends on the parity of the size, so strided layers use explicit
  padding (as the ResNets' AW-convolutions do).
  """
  layer = AWConv(4, 3, strides=2, padding=1, reduction=2, impl=impl)
  x = jnp.asarray(np.random.RandomState(0).normal(size=(3, 9, 7, 4)), jnp.float32)
  variables = layer.init(jax.random.key(0), x)
  symbolic = jax.ShapeDtypeStruct(export.symbolic_shape("b, h, w, 4"), jnp.float32)
  exported = export.export(jax.jit(layer.apply))(variables, symbolic)
  for x in (x, x[:1, :5, :6]):
    np.testing.assert_allclose(exported.call(variables, x), layer.apply(variables, x),
                               rtol=1e-5, atol=1e-5)


def test_adaptive_avg_pool_after_strided_layers_exports_fast():
  """Bins from run-time weights, not nested symbolic slice bounds (those took minutes)."""
  def f(x):
    for _ in range(5):
      x = x[:, ::2, ::2]
    return adaptive_avg_pool(x, (3, 3))
  x = jnp.asarray(np.random.RandomState(0).normal(size=(2, 100, 70, 3)), jnp.float32)
  exported = export.export(jax.jit(f))(
      jax.ShapeDtypeStruct(export.symbolic_shape("b, h, w, 3"), jnp.float32))
  np.testing.assert_allclose(exported.call(x), f(x), rtol=1e-6)
