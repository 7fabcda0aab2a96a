"""Model registry (``create``, ``available_models``) and model statistics (parameters, MACs).

>>> model = create("cifar_resnet20", num_classes=10, act="atac", reduction=2)
>>> variables = model.init(rng, jnp.zeros((1, 32, 32, 3)), train=False)
>>> logits = model.apply(variables, images, train=False)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

from atac_jax.layers import arelu
from atac_jax.models import _common
from atac_jax.models.alexnet import AlexNet
from atac_jax.models.cifar_resnet import CIFARResNetV2
from atac_jax.models.convnet import ConvMNIST
from atac_jax.models.resnet import STAGE_SIZES, ResNet

CIFAR_DEPTHS = (8, 14, 20, 26, 32, 44, 56, 110)
IMAGENET_DEPTHS = tuple(sorted(STAGE_SIZES))

_MODELS: dict[str, Callable[..., nn.Module]] = {
    **{f"cifar_resnet{d}": functools.partial(CIFARResNetV2, depth=d) for d in CIFAR_DEPTHS},
    **{f"resnet{d}": functools.partial(ResNet, depth=d) for d in IMAGENET_DEPTHS},
    "alexnet_cifar": AlexNet,
    "convnet_mnist": ConvMNIST,
}

# Fixed by the model name, so not accepted as options.
_FIXED_FIELDS = ("parent", "name", "depth", "num_classes", "act")
# Options given as mutable containers are frozen so the module stays hashable.
_FREEZE = {"act_options": _common.freeze_options, "awconv_stages": tuple}


def available_models() -> tuple[str, ...]:
  """Names accepted by :func:`create`, in registry order."""
  return tuple(_MODELS)


def model_options(name: str) -> tuple[str, ...]:
  """Keyword options that ``create(name, ...)`` accepts besides ``num_classes`` and ``act``.

  Raises:
    ValueError: for an unknown model name.
  """
  _check_name(name)
  factory = _MODELS[name]
  cls = factory.func if isinstance(factory, functools.partial) else factory
  return tuple(f.name for f in dataclasses.fields(cls)
               if f.init and f.name not in _FIXED_FIELDS)


def _check_name(name: str) -> None:
  if name in _MODELS:
    return
  for family, depths, rule in (("cifar_resnet", CIFAR_DEPTHS, "depth 6b + 2; any such depth via "
                                "atac_jax.models.CIFARResNetV2(depth=...)"),
                               ("resnet", IMAGENET_DEPTHS, "ImageNet ResNet v1b")):
    match = re.fullmatch(rf"{family}(\d+)", str(name))
    if match:
      raise ValueError(f"No {family} of depth {match.group(1)}; accepted depths: "
                       f"{', '.join(map(str, depths))} ({rule}).")
  raise ValueError(f"Unknown model {name!r}; accepted names: {', '.join(_MODELS)}.")


def create(name: str, /, *, num_classes: int, act: str = "relu", **options: Any) -> nn.Module:
  """Builds the host network ``name``.

  Args:
    name: one of :func:`available_models` (positional).
    num_classes: classifier outputs.
    act: activation name (``atac_jax.layers.available_activations``).
    **options: model options (:func:`model_options`), e.g. ``reduction``, ``act_layers``,
      ``act_options``, ``dtype``, ``param_dtype``, ``train``; ResNet also ``zero_init_last_bn``,
      ``awconv_stages``, ``return_features``. ``name=`` names the module instance (e.g.
      ``create("resnet18", num_classes=10, name="backbone")`` inside a parent module).

  Returns:
    An unbound linen Module, called as ``model.apply(variables, x, train=...)`` on NHWC input.

  Raises:
    ValueError: for an unknown name, an unknown option, or an invalid option value.
  """
  _check_name(name)
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"{name}: num_classes must be an integer >= 1, got {num_classes!r}.")
  module_name = options.pop("name", None)
  accepted = model_options(name)
  unknown = sorted(set(options) - set(accepted))
  if unknown:
    raise ValueError(f"{name} does not take option(s) {unknown}; accepted: "
                     f"{[*accepted, 'name']}.")
  options = {k: _FREEZE[k](v) if k in _FREEZE else v for k, v in options.items()}
  return _MODELS[name](num_classes=num_classes, act=act, name=module_name, **options)


def count_params(tree: Any) -> int:
  """Number of scalars in a pytree of arrays (or ``jax.ShapeDtypeStruct``), e.g. ``params``."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def init_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> Any:
  """Variable shapes of ``model`` for NHWC ``input_shape`` without computing anything."""
  x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)


def count_macs(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
  """Multiply-accumulates per image of an eval-mode forward pass.

  Counted exactly from the traced program: every ``conv_general_dilated`` (output elements x
  kernel window x input channels per group) and ``dot_general`` (output elements x contracted
  size), i.e. convolutions, dense layers and the point-wise convolutions inside attention units.
  Element-wise work (BatchNorm, activations, gates, pooling) is not counted, matching how papers
  quote MACs/"FLOPs" (ResNet-50: 4.09 G). Nested programs are walked (a ``scan`` body counts
  ``length`` times; every branch of a ``cond`` counts, an upper bound).

  Args:
    model: a linen Module called as ``model.apply(variables, x, train=False)``.
    input_shape: ``(H, W, C)`` of one image.
  """
  shape = (1, *input_shape)
  variables = init_shapes(model, shape)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  jaxpr = jax.make_jaxpr(functools.partial(model.apply, train=False))(variables, x)
  return _jaxpr_macs(jaxpr.jaxpr)


def _eqn_macs(eqn: Any) -> int:
  if eqn.primitive.name == "conv_general_dilated":
    rhs = eqn.invars[1].aval.shape
    out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
    return math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) // rhs[out_feature_dim]
  if eqn.primitive.name == "dot_general":
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
  return 0


def _jaxpr_macs(jaxpr: Any) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    total += _eqn_macs(eqn)
    repeat = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax_core.ClosedJaxpr):
          total += repeat * _jaxpr_macs(sub.jaxpr)
        elif isinstance(sub, jax_core.Jaxpr):
          total += repeat * _jaxpr_macs(sub)
  return total


def learned_scalars(params: Any) -> dict[str, float]:
  """The learned scalars of a network's units, for logging: metric name -> value.

  Today AReLU's ``alpha`` and ``beta`` per unit, as ``arelu/<module path>/{alpha,beta}``.

  Units are found by AReLU's parameter contract (``atac_jax.layers.arelu.is_arelu_params``: a
  module whose parameters are exactly ``alpha`` and ``beta`` of shape (1,)), not by any
  parameter that happens to be named ``alpha`` or ``beta``. Raw parameter values (the slopes are
  ``atac_jax.layers.arelu.slopes(alpha, beta)``). Empty for models without AReLU.
  """
  found = {}

  def visit(node: Any, path: tuple[str, ...]) -> None:
    if arelu.is_arelu_params(node):
      for name in sorted(node):
        found["/".join(("arelu", *path, name))] = node[name]
    elif hasattr(node, "items"):
      for key, child in node.items():
        visit(child, (*path, str(key)))

  visit(params, ())
  return {name: float(np.asarray(value).reshape(-1)[0])
          for name, value in jax.device_get(found).items()}
