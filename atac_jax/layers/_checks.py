"""Input validation shared by the layers: clear ValueErrors that say what is accepted."""

from __future__ import annotations

from typing import Any


def check_rank(x: Any, *, rank: int, layer: str, layout: str = "NHWC") -> None:
  """Raises ValueError unless ``x`` has ``rank`` dimensions."""
  ndim = getattr(x, "ndim", None)
  if ndim != rank:
    shape = getattr(x, "shape", None)
    raise ValueError(
        f"{layer} expects a rank-{rank} {layout} input, got shape {shape}. "
        f"Pass a batch of images shaped ({', '.join(layout)}).")


CHANNELS_LAST = {2: "(N, C)", 3: "(N, L, C)", 4: "(N, H, W, C)", 5: "(N, D, H, W, C)"}


def check_min_rank(x: Any, *, min_rank: int, layer: str) -> None:
  """Raises ValueError unless ``x`` is channels-last with at least ``min_rank`` dimensions."""
  ndim = getattr(x, "ndim", None)
  if ndim is None or ndim < min_rank:
    examples = ", ".join(v for k, v in CHANNELS_LAST.items() if k >= min_rank)
    raise ValueError(
        f"{layer} expects a channels-last input of rank >= {min_rank} (accepted: {examples}, "
        f"...), got shape {getattr(x, 'shape', None)}.")


def check_positive(value: Any, *, option: str, layer: str) -> None:
  """Raises ValueError unless ``value`` is a number greater than zero."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
    raise ValueError(f"{layer}: {option} must be a number > 0, got {value!r}.")


def check_positive_int(value: Any, *, option: str, layer: str) -> None:
  """Raises ValueError unless ``value`` is an integer greater than zero."""
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"{layer}: {option} must be an integer >= 1, got {value!r}.")


def check_momentum(value: Any, *, layer: str) -> None:
  """Raises ValueError unless ``0 <= value < 1`` (BatchNorm running-average momentum)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
    raise ValueError(f"{layer}: momentum must be in [0, 1), got {value!r}.")


def bottleneck_width(channels: int, reduction: int, *, layer: str) -> int:
  """Width ``C // r`` of a reduction bottleneck (at least 1).

  Raises:
    ValueError: if ``reduction`` is not a positive integer, or if ``channels >= reduction`` and
      ``reduction`` does not divide ``channels`` (the reference always uses divisible widths).
  """
  check_positive_int(reduction, option="reduction", layer=layer)
  if channels >= reduction and channels % reduction:
    raise ValueError(
        f"{layer}: {channels} channels do not fit reduction={reduction}; the reduction must divide "
        f"the channel count (or exceed it, giving a width-1 bottleneck). Divisors of {channels}: "
        f"{[d for d in range(1, channels + 1) if channels % d == 0]}.")
  return max(channels // reduction, 1)

