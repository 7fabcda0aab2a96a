"""``atac-compare``: learning curves of several runs on shared axes, and one JSON line per run.

    atac-compare workdirs/qs_atac workdirs/qs_relu --labels atac,relu --out curves.png

Reads each workdir's ``metrics.jsonl`` (and ``config.json`` when present); the figure is drawn
by :func:`atac_train.plots.plot_learning_curves` (train dashed, eval solid; loss and accuracy).
A line of ``metrics.jsonl`` that cannot be read is skipped with a warning naming the file and the
line; an unreadable ``config.json`` is an error naming the file and the line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Any, Sequence

from atac_jax import storage
from atac_jax.workdir import Layout
from atac_train import plots


class CompareError(ValueError):
  """A workdir that cannot be compared (no metrics) or mismatched labels."""


def _metrics_path(workdir: str) -> str:
  path = Layout(workdir).metrics
  if not storage.isfile(path):
    raise CompareError(
        f"No metrics.jsonl in {workdir!r}: expected a training workdir. Train one with "
        f"`atac-train --config configs/quickstart.py --workdir {workdir}`.")
  return path


def _read_config(workdir: str) -> dict:
  path = Layout(workdir).config
  if not storage.isfile(path):
    return {}
  try:
    config = json.loads(storage.read_bytes(path).decode("utf-8"))
  except UnicodeDecodeError as e:
    raise CompareError(f"{path} cannot be read: not UTF-8 text (byte {e.start}).") from e
  except json.JSONDecodeError as e:
    raise CompareError(f"{path} line {e.lineno}: not valid JSON ({e.msg}).") from e
  if not isinstance(config, dict):
    raise CompareError(f"{path} line 1: not a JSON object.")
  return config


def _warn_skipped(path: str, line: int, reason: str) -> None:
  print(f"atac-compare: warning: skipped {path} line {line}: {reason}", file=sys.stderr)


def read_run(workdir: str) -> list[dict]:
  """The metric records of one run; each line it skips is named on stderr (file and line).

  Raises:
    CompareError: if ``workdir`` has no ``metrics.jsonl``, or no records in it.
  """
  path = _metrics_path(workdir)
  try:
    records = plots.read_metrics(path, on_skip=_warn_skipped)
  except OSError as e:
    raise CompareError(f"{path} cannot be read: {e.strerror or e}.") from e
  if not records:
    raise CompareError(f"{path!r} holds no metric records yet.")
  return records


def summarize_records(records: Sequence[dict]) -> dict[str, Any]:
  """Final/best numbers of one run's metric records (``None`` where a key never appears).

  Returns:
    ``final_step``, ``final_epoch``, ``final_eval_accuracy``, ``best_eval_accuracy`` and
    ``best_epoch`` (the first epoch reaching it), ``final_eval_loss``, ``final_train_loss``,
    ``median_images_per_second`` (median over the logged train intervals).
  """
  def last(key: str) -> Any:
    values = [r[key] for r in records if key in r]
    return values[-1] if values else None

  evals = [r for r in records if "eval/accuracy" in r]
  best = max(evals, key=lambda r: r["eval/accuracy"]) if evals else None  # first of the maxima
  speeds = [r["train/images_per_second"] for r in records if "train/images_per_second" in r]
  return {
      "final_step": max((int(r["step"]) for r in records), default=None),
      "final_epoch": max((float(r["epoch"]) for r in records), default=None),
      "final_eval_accuracy": last("eval/accuracy"),
      "best_eval_accuracy": best["eval/accuracy"] if best else None,
      "best_epoch": best["epoch"] if best else None,
      "final_eval_loss": last("eval/loss"),
      "final_train_loss": last("train/loss"),
      "median_images_per_second": round(statistics.median(speeds), 1) if speeds else None,
  }


def summarize_run(workdir: str, *, label: str | None = None,
                  records: Sequence[dict] | None = None) -> dict[str, Any]:
  """One run's summary: label, workdir, model/act from ``config.json`` and its final/best numbers.

  Args:
    workdir: the run's workdir.
    label: its label (default: the workdir's name).
    records: its metric records, if already read (default: read with :func:`read_run`).

  Raises:
    CompareError: if ``workdir`` has no ``metrics.jsonl`` or no records in it, or an unreadable
      ``config.json`` (the message names the file and line).
  """
  records = read_run(workdir) if records is None else records
  config = _read_config(workdir)
  model = config.get("model", {})
  return {"label": label or _default_label(workdir), "workdir": workdir,
          "model": model.get("name"), "act": model.get("act"),
          "dataset": config.get("dataset", {}).get("name"), **summarize_records(records)}


def _tidy(workdir: str) -> str:
  """The path as given, tidied (``os.path.normpath`` would turn ``gs://b/x`` into ``gs:/b/x``)."""
  return workdir.rstrip("/") if storage.is_remote(workdir) else os.path.normpath(workdir)


def _default_label(workdir: str) -> str:
  return storage.basename(_tidy(workdir))


def run_labels(workdirs: Sequence[str], labels: Sequence[str] | None) -> list[str]:
  """The curve labels: given ones, else the workdir names (made unique with their paths)."""
  if labels is not None:
    if len(labels) != len(workdirs):
      raise CompareError(f"--labels has {len(labels)} names for {len(workdirs)} workdirs; give "
                         "one label per workdir, comma separated.")
    if len(set(labels)) != len(labels):
      raise CompareError(f"--labels must be distinct, got {list(labels)}.")
    return list(labels)
  names = [_default_label(w) for w in workdirs]
  return [_tidy(w) if names.count(n) > 1 else n for w, n in zip(workdirs, names)]


def compare(workdirs: Sequence[str], out: str, *, labels: Sequence[str] | None = None,
            size_inches: tuple[float, float] = (10.0, 4.0), dpi: int = 100) -> list[dict]:
  """Draws every run's learning curves into ``out`` and returns one summary per run.

  Raises:
    CompareError: for a workdir without metrics, or labels that do not match the workdirs.
  """
  if not workdirs:
    raise CompareError("Give at least one workdir.")
  names = run_labels(workdirs, labels)
  runs = {n: read_run(w) for w, n in zip(workdirs, names)}
  summaries = [summarize_run(w, label=n, records=runs[n]) for w, n in zip(workdirs, names)]
  plots.plot_learning_curves(runs, out, size_inches=size_inches, dpi=dpi)
  return summaries


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """The command line of ``atac-compare``."""
  parser = argparse.ArgumentParser(
      prog="atac-compare", description="Plot the learning curves of several training runs on "
      "shared axes and print one JSON summary line per run.")
  parser.add_argument("workdirs", nargs="+", metavar="DIR", help="training workdirs")
  parser.add_argument("--out", required=True, metavar="FILE.png", help="output PNG path")
  parser.add_argument("--labels", metavar="A,B,...", help="comma-separated curve labels, one per DIR "
                      "(default: the workdir names)")
  parser.add_argument("--width", type=float, default=10.0, help="figure width in inches")
  parser.add_argument("--height", type=float, default=4.0, help="figure height in inches")
  parser.add_argument("--dpi", type=int, default=100, help="PNG resolution (default 100)")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the CLI; returns the exit status (2 for workdirs that cannot be compared)."""
  args = parse_args(argv)
  labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
  try:
    summaries = compare(args.workdirs, args.out, labels=labels,
                        size_inches=(args.width, args.height), dpi=args.dpi)
  except (ValueError, FileNotFoundError) as error:
    print(f"atac-compare: error: {error}", file=sys.stderr)
    return 2
  for summary in summaries:
    print(json.dumps(summary))
  return 0


def run() -> None:
  """Console-script entry point."""
  sys.exit(main())


if __name__ == "__main__":
  run()
