"""Learning-curve figures from ``metrics.jsonl`` records (used by training and ``atac-compare``)."""

from __future__ import annotations

import json
import os
from typing import Callable, Iterable, Mapping, Sequence

import matplotlib

from atac_jax.workdir import Layout

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

PANELS = (("loss", "train/loss", "eval/loss"), ("accuracy", "train/accuracy", "eval/accuracy"))


def read_metrics(path: str, *, on_skip: Callable[[str, int, str], None] | None = None
                 ) -> list[dict]:
  """Reads a ``metrics.jsonl`` file (a workdir is accepted too).

  Lines that are not a JSON object with ``step`` and ``epoch`` (e.g. one torn by a kill) are
  skipped; ``on_skip(path, line_number, reason)`` is told about each.
  """
  if os.path.isdir(path):
    path = Layout(path).metrics
  records = []
  with open(path, "rb") as f:
    for number, raw in enumerate(f, start=1):
      try:
        record = json.loads(raw.decode("utf-8"))
        if not isinstance(record, dict) or "step" not in record or "epoch" not in record:
          raise ValueError("not a JSON object with 'step' and 'epoch'")
      except UnicodeDecodeError:
        reason = "not UTF-8 text"
      except ValueError as error:
        reason = " ".join(str(error).split())[:120]
      else:
        records.append(record)
        continue
      if on_skip is not None:
        on_skip(path, number, reason)
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
