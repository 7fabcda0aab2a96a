"""One registry for every activation, with one calling convention: ``act(x, train=...)``.

>>> act = get_activation("atac", reduction=2)
>>> variables = act.init(rng, x, train=False)
>>> y, updates = act.apply(variables, x, train=True, mutable=["batch_stats"])

Parameter-free activations are returned as plain callables that accept and ignore ``train``; the
others are Flax linen modules, used inside a ``@nn.compact`` method like any submodule.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from atac_jax.layers import _conventions
from atac_jax.layers.arelu import AReLU
from atac_jax.layers.atac import ATAC
from atac_jax.layers.attention import SE, XUnit


class PReLU(nn.Module):
  """Parametric ReLU with one slope shared by all channels (He et al. 2015; init 0.25).

  Any input rank. Introspection: each call sows ``negative_slope`` (shape ``(1,)``) into the
  ``intermediates`` collection.

  Attributes:
    negative_slope_init: initial slope for negative inputs (parameter ``negative_slope``, shape
      ``(1,)``).
    dtype: computation and output dtype; ``None``: the promotion of input and parameter dtypes.
    param_dtype: parameter dtype.
    train: accepted for the common convention (the result does not depend on it); give it here
      or at call time, not both.
  """
  negative_slope_init: float = 0.25
  dtype: Any = None
  param_dtype: Any = jnp.float32
  train: bool | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
    """Applies ``max(x, 0) + slope * min(x, 0)``; ``train`` is accepted for the convention."""
    _conventions.merge_train(self.train, train, required=False)
    slope = self.param("negative_slope", nn.initializers.constant(self.negative_slope_init), (1,),
                       self.param_dtype)
    self.sow("intermediates", "negative_slope", slope)
    x, slope = nn.dtypes.promote_dtype(x, slope, dtype=self.dtype)
    return jnp.where(x >= 0, x, slope * x)


@dataclasses.dataclass(frozen=True)
class Elementwise:
  """A parameter-free activation with the common ``act(x, train=...)`` signature.

  ``train`` is accepted and ignored; the output has the input's dtype and shape (any rank).
  Registered activations pickle by name (``get_activation(name)`` on load), since some JAX
  activation functions cannot be pickled themselves.
  """
  name: str
  fn: Callable[[jax.Array], jax.Array]

  def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
    del train
    return self.fn(x)

  def __reduce__(self):
    if _FUNCTIONS.get(self.name) is self.fn:
      return get_activation, (self.name,)
    return Elementwise, (self.name, self.fn)


def mish(x: jnp.ndarray) -> jnp.ndarray:
  """Mish (Misra 2019): ``x * tanh(softplus(x))``."""
  return x * jnp.tanh(jax.nn.softplus(x))


_FUNCTIONS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    "relu": jax.nn.relu,
    "elu": jax.nn.elu,
    "selu": jax.nn.selu,
    # Exact (erf) GELU, as PyTorch's and MXNet's default; jax.nn.gelu defaults to the tanh form.
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "swish": jax.nn.swish,  # beta = 1, i.e. SiLU
    "mish": mish,
}

_MODULES: dict[str, Callable[..., nn.Module]] = {
    "prelu": PReLU,
    "arelu": AReLU,
    "atac": ATAC,
    "atac_global": functools.partial(ATAC, use_global=True),
    "xunit": XUnit,
    "se": SE,
}


def available_activations() -> tuple[str, ...]:
  """Names accepted by :func:`get_activation`, sorted."""
  return tuple(sorted({**_FUNCTIONS, **_MODULES}))


def _module_class(name: str) -> type[nn.Module]:
  factory = _MODULES[name]
  return factory.func if isinstance(factory, functools.partial) else factory


def activation_options(name: str) -> tuple[str, ...]:
  """Keyword options that ``get_activation(name, ...)`` accepts (besides ``name``).

  Raises:
    ValueError: if ``name`` is not a registered activation.
  """
  _check_name(name)
  if name in _FUNCTIONS:
    return ()
  fields = inspect.signature(_module_class(name)).parameters
  fixed = set(_MODULES[name].keywords) if isinstance(_MODULES[name], functools.partial) else set()
  return tuple(f for f in fields if f not in ("parent", "name") and f not in fixed)


def _check_name(name: str) -> None:
  if name not in _FUNCTIONS and name not in _MODULES:
    raise ValueError(
        f"Unknown activation {name!r}; accepted names: {', '.join(available_activations())}.")


def get_activation(name: str, /, **options: Any) -> Any:
  """Returns the activation ``name`` configured by ``options``.

  Args:
    name: one of :func:`available_activations`.
    **options: the unit's attributes (see :func:`activation_options`), e.g. ``reduction`` for
      ``atac``/``se``, ``alpha_init`` for ``arelu``, ``dtype``; ``name=`` names a module instance.

  Returns:
    A callable ``act(x, train=...)``: a linen Module for units with parameters or state, an
    :class:`Elementwise` wrapper for parameter-free functions.

  Raises:
    ValueError: for an unknown name or an option the activation does not take.
  """
  _check_name(name)
  module_name = options.pop("name", None)
  accepted = activation_options(name)
  unknown = sorted(set(options) - set(accepted))
  if unknown:
    raise ValueError(
        f"Activation {name!r} does not take option(s) {unknown}; accepted: "
        f"{list(accepted) or 'none'}.")
  if name in _FUNCTIONS:
    return Elementwise(name, _FUNCTIONS[name])
  return _MODULES[name](**options, name=module_name)
