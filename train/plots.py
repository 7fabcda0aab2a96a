"""Learning-curve figures from ``metrics.jsonl`` records (used by training and ``atac-compare``)."""

from __future__ import annotations

import json
import os
from typing import Iterable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

PANELS = (("loss", "train/loss", "eval/loss"), ("accuracy", "train/accuracy", "eval/accuracy"))


def read_metrics(path: str) -> list[dict]:
  """Reads a ``metrics.jsonl`` file (a workdir is accepted too); skips a torn last line."""
  if os.path.isdir(path):
    path = os.path.join(path, "metrics.jsonl")
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


def _series(records: Iterable[Mapping], key: str) -> tuple[list[float], list[float]]:
  points = [(r["epoch"], r[key]) for r in records if key in r]
  return [p[0] for p in points], [p[1] for p in points]


def plot_learning_curves(runs: Mapping[str, Sequence[Mapping]], out: str, *,
                         size_inches: tuple[float, float] = (10.0, 4.0), dpi: int = 100) -> None:
  """Draws train (dashed) and eval (solid) loss and accuracy against epochs for several runs.

  Args:
    runs: label -> metrics records (each with ``epoch`` and ``train/*`` / ``eval/*`` keys).
    out: PNG path.
    size_inches: figure size; the PNG is ``size_inches * dpi`` pixels.
    dpi: resolution.
  """
  fig, axes = plt.subplots(1, 2, figsize=size_inches, dpi=dpi)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for index, (label, records) in enumerate(runs.items()):
    color = colors[index % len(colors)]
    for ax, (title, train_key, eval_key) in zip(axes, PANELS):
      x, y = _series(records, train_key)
      if x:
        ax.plot(x, y, linestyle="--", color=color, alpha=0.7, label=f"{label} train")
      x, y = _series(records, eval_key)
      if x:
        ax.plot(x, y, linestyle="-", marker="o", markersize=3, color=color, label=f"{label} eval")
      ax.set_title(title)
      ax.set_xlabel("epoch")
      ax.grid(alpha=0.3)
  axes[0].legend(fontsize="small")
  fig.tight_layout()
  tmp = out + ".tmp.png"
  fig.savefig(tmp, dpi=dpi)
  plt.close(fig)
  os.replace(tmp, out)
