"""The layout of a training workdir and the model its config describes.

The one module that knows both; :mod:`atac_jax.checkpoint` (reusing a trained model) and the
trainer (``atac_train``) share it::

    DIR/config.json                  the resolved config of the run (what the checkpoints hold)
    DIR/metrics.jsonl                one JSON object per line, each step once
    DIR/tensorboard/                 TensorBoard events (rebuilt from metrics.jsonl on resume)
    DIR/learning_curve.png
    DIR/checkpoints/<step>/          Orbax step: items state, data (grain iterator), config
    DIR/damaged_checkpoints/<step>-<time>/   steps that failed to restore, moved aside
    DIR/archive/<time>/              an earlier run, moved aside by ``atac-train --fresh``
    DIR/atac-train.lock              held by the trainer that is writing DIR
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from atac_jax import storage

if TYPE_CHECKING:
  import flax.linen as nn

# Orbax item names inside a checkpoint step.
STATE_ITEM, DATA_ITEM, CONFIG_ITEM = "state", "data", "config"


@dataclasses.dataclass(frozen=True)
class Layout:
  """Paths of one workdir.

  Attributes:
    root: the workdir: an absolute local path, or a URL such as ``gs://bucket/run`` (see
      :mod:`atac_jax.storage`).
  """
  root: str

  def __post_init__(self):
    object.__setattr__(self, "root", storage.normalize(self.root))

  def _path(self, name: str) -> str:
    return storage.join(self.root, name)

  @property
  def config(self) -> str:
    return self._path("config.json")

  @property
  def metrics(self) -> str:
    return self._path("metrics.jsonl")

  @property
  def tensorboard(self) -> str:
    return self._path("tensorboard")

  @property
  def curve(self) -> str:
    return self._path("learning_curve.png")

  @property
  def checkpoints(self) -> str:
    return self._path("checkpoints")

  @property
  def damaged(self) -> str:
    return self._path("damaged_checkpoints")

  @property
  def archive(self) -> str:
    return self._path("archive")

  @property
  def lock(self) -> str:
    return self._path("atac-train.lock")

  def run_outputs(self) -> list[str]:
    """What one run writes (what ``--fresh`` archives), the lock and the archive excluded."""
    return [self.config, self.metrics, self.tensorboard, self.curve, self.checkpoints,
            self.damaged]

  def step_dir(self, step: int) -> str:
    return storage.join(self.checkpoints, str(step))


def read_json(path: str) -> dict:
  """A JSON file (local or remote) as a dict; errors name the file."""
  try:
    return json.loads(storage.read_text(path))
  except UnicodeDecodeError as e:
    raise ValueError(f"{path} is not valid JSON (not UTF-8 text).") from e
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON (line {e.lineno}: {e.msg}).") from e


def write_json(path: str, value: Mapping[str, Any]) -> None:
  """Writes ``value`` atomically (see :func:`atac_jax.storage.write_atomic`)."""
  storage.write_atomic(path, json.dumps(value, indent=2, sort_keys=True))


def build_model(config: Any, *, num_classes: int | None = None) -> nn.Module:
  """The linen model a training config describes (bf16 compute when ``half_precision``).

  Args:
    config: the training config, a ``ConfigDict`` or the resolved dict saved with a checkpoint.
    num_classes: the number of classes (default: ``config.model.num_classes``, which the trainer
      resolves from the data and saves).
  """
  # JAX and the models load here, not at import: the layout alone serves JAX-free tools
  # (atac-compare).
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from atac_jax import models  # pylint: disable=g-import-not-at-top
  model_config = config["model"]
  options = dict(model_config.get("options", None) or {})
  if config.get("half_precision", False):
    options["dtype"] = jnp.bfloat16
  if num_classes is None:
    num_classes = model_config["num_classes"]
  return models.create(model_config["name"], num_classes=num_classes, act=model_config["act"],
                       **options)
