"""Exact gates of every attention unit of a model for one input (the logic behind ``atac-viz``).

One eval-mode forward pass records each unit's input (``flax.linen.intercept_methods``); each unit
is then re-applied alone to that input with a ``capture_intermediates`` filter on its pre-gate
submodule, and the unit's own gate function is applied to it, so ``unit(x) == x * gate``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from atac_jax.layers import ATAC, SE, AReLU, XUnit
from atac_jax.layers.arelu import ALPHA_RANGE

# (unit class, name of the submodule whose output is the pre-gate tensor, gate function).
GATE_SOURCES: tuple[tuple[type[nn.Module], str, str], ...] = (
    (ATAC, "bn_up", "sigmoid"),
    (SE, "fc_up", "sigmoid"),
    (XUnit, "bn_out", "gaussian"),
)
_GATE_FUNCTIONS = {"sigmoid": jax.nn.sigmoid, "gaussian": lambda z: jnp.exp(-jnp.square(z))}


class VizError(ValueError):
  """A request that cannot be drawn (bad index, missing file, nothing to show)."""


_UNIT_TYPES = tuple(unit for unit, _, _ in GATE_SOURCES)


def _is_pre_gate(module: nn.Module, method_name: str) -> bool:
  """``capture_intermediates`` filter: the pre-gate submodule of the unit being read out."""
  parent = getattr(module, "parent", None)
  return method_name == "__call__" and any(
      isinstance(parent, unit) and module.name == submodule for unit, submodule, _ in GATE_SOURCES)


def _unit_path(path: Sequence[str]) -> str:
  return "/".join(path) or "(model)"


def _record_units(model: nn.Module, variables: Mapping[str, Any], image: jnp.ndarray
                  ) -> tuple[jnp.ndarray, list[tuple[str, nn.Module, Any, Mapping[str, Any]]]]:
  """Runs the model once, recording each unit's path, module, input and variables in order."""
  units = []

  def record(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and isinstance(module, (*_UNIT_TYPES, AReLU)):
      units.append((_unit_path(module.path), module.clone(parent=None), args[0],
                    module.variables))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    logits = model.apply(variables, image, train=False)
  return logits, units


def _unit_gate(unit: nn.Module, unit_variables: Mapping[str, Any], x: jnp.ndarray) -> np.ndarray:
  """The exact gate of one unit for its input ``x``: the gate function of its pre-gate tensor.

  The unit is re-applied alone to its recorded input with its own variables, capturing the
  output of its pre-gate submodule. ATAC's fused ``memory_lean`` path has no such submodule
  output, so it is read out through the plain path (same variables, same values).
  """
  if any(f.name == "memory_lean" for f in dataclasses.fields(unit)):
    unit = unit.clone(memory_lean=False)
  _, state = unit.apply(unit_variables, x, train=False, capture_intermediates=_is_pre_gate)
  captured = state.get("intermediates", {})
  for _, submodule, function in GATE_SOURCES:
    if submodule in captured:
      (pre_gate,) = captured[submodule]["__call__"]
      return np.asarray(_GATE_FUNCTIONS[function](jnp.asarray(pre_gate, jnp.float32))[0])
  raise VizError(f"Could not read the gate of {type(unit).__name__}: its pre-gate submodule "
                 f"({', '.join(s for _, s, _ in GATE_SOURCES)}) produced no output.")


def forward(model: nn.Module, variables: Mapping[str, Any], image: np.ndarray
            ) -> tuple[np.ndarray, dict[str, np.ndarray], list[str]]:
  """One eval-mode forward pass of one image, collecting every unit's gate.

  Each attention unit's input is recorded during the pass (``nn.intercept_methods``), then the
  unit is re-applied alone to it with ``capture_intermediates`` on its pre-gate submodule, so
  the gate is exact (not ``y / x``) and ``unit(x) == x * gate``.

  Args:
    model: a linen model called as ``model.apply(variables, x, train=False)``.
    variables: its ``{'params', 'batch_stats'}``.
    image: one preprocessed image ``(H, W, C)`` (or a batch of one).

  Returns:
    ``(logits (num_classes,), gates, arelu_paths)``: ``gates`` maps each attention unit's module
    path (``'stage2_block1/act2'``) to its float32 gate ``(H', W', C')`` in forward order (a
    channel gate has ``H' = W' = 1``); ``arelu_paths`` lists the AReLU units in forward order.
  """
  image = np.asarray(image, np.float32)
  if image.ndim == 3:
    image = image[None]
  if image.ndim != 4 or image.shape[0] != 1:
    raise VizError(f"Expected one image (H, W, C) or a batch of one, got shape {image.shape}.")
  variables = jax.device_get(variables)  # plain host arrays: one device, whatever wrote them
  # Eager on purpose: the recorded calls come in forward order, one image is cheap.
  logits, units = _record_units(model, variables, jnp.asarray(image))
  gates: dict[str, np.ndarray] = {}
  arelu_paths: list[str] = []
  for path, unit, x, unit_variables in units:
    if isinstance(unit, AReLU):
      arelu_paths.append(path)
    else:
      gates[path] = _unit_gate(unit, unit_variables, x)
  return np.asarray(logits[0], np.float32), gates, arelu_paths


def gate_maps(model: nn.Module, variables: Mapping[str, Any], image: np.ndarray
              ) -> dict[str, np.ndarray]:
  """The gate ``(H', W', C')`` of every attention unit for one image, keyed by module path.

  ``unit(x) == x * gate`` for each unit (ATAC, atac_global, SE, xUnit) in eval mode; the dict is
  in forward order and empty for a model without attention units.
  """
  return forward(model, variables, image)[1]


def arelu_slopes(variables: Mapping[str, Any], paths: Sequence[str]) -> dict[str, tuple[float,
                                                                                        float]]:
  """``{path: (negative slope clamp(alpha), positive slope 1 + sigmoid(beta))}`` of AReLU units."""
  params = jax.device_get(variables["params"])
  slopes = {}
  for path in paths:
    node = params
    for name in path.split("/"):
      node = node[name]
    alpha = float(np.asarray(node["alpha"]).reshape(-1)[0])
    beta = float(np.asarray(node["beta"]).reshape(-1)[0])
    slopes[path] = (float(np.clip(alpha, *ALPHA_RANGE)), 1.0 + 1.0 / (1.0 + math.exp(-beta)))
  return slopes


# ----------------------------------------------------------------------------------- drawing
