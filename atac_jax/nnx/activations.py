"""AReLU, PReLU and the activation registry as Flax NNX modules.

>>> act = get_activation("atac", 16, reduction=2, rngs=nnx.Rngs(0))
>>> y = act(x)                       # training mode (batch statistics) until act.eval()

Elementwise activations come back as the linen registry's parameter-free callables; SE and XUnit
(not yet native) as :class:`~atac_jax.nnx.LinenModule` wrappers of the linen units.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from atac_jax.layers import activations as linen_activations
from atac_jax.layers.arelu import ALPHA_RANGE
from atac_jax.nnx.atac import ATAC
from atac_jax.nnx.wrapped import SE, XUnit


class AReLU(nnx.Module):
  """AReLU (Chen et al. 2020): ``clamp(alpha, 0.01, 0.99) * x`` for ``x < 0``,
  ``(1 + sigmoid(beta)) * x`` for ``x >= 0``; NNX twin of :class:`atac_jax.layers.AReLU`.

  Variables: ``alpha``, ``beta`` (Param, shape ``(1,)``; same names in linen ``params``).

  Args:
    alpha_init: initial ``alpha``.
    beta_init: initial ``beta``.
    dtype: computation dtype; None: the promotion of input and parameter dtypes.
    param_dtype: parameter dtype.
    rngs: accepted for the common signature (unused: the initial values are constants).
  """

  def __init__(self, *, alpha_init: float = 0.9, beta_init: float = 2.0, dtype: Any = None,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs | None = None):
    del rngs
    self.alpha = nnx.Param(jnp.full((1,), alpha_init, param_dtype))
    self.beta = nnx.Param(jnp.full((1,), beta_init, param_dtype))
    self.dtype = dtype

  def slopes(self) -> tuple[jax.Array, jax.Array]:
    """``(negative_slope, positive_slope)`` = ``(clip(alpha, 0.01, 0.99), 1 + sigmoid(beta))``,
    each of shape ``(1,)``, in ``param_dtype``."""
    alpha, beta = self.alpha.get_value(), self.beta.get_value()
    return jnp.clip(alpha, *ALPHA_RANGE), 1 + jax.nn.sigmoid(beta)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies AReLU element-wise."""
    x, negative_slope, positive_slope = nnx.nn.dtypes.promote_dtype(
        (x, *self.slopes()), dtype=self.dtype)
    return jax.nn.relu(x) * positive_slope - jax.nn.relu(-x) * negative_slope


class PReLU(nnx.Module):
  """Parametric ReLU with one shared slope (parameter ``negative_slope``, shape ``(1,)``).

  Args:
    negative_slope_init: initial slope for negative inputs.
    dtype: computation dtype; None: the promotion of input and parameter dtypes.
    param_dtype: parameter dtype.
    rngs: accepted for the common signature (unused).
  """

  def __init__(self, *, negative_slope_init: float = 0.25, dtype: Any = None,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs | None = None):
    del rngs
    self.negative_slope = nnx.Param(jnp.full((1,), negative_slope_init, param_dtype))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies ``max(x, 0) + slope * min(x, 0)``."""
    x, slope = nnx.nn.dtypes.promote_dtype((x, self.negative_slope.get_value()), dtype=self.dtype)
    return jnp.where(x >= 0, x, slope * x)


# name -> (factory, needs in_features); factories take (in_features?, *, rngs, **options).
_MODULES: dict[str, tuple[Callable[..., Any], bool]] = {
    "arelu": (AReLU, False),
    "prelu": (PReLU, False),
    "atac": (ATAC, True),
    "atac_global": (functools.partial(ATAC, use_global=True), True),
    "se": (SE, True),
    "xunit": (XUnit, True),
}


def available_activations() -> tuple[str, ...]:
  """Names accepted by :func:`get_activation` (the linen registry's names)."""
  return linen_activations.available_activations()


def get_activation(name: str, in_features: int | None = None, /, *, rngs: nnx.Rngs | None = None,
                   **options: Any) -> Any:
  """The activation ``name`` as an NNX module (or a parameter-free callable).

  Args:
    name: one of :func:`available_activations`.
    in_features: channels; required by ``atac``, ``atac_global``, ``se`` and ``xunit``.
    rngs: ``nnx.Rngs``; required by units with parameters.
    **options: the unit's options (as :func:`atac_jax.layers.activation_options` lists them).

  Returns:
    ``act(x)``: an :class:`nnx.Module` for units with variables (``atac``/``atac_global``,
    ``arelu``, ``prelu`` native; ``se``/``xunit`` as :class:`LinenModule`), else the linen
    registry's :class:`atac_jax.layers.Elementwise` callable.

  Raises:
    ValueError: for an unknown name or option, or a missing ``in_features``/``rngs``.
  """
  if name not in available_activations():
    raise ValueError(f"Unknown activation {name!r}; accepted names: "
                     f"{', '.join(available_activations())}.")
  accepted = linen_activations.activation_options(name)
  accepted = tuple(a for a in accepted if a != "train")
  if name in ("atac", "atac_global", "se", "xunit"):
    accepted += ("use_running_average",)
  unknown = sorted(set(options) - set(accepted))
  if unknown:
    raise ValueError(f"Activation {name!r} does not take option(s) {unknown}; accepted: "
                     f"{list(accepted) or 'none'}.")
  if name not in _MODULES:
    return linen_activations.get_activation(name)
  factory, needs_features = _MODULES[name]
  if rngs is None:
    raise ValueError(f"Activation {name!r} has parameters; accepted: rngs=nnx.Rngs(seed).")
  if not needs_features:
    return factory(rngs=rngs, **options)
  if in_features is None:
    raise ValueError(f"Activation {name!r} needs in_features (the input's channel count); "
                     f"accepted: get_activation({name!r}, channels, rngs=...).")
  return factory(in_features, rngs=rngs, **options)
