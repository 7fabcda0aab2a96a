"""Gates of every attention unit of a model for one input (the logic behind ``atac-viz``).

Reads the units' introspection contract (see :mod:`atac_jax.layers`), not their internals: one
eval-mode forward pass with the ``intermediates`` collection mutable, in which every gate unit
(ATAC, ``atac_global``, SE, xUnit, or any module of the caller's that keeps the contract) sows
``gate`` with ``unit(x) == x * gate``, and every AReLU sows ``negative_slope`` and
``positive_slope``.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

GATE = "gate"
SLOPES = ("negative_slope", "positive_slope")


class VizError(ValueError):
  """A request that cannot be drawn (bad index, missing file, nothing to show)."""


def _sown(tree: Mapping[str, Any], path: tuple[str, ...] = ()
          ) -> Iterator[tuple[tuple[str, ...], Mapping[str, Any]]]:
  """``(module path, {name: values sown by that module})`` in insertion (= forward) order.

  Not ``jax.tree`` flattening, which sorts keys.
  """
  own = {k: v for k, v in tree.items() if not isinstance(v, Mapping)}
  if own:
    yield path, own
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _sown(value, path + (key,))


def _call_paths(path: tuple[str, ...], num_calls: int) -> list[str]:
  """``'a/b'`` for a unit called once; ``'a/b'``, ``'a/b#2'``, ... for one called repeatedly."""
  name = "/".join(path) or "(model)"
  return [name if i == 0 else f"{name}#{i + 1}" for i in range(num_calls)]


def forward(model: nn.Module, variables: Mapping[str, Any], image: np.ndarray
            ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, tuple[float, float]]]:
  """One eval-mode forward pass of one image, collecting every unit's gate and AReLU's slopes.

  Args:
    model: a linen model called as ``model.apply(variables, x, train=False)``.
    variables: its ``{'params', 'batch_stats'}``.
    image: one preprocessed image ``(H, W, C)`` (or a batch of one).

  Returns:
    ``(logits (num_classes,), gates, slopes)``: ``gates`` maps each gate unit's module path
    (``'stage2_block1/act2'``) to its float32 gate ``(H', W', C')`` in forward order (a channel
    gate has ``H' = W' = 1``); ``slopes`` maps each AReLU unit's path to its ``(negative slope,
    positive slope)``, in forward order.
  """
  image = np.asarray(image, np.float32)
  if image.ndim == 3:
    image = image[None]
  if image.ndim != 4 or image.shape[0] != 1:
    raise VizError(f"Expected one image (H, W, C) or a batch of one, got shape {image.shape}.")
  variables = jax.device_get(variables)  # plain host arrays: one device, whatever wrote them
  variables = {k: v for k, v in variables.items() if k != "intermediates"}
  logits, state = model.apply(variables, jnp.asarray(image), train=False,
                              mutable=["intermediates"])
  gates: dict[str, np.ndarray] = {}
  slopes: dict[str, tuple[float, float]] = {}
  for path, sown in _sown(state.get("intermediates", {})):
    if GATE in sown:
      for name, gate in zip(_call_paths(path, len(sown[GATE])), sown[GATE]):
        gates[name] = np.asarray(gate, np.float32)[0]
    if all(k in sown for k in SLOPES):
      negative, positive = (float(np.asarray(sown[k][0], np.float32).reshape(-1)[0])
                            for k in SLOPES)
      slopes["/".join(path) or "(model)"] = (negative, positive)
  return np.asarray(logits[0], np.float32), gates, slopes


def gate_maps(model: nn.Module, variables: Mapping[str, Any], image: np.ndarray
              ) -> dict[str, np.ndarray]:
  """The gate ``(H', W', C')`` of every attention unit for one image, keyed by module path.

  ``unit(x) == x * gate`` for each unit (ATAC, atac_global, SE, xUnit) in eval mode; the dict is
  in forward order and empty for a model without attention units.
  """
  return forward(model, variables, image)[1]
