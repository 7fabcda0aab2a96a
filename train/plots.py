"""Learning-curve figures from ``metrics.jsonl`` records (used by training and ``atac-compare``)."""

from __future__ import annotations

import io
import json
from typing import Callable, Iterable, Mapping, Sequence

import matplotlib

from atac_jax import storage
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
  if storage.isdir(path):
    path = Layout(path).metrics
  records = []
  for number, raw in enumerate(storage.read_bytes(path).splitlines(keepends=True), start=1):
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
    out: PNG path (local or a URL such as ``gs://...``), written atomically.
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
  # Rendered in memory, then written whole: the same call serves local paths and object stores.
  buffer = io.BytesIO()
  try:
    fig.savefig(buffer, format="png", dpi=dpi)
  finally:
    plt.close(fig)
  storage.write_atomic(out, buffer.getvalue())
