"""Checks every training-config value before anything is compiled or written.

:func:`validate` raises :class:`~atac_train.errors.ConfigError` with one line naming the key, the
value and what is accepted, e.g. ``config.schedule.learning_rate=-0.1 is not accepted; accepted:
a finite number > 0``. Checks that need the data or the devices (the batch against the device
count and the split size, the number of mean/std values against the channels, model options)
run in :func:`atac_train.trainer.setup`, still before anything compiles or is written.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import ml_collections

from atac_jax import layers, models
from atac_train import optim
from atac_train.data import config as data_config
from atac_train.errors import ConfigError

_MISSING = object()


def _get(config: Any, key: str) -> Any:
  node = config
  for part in key.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      return _MISSING
    node = node[part]
  return node


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value))


def _int_at_least(low: int) -> tuple[Callable[[Any], bool], str]:
  return (lambda v: _is_int(v) and v >= low), f"an integer >= {low}"


def _number(low: float, *, low_open: bool = False, high: float | None = None,
            high_open: bool = True) -> tuple[Callable[[Any], bool], str]:
  def check(v):
    if not _is_number(v) or v < low or (low_open and v == low):
      return False
    return high is None or v < high or (not high_open and v == high)
  left = ">" if low_open else ">="
  text = f"a finite number {left} {low:g}"
  if high is not None:
    text = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
  return check, text


def _choice(options: Sequence[str]) -> tuple[Callable[[Any], bool], str]:
  return (lambda v: v in options), ", ".join(repr(o) for o in options)


_BOOL = ((lambda v: isinstance(v, bool)), "True or False")
_STRING = ((lambda v: isinstance(v, str)), "a string")
_NAME = ((lambda v: isinstance(v, str) and bool(v.strip())), "a non-empty string")


def _numbers(*, positive: bool) -> tuple[Callable[[Any], bool], str]:
  def check(v):
    return (isinstance(v, (list, tuple)) and all(_is_number(x) for x in v)
            and (not positive or all(x > 0 for x in v)))
  return check, ("a list of numbers > 0 (empty: the dataset's statistics)" if positive else
                 "a list of numbers (empty: the dataset's statistics)")


def _shape(v: Any) -> bool:
  return isinstance(v, (list, tuple)) and len(v) == 3 and all(_is_int(x) and x > 0 for x in v)


def _ascending_epochs(v: Any) -> bool:
  return (isinstance(v, (list, tuple)) and all(_is_number(x) and x > 0 for x in v)
          and list(v) == sorted(v))


class Setting(NamedTuple):
  """What the trainer knows of one config key besides its default (``defaults.base_config``).

  Attributes:
    check: whether a value is accepted.
    accepted: what is accepted, for the error message.
    resumable: the value may differ when a run resumes (it decides what is logged, evaluated,
      kept or where the same data is read from, never what is trained; ``atac_train.resume``).
  """
  check: Callable[[Any], bool]
  accepted: str
  resumable: bool = False


# May differ on resume (see Setting.resumable). eval_batch_size changes the eval sums' order,
# i.e. eval numbers by float rounding only; num_workers is absent: it changes the structure of
# the saved data-iterator state.
_RESUMABLE = ("log_every_steps", "eval_every_epochs", "eval_batch_size", "checkpoint_every_steps",
              "keep_checkpoints", "keep_every_epochs", "progress_bar", "init_from",
              "dataset.prefetch_buffer", "dataset.data_dir", "dataset.path")


def settings() -> dict[str, Setting]:
  """Every config key (dotted, under ``config``) -> its :class:`Setting`: the one table that
  validation and resume read (a test ties its keys to ``defaults.base_config``)."""
  return {key: Setting(check, accepted, key in _RESUMABLE)
          for key, (check, accepted) in _checks().items()}


def resumable_keys() -> tuple[str, ...]:
  """The keys whose value may differ when a run resumes."""
  return tuple(key for key, setting in settings().items() if setting.resumable)


def _checks() -> dict[str, tuple[Callable[[Any], bool], str]]:
  return {
      "seed": ((lambda v: _is_int(v) and 0 <= v < 2**32), "an integer in [0, 2**32)"),
      "model.name": _choice(models.available_models()),
      "model.act": _choice(layers.available_activations()),
      "model.options": ((lambda v: isinstance(v, (ml_collections.ConfigDict, dict))),
                        "a dict of model options"),
      "num_epochs": _number(0, low_open=True),
      "global_batch_size": _int_at_least(1),
      "eval_batch_size": ((lambda v: _is_int(v) and v >= 0),
                          "an integer >= 0 (0: global_batch_size)"),
      "half_precision": _BOOL,
      "optimizer.name": _choice(optim.OPTIMIZERS),
      "optimizer.momentum": _number(0, high=1),
      "optimizer.nesterov": _BOOL,
      "optimizer.b1": _number(0, high=1),
      "optimizer.b2": _number(0, high=1),
      "optimizer.weight_decay": _number(0),
      "optimizer.weight_decay_mask": _choice(optim.DECAY_MASKS),
      "optimizer.grad_clip_norm": _number(0),
      "schedule.name": _choice(optim.SCHEDULES),
      "schedule.learning_rate": _number(0, low_open=True),
      "schedule.warmup_epochs": _number(0),
      "schedule.decay_epochs": (_ascending_epochs, "ascending epochs > 0"),
      "schedule.decay_factor": _number(0, low_open=True),
      "label_smoothing": _number(0, high=1),
      "mixup_alpha": ((lambda v: _is_number(v) and v >= 0), "a finite number >= 0 (0: off)"),
      "log_every_steps": _int_at_least(1),
      "eval_every_epochs": _int_at_least(1),
      "checkpoint_every_steps": ((lambda v: _is_int(v) and v >= 0),
                                 "an integer >= 0 (0: once per epoch)"),
      "keep_checkpoints": _int_at_least(1),
      "keep_every_epochs": ((lambda v: _is_int(v) and v >= 0), "an integer >= 0 (0: none)"),
      "progress_bar": _BOOL,
      "init_from": _STRING,
      "dataset.name": _NAME,
      "dataset.source": _choice(data_config.SOURCES),
      "dataset.data_dir": _STRING,
      "dataset.path": _STRING,
      "dataset.label_mode": _choice(data_config.LABEL_MODES),
      "dataset.train_split": _NAME,
      "dataset.eval_split": _NAME,
      "dataset.augment": _choice(data_config.AUGMENTS),
      "dataset.image_size": ((lambda v: _is_int(v) and v >= 0), "an integer >= 0 (0: native)"),
      "dataset.mean": _numbers(positive=False),
      "dataset.std": _numbers(positive=True),
      "dataset.num_workers": ((lambda v: _is_int(v) and v >= 0),
                              "an integer >= 0 (0: in this process)"),
      "dataset.prefetch_buffer": _int_at_least(1),
      "dataset.synthetic_shape": (_shape, "(height, width, channels), each >= 1"),
      "dataset.synthetic_num_classes": _int_at_least(1),
      "dataset.synthetic_num_examples": _int_at_least(1),
      "dataset.synthetic_num_eval_examples": _int_at_least(1),
      "dataset.synthetic_seed": ((lambda v: _is_int(v) and v >= 0), "an integer >= 0"),
  }


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first config value that is not accepted (keys absent: skipped).

  Raises:
    ConfigError: ``config.KEY=VALUE is not accepted; accepted: ...``.
  """
  for key, (accepted, description, _) in settings().items():
    value = _get(config, key)
    if value is _MISSING:
      continue
    if isinstance(value, ml_collections.FieldReference):
      value = value.get()
    if isinstance(value, tuple) and key not in ("dataset.synthetic_shape",):
      value = list(value)
    if not accepted(value):
      raise ConfigError(f"config.{key}={value!r} is not accepted; accepted: {description}.")
  warmup, epochs = _get(config, "schedule.warmup_epochs"), _get(config, "num_epochs")
  if _MISSING not in (warmup, epochs) and warmup > epochs:
    raise ConfigError(f"config.schedule.warmup_epochs={warmup!r} is not accepted; accepted: "
                      f"a number in [0, num_epochs={epochs!r}].")
