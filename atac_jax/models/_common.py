"""Helpers shared by the host networks: activation factories, input checks, option validation."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from atac_jax.layers import ATAC, BatchNormVariables, activation_options, get_activation
from atac_jax.layers import initializers

ModuleDef = Any
ActivationFactory = Callable[..., Any]

# He (MSRA) normal initialisation, fan-in: the reference scripts' ``MSRAPrelu`` / ``Xavier(
# rnd_type='gaussian', factor_type='in', magnitude=2)`` for the host networks' convolutions.
# (Picklable; draws what ``nn.initializers.variance_scaling(2.0, "fan_in", "normal")`` draws.)
he_normal = initializers.he_normal


def freeze_options(options: Mapping[str, Any] | None) -> FrozenDict:
  """Returns ``options`` (any mapping, e.g. a ``ConfigDict``) as a hashable ``FrozenDict``.

  Linen modules must be hashable, so mapping-valued model options are frozen.
  """
  return FrozenDict({key: options[key] for key in options} if options else {})


def activation_factory(act: str, *, reduction: int | None, dtype: Any, param_dtype: Any,
                       act_options: Mapping[str, Any] | None = None,
                       axis_name: Any = None) -> ActivationFactory:
  """Returns ``factory(name=...)`` building activation ``act`` for a host network.

  The model-level ``reduction``, ``dtype``, ``param_dtype`` and ``axis_name`` are passed only to
  activations that take them (so ``relu`` gets none, ``atac`` gets all four; ``None`` keeps the
  unit's own default). ``act_options`` are passed as given, so an option the activation does
  not take raises.

  Raises:
    ValueError: for an unknown activation name or an option it does not accept.
  """
  accepted = activation_options(act)
  shared = {"reduction": reduction, "dtype": dtype, "param_dtype": param_dtype,
            "axis_name": axis_name}
  options = {k: v for k, v in shared.items() if k in accepted and v is not None}
  options.update(act_options or {})
  unknown = sorted(set(options) - set(accepted))
  if unknown:
    raise ValueError(f"Activation {act!r} does not take option(s) {unknown}; accepted: "
                     f"{list(accepted) or 'none'}.")
  return functools.partial(get_activation, act, **options)


@dataclasses.dataclass(frozen=True)
class NormSpec:
  """The host network's BatchNorm settings; calling it makes the ``nn.BatchNorm``.

  ``spec(name=...)`` is ``nn.BatchNorm(use_running_average=not train, momentum=..., ...)``
  (keyword overrides allowed, e.g. ``scale_init``); :func:`norm_act` uses the same settings to
  create :class:`~atac_jax.layers.BatchNormVariables` when it fuses the BatchNorm into ATAC.
  """
  train: bool
  momentum: float
  epsilon: float
  dtype: Any = None
  param_dtype: Any = jnp.float32
  axis_name: Any = None

  def __call__(self, **overrides: Any) -> nn.BatchNorm:
    options = dict(use_running_average=not self.train, momentum=self.momentum,
                   epsilon=self.epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                   axis_name=self.axis_name)
    options.update(overrides)
    return nn.BatchNorm(**options)

  def variables(self, features: int, *, name: str) -> BatchNormVariables:
    """The same BatchNorm's variables, for an op that fuses the normalisation."""
    return BatchNormVariables(features, momentum=self.momentum, epsilon=self.epsilon,
                              dtype=self.dtype, param_dtype=self.param_dtype,
                              axis_name=self.axis_name, name=name)


def norm_act(x: Any, *, norm: NormSpec, act: ActivationFactory, norm_name: str, act_name: str,
             train: bool) -> Any:
  """``act(norm(x))``: a BatchNorm and the activation that follows it, inside a parent module.

  Makes the BatchNorm ``norm_name`` and the activation ``act(name=act_name)``. When the
  activation is an :class:`~atac_jax.layers.ATAC` unit that fuses a preceding BatchNorm
  (``unit.fuses_norm(train=...)``: memory-lean, point-wise, in training), the BatchNorm is handed
  to it as :class:`~atac_jax.layers.BatchNormVariables` made from the same :class:`NormSpec`, and
  the pair keeps only the BatchNorm's input for the backward pass, as BatchNorm + ReLU does. The
  variables, outputs and gradients are those of the unfused pair, which evaluation (and every
  other activation) uses.
  """
  unit = act(name=act_name)
  if isinstance(unit, ATAC) and unit.fuses_norm(train=train):
    return unit(x, train=train, norm=norm.variables(x.shape[-1], name=norm_name))
  return unit(norm(name=norm_name)(x), train=train)


def placement_factories(chosen: ActivationFactory, flags: tuple[bool, ...]
                        ) -> tuple[ActivationFactory, ...]:
  """Per-position factories: ``chosen`` where ``flags`` is true, plain ReLU elsewhere."""
  relu = functools.partial(get_activation, "relu")
  return tuple(chosen if flag else relu for flag in flags)


def check_int_range(value: Any, *, option: str, model: str, low: int, high: int) -> None:
  """Raises ValueError unless ``value`` is an integer in ``[low, high]``."""
  if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
    raise ValueError(f"{model}: {option} must be an integer in {list(range(low, high + 1))}, "
                     f"got {value!r}.")


def _smaller(dim: Any, size: int) -> bool:
  """``dim < size``; False where a symbolic dimension (``jax.export``) leaves it undecided."""
  try:
    return bool(dim < size)
  except jax.errors.InconclusiveDimensionOperation:
    return False


def check_input(x: Any, *, model: str, in_channels: int | None, min_size: int) -> None:
  """Validates an NHWC image batch.

  Symbolic heights and widths (``jax.export.symbolic_shape``) are checked only as far as their
  constraints decide it (e.g. ``constraints=("h >= 32",)``); otherwise the check is skipped.

  Args:
    x: the input array.
    model: model name for the message.
    in_channels: channel count the model expects, or ``None`` for any.
    min_size: smallest height and width the network can process.

  Raises:
    ValueError: for a rank other than 4, a wrong channel count or a too small image.
  """
  shape = getattr(x, "shape", None)
  if getattr(x, "ndim", None) != 4:
    raise ValueError(f"{model} expects a rank-4 NHWC batch (N, H, W, C), got shape {shape}.")
  if in_channels is not None and shape[-1] != in_channels:
    raise ValueError(f"{model} expects {in_channels} input channel(s) (accepted: C = "
                     f"{in_channels}; pass in_channels=None to accept any), got shape {shape}.")
  if any(_smaller(dim, min_size) for dim in shape[1:3]):
    raise ValueError(f"{model} needs images of at least {min_size}x{min_size} (accepted: H, W >= "
                     f"{min_size}), got shape {shape}.")
