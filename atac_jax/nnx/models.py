"""The model registry as Flax NNX models.

>>> model = atac_jax.nnx.models.create("cifar_resnet20", num_classes=10, act="atac",
...                                     rngs=nnx.Rngs(0))
>>> logits = model(images)            # training mode; model.eval() for inference

Each model is a :class:`~atac_jax.nnx.LinenModule` around the linen host network of
:func:`atac_jax.models.create` (the same computation, not a native rewrite), initialised from
the linen ``init`` and owning its variables as ``nnx.Param`` / ``nnx.BatchStat``. Its weights
convert with :func:`atac_jax.nnx.to_linen` / :func:`atac_jax.nnx.from_linen`.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from atac_jax import models as linen_models
from atac_jax.nnx.wrapper import LinenModule


def available_models() -> tuple[str, ...]:
  """Names accepted by :func:`create` (those of :func:`atac_jax.models.available_models`)."""
  return linen_models.available_models()


def default_input_shape(name: str) -> tuple[int, int, int]:
  """``(H, W, C)`` of one image for model ``name`` (what it is initialised with by default).

  Raises:
    ValueError: for an unknown model name.
  """
  if name not in available_models():
    raise ValueError(f"Unknown model {name!r}; accepted: {', '.join(available_models())}.")
  if name == "convnet_mnist":
    return (28, 28, 1)
  if name.startswith("resnet"):
    return (224, 224, 3)
  return (32, 32, 3)


def create(name: str, *, num_classes: int, act: str = "relu", rngs: nnx.Rngs,
           input_shape: Optional[tuple[int, ...]] = None,
           use_running_average: Optional[bool] = False, **options: Any) -> LinenModule:
  """Model ``name`` as an NNX module.

  Args:
    name: one of :func:`available_models`.
    num_classes: output classes.
    act: activation name (see :func:`atac_jax.layers.available_activations`).
    rngs: ``nnx.Rngs`` with a ``params`` stream.
    input_shape: ``(H, W, C)`` of one image the variables are initialised for; default
      :func:`default_input_shape`.
    use_running_average: initial mode (False: training, as ``nnx.BatchNorm``).
    **options: the linen model's options (see :func:`atac_jax.models.model_options`).

  Returns:
    A :class:`LinenModule`: ``model(x)`` returns the logits (``model(x, use_running_average=
    True)`` or ``model.eval()`` for inference).

  Raises:
    ValueError: for an unknown name or option (from :func:`atac_jax.models.create`).
  """
  module = linen_models.create(name, num_classes=num_classes, act=act, **options)
  shape = tuple(input_shape or default_input_shape(name))
  sample = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
  return LinenModule(module, sample, rngs=rngs, use_running_average=use_running_average)
