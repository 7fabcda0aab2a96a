"""``atac-viz``: the gate of every attention unit of a trained model, for one image, in one PNG.

    atac-viz --workdir workdirs/quickstart --dataset-index 0 --out gates.png
    atac-viz --workdir workdirs/quickstart --image my_digit.png --out gates.png [--step N]

Every unit is read out exactly through the units' introspection contract (``atac_jax.layers``),
not reconstructed as ``y / x``: one eval-mode forward pass with the ``intermediates`` collection
mutable, in which each gate unit (ATAC, ``atac_global``, SE, xUnit) sows its ``gate``, with
``unit(x) == x * gate`` element-wise, and each AReLU its two slopes (``negative_slope``,
``positive_slope``). The figure shows the input, then one panel per unit in forward order: the
gate averaged over channels as a heat map (``--reduce top-channel``: the channel whose gate
varies most over the pixels), on a shared 0..1 colour scale; units with one gate per channel
(SE, ``atac_global``) show their channel gates as a small grid. AReLU has no gate map; its learnt
slopes are drawn as a bar chart.

The image is preprocessed exactly like eval: ``--dataset-index N`` takes example N of the
config's eval split (or ``--split``); ``--image FILE`` is converted to the dataset's channel
count, resized (or, for ImageNet-style configs, resized and centre-cropped) to the model input
and normalised with the dataset's mean/std.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Any, Mapping, Sequence

import numpy as np

from atac_train.gates import VizError, forward, gate_maps  # noqa: F401  (re-exported)


def panel_grid(num_panels: int, max_cols: int) -> tuple[int, int]:
  """``(rows, cols)`` of the gate grid (the input counts as a panel)."""
  cols = max(1, min(num_panels, max_cols))
  return math.ceil(num_panels / cols), cols


PANEL_INCHES = 2.2  # side of one panel
TITLE_INCHES = 0.6  # per-row room for the three-line panel titles
HEADER_INCHES = 0.4  # figure title
COLORBAR_INCHES = 1.2  # colour bar strip on the right
SLOPES_INCHES = 2.6  # AReLU bar-chart row


def gate_figure_size(num_panels: int, *, max_cols: int = 5, with_slopes: bool = False
                     ) -> tuple[float, float]:
  """Figure size in inches of :func:`draw_gate_grid`; the PNG is ``size * dpi`` pixels."""
  rows, cols = panel_grid(num_panels, max_cols)
  width = cols * PANEL_INCHES + COLORBAR_INCHES
  height = HEADER_INCHES + rows * (PANEL_INCHES + TITLE_INCHES) + 0.1
  if with_slopes:
    height += SLOPES_INCHES
    width = max(width, 6.0)
  return width, height


REDUCTIONS = ("mean", "top-channel")


def _panel_image(gate: np.ndarray, reduce: str) -> tuple[np.ndarray, str]:
  """What a panel shows for one gate ``(H, W, C)`` and a subtitle saying so.

  ``'mean'``: the gate averaged over channels. ``'top-channel'``: the one channel whose gate
  varies most over the pixels. Channel gates (``H = W = 1``) show all C values as a grid.
  """
  h, w, c = gate.shape
  if h * w > 1:
    low, high = np.quantile(gate, [0.1, 0.9])
    spread = f"elements p10-p90 {low:.2f}-{high:.2f}"
    if reduce == "top-channel":
      channel = int(np.argmax(gate.reshape(h * w, c).std(axis=0)))
      return gate[..., channel], f"{h}x{w}, channel {channel} of {c} (most varying)\n{spread}"
    return gate.mean(axis=-1), f"{h}x{w}, mean of {c} ch = {float(gate.mean()):.2f}\n{spread}"
  cols = 2 ** math.ceil(math.log2(math.sqrt(c))) if c > 1 else 1
  rows = math.ceil(c / cols)
  grid = np.full(rows * cols, np.nan, np.float32)
  grid[:c] = gate.reshape(-1)
  return grid.reshape(rows, cols), f"{c} channel gates\nmean {float(gate.mean()):.2f}"


def _draw_slopes(ax, slopes: Mapping[str, tuple[float, float]]) -> None:
  """AReLU's two slopes per unit as grouped bars."""
  x = np.arange(len(slopes))
  negative, positive = zip(*slopes.values())
  ax.bar(x - 0.2, negative, width=0.4, label="x < 0: clamp(alpha)")
  ax.bar(x + 0.2, positive, width=0.4, label="x >= 0: 1 + sigmoid(beta)")
  ax.axhline(1.0, color="gray", linewidth=0.8, linestyle=":")
  ax.set_ylim(0.0, 1.35 * max(max(negative), max(positive), 1.0))
  ax.set_xticks(x, list(slopes), rotation=30, ha="right", fontsize=6)
  ax.set_ylabel("AReLU slope", fontsize=8)
  ax.legend(fontsize=7, loc="upper left", ncols=2)


def draw_gate_grid(display_image: np.ndarray, gates: Mapping[str, np.ndarray], out: str, *,
                   slopes: Mapping[str, tuple[float, float]] | None = None,
                   title: str = "", input_title: str = "input", max_cols: int = 5,
                   dpi: int = 100, cmap: str = "viridis", reduce: str = "mean"
                   ) -> tuple[int, int]:
  """Draws the input and one heat map per unit (shared 0..1 colour bar) into a PNG.

  Args:
    display_image: the input as the model saw it before normalisation, ``(H, W, C)`` in [0, 1].
    gates: module path -> gate ``(H', W', C')`` (see :func:`gate_maps`).
    out: PNG path (written atomically).
    slopes: AReLU module path -> (negative, positive) slope, drawn as a bar chart row.
    title: figure title.
    input_title: title of the input panel.
    max_cols: panels per row.
    dpi: resolution; the PNG is ``gate_figure_size(...) * dpi`` pixels.
    cmap: colour map of the gate panels.
    reduce: ``'mean'`` (the gate averaged over channels) or ``'top-channel'`` (the channel whose
      gate varies most over the pixels); channel gates always show every channel.

  Returns:
    The PNG size ``(width, height)`` in pixels.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  if reduce not in REDUCTIONS:
    raise VizError(f"Unknown reduce={reduce!r}; accepted: {list(REDUCTIONS)}.")
  slopes = dict(slopes or {})
  num_panels = 1 + len(gates)
  rows, cols = panel_grid(num_panels, max_cols)
  width, height = gate_figure_size(num_panels, max_cols=max_cols, with_slopes=bool(slopes))
  fig = plt.figure(figsize=(width, height), dpi=dpi)
  # Rows of [title strip, panel], top to bottom, below the figure title.
  row_inches = PANEL_INCHES + TITLE_INCHES
  top = 1 - (HEADER_INCHES + TITLE_INCHES) / height
  bottom = 1 - (HEADER_INCHES + rows * row_inches) / height
  spec = fig.add_gridspec(rows, cols, left=0.1 / width, right=(cols * PANEL_INCHES) / width,
                          top=top, bottom=bottom, hspace=TITLE_INCHES / PANEL_INCHES,
                          wspace=0.12)
  axes = [fig.add_subplot(spec[i // cols, i % cols]) for i in range(rows * cols)]
  for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
  image = np.clip(np.asarray(display_image, np.float32), 0.0, 1.0)
  if image.shape[-1] == 1:
    axes[0].imshow(image[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
  else:
    axes[0].imshow(image, interpolation="nearest")
  axes[0].set_title(input_title, fontsize=7.5)
  mappable = None
  for ax, (path, gate) in zip(axes[1:], gates.items()):
    panel, what = _panel_image(np.asarray(gate, np.float32), reduce)
    mappable = ax.imshow(panel, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_title(f"{path}\n{what}", fontsize=7.5)
  for ax in axes[num_panels:]:
    ax.axis("off")
  if mappable is not None:
    cax = fig.add_axes(((cols * PANEL_INCHES + 0.25) / width,
                        bottom + 0.1 * (top - bottom), 0.18 / width, 0.8 * (top - bottom)))
    bar = fig.colorbar(mappable, cax=cax)
    bar.set_label("gate value (0 = closed, 1 = open)", fontsize=9)
  if slopes:
    _draw_slopes(fig.add_axes((0.8 / width, 0.75 / height, 1 - 1.2 / width,
                               (SLOPES_INCHES - 1.2) / height)), slopes)
  if title:
    fig.suptitle(title, fontsize=10, y=1 - 0.1 / height, va="top")
  tmp = out + ".tmp.png"
  fig.savefig(tmp, dpi=dpi)
  plt.close(fig)
  os.replace(tmp, out)
  return round(width * dpi), round(height * dpi)


# ----------------------------------------------------------------------------------- inputs


@dataclasses.dataclass(frozen=True)
class Example:
  """One preprocessed model input.

  Attributes:
    image: normalised float32 ``(H, W, C)``, exactly what eval feeds the model.
    display: the same pixels before normalisation, scaled to [0, 1].
    label: the true label, or None for an image file.
    description: where it came from.
  """
  image: np.ndarray
  display: np.ndarray
  label: int | None
  description: str


def _dataset_config(config: Mapping[str, Any]):
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(dict(config["dataset"]))


def _model_shape(config: Mapping[str, Any], dataset, source) -> tuple[int, int, int]:
  from atac_train.data import config as config_lib  # pylint: disable=g-import-not-at-top
  shape = config["dataset"].get("image_shape")
  if shape:
    return tuple(int(s) for s in shape)
  return config_lib.output_shape(dataset, source.image_shape)


def _normalise(dataset, pixels: np.ndarray, *, max_value: float) -> np.ndarray:
  from atac_train.data import augment  # pylint: disable=g-import-not-at-top
  from atac_train.data import config as config_lib  # pylint: disable=g-import-not-at-top
  mean, std = config_lib.normalization(dataset, pixels.shape[-1])
  return augment.Normalizer(mean, std, max_value=max_value)(pixels[None])[0]


def load_example(config: Mapping[str, Any], index: int, *, split: str | None = None) -> Example:
  """Example ``index`` of ``split`` (default: the eval split), preprocessed exactly like eval.

  Raises:
    VizError: if ``index`` is out of range.
  """
  from atac_train.data import augment, sources  # pylint: disable=g-import-not-at-top
  dataset = _dataset_config(config)
  split = split or dataset.eval_split
  source = sources.open_source(dataset, split)
  if not 0 <= index < len(source):
    raise VizError(f"--dataset-index {index} is out of range: split {split!r} of "
                   f"{dataset.name!r} has {len(source)} examples (accepted: 0..{len(source) - 1}).")
  shape = _model_shape(config, dataset, source)
  preprocess = augment.eval_preprocess(dataset.augment, size=shape[:2], channels=shape[-1])
  record = source[index]
  pixels = preprocess(record["image"])
  return Example(image=_normalise(dataset, pixels, max_value=source.max_value),
                 display=pixels.astype(np.float32) / source.max_value, label=int(record["label"]),
                 description=f"{dataset.name} {split}[{index}]")


def load_image_file(config: Mapping[str, Any], path: str) -> Example:
  """An image file as the model's input: dataset channel count, eval resize, dataset mean/std.

  8-bit pixels are read as ``value / 255`` in [0, 1] before the dataset's normalisation (for the
  digits dataset, whose pixels run 0..16, that is the same [0, 1] scale).

  Raises:
    VizError: if the file does not exist or is not an image.
  """
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  from atac_train.data import augment  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise VizError(f"Image file {path!r} does not exist.")
  dataset = _dataset_config(config)
  shape = tuple(int(s) for s in config["dataset"]["image_shape"])
  try:
    with Image.open(path) as img:
      pixels = np.asarray(img.convert("L" if shape[-1] == 1 else "RGB"))
  except (UnidentifiedImageError, OSError) as error:
    raise VizError(f"Cannot read {path!r} as an image ({error}).") from error
  preprocess = augment.eval_preprocess(dataset.augment, size=shape[:2], channels=shape[-1])
  pixels = preprocess(pixels)
  return Example(image=_normalise(dataset, pixels, max_value=255.0),
                 display=pixels.astype(np.float32) / 255.0, label=None,
                 description=os.path.basename(path))


# ----------------------------------------------------------------------------------- CLI core


def visualize(workdir: str, out: str, *, image: str | None = None,
              dataset_index: int | None = None, split: str | None = None,
              step: int | None = None, reduce: str = "mean", max_cols: int = 5,
              dpi: int = 100) -> dict[str, Any]:
  """Loads a checkpoint, runs one image and draws its gate maps; returns a JSON-able summary.

  Raises:
    FileNotFoundError: no checkpoint under ``workdir`` (the message says how to train one).
    VizError: a bad image/index, or a model without attention units.
  """
  from atac_jax import checkpoint  # pylint: disable=g-import-not-at-top
  if reduce not in REDUCTIONS:
    raise VizError(f"Unknown reduce={reduce!r}; accepted: {list(REDUCTIONS)}.")
  if (image is None) == (dataset_index is None):
    raise VizError("Give exactly one of --image FILE and --dataset-index N.")
  step_dir = checkpoint.resolve_step_dir(workdir, step=step)
  model, variables, config = checkpoint.load(step_dir)
  example = (load_image_file(config, image) if image is not None
             else load_example(config, dataset_index, split=split))
  logits, gates, slopes = forward(model, variables, example.image)
  act = config["model"]["act"]
  if not gates and not slopes:
    raise VizError(f"No attention units in this model (act={act}, model "
                   f"{config['model']['name']}): nothing to draw. atac-viz shows the gates of "
                   "atac, atac_global, se and xunit units and the slopes of arelu units.")
  probs = np.exp(logits - logits.max())
  probs /= probs.sum()
  prediction = int(np.argmax(logits))
  truth = f"label {example.label}, " if example.label is not None else ""
  input_title = f"{example.description}\n{truth}pred {prediction} (p={probs[prediction]:.2f})"
  step_number = int(os.path.basename(step_dir))
  shown = "mean over channels" if reduce == "mean" else "most varying channel"
  title = (f"{config['model']['name']} act={act}, step {step_number}: gate of each attention "
           f"unit ({shown}; eval mode)")
  size = draw_gate_grid(example.display, gates, out, slopes=slopes, title=title,
                        input_title=input_title, max_cols=max_cols, dpi=dpi, reduce=reduce)
  return {"out": out, "workdir": workdir, "step": step_number, "act": act,
          "input": example.description, "label": example.label, "prediction": prediction,
          "probability": round(float(probs[prediction]), 4), "units": len(gates),
          "arelu_units": len(slopes), "size": list(size),
          "mean_gate": {path: round(float(np.mean(g)), 4) for path, g in gates.items()}}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """The command line of ``atac-viz``."""
  parser = argparse.ArgumentParser(
      prog="atac-viz", description="Draw the gate of every attention unit of a trained model for "
      "one image (PNG) and print a JSON summary.")
  parser.add_argument("--workdir", required=True, metavar="DIR",
                      help="training workdir, its checkpoints/ folder or a step folder")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--image", metavar="FILE", help="an image file (PNG, JPEG, ...)")
  source.add_argument("--dataset-index", "--dataset_index", type=int, dest="dataset_index", metavar="N",
                      help="example N of the eval split (or --split)")
  parser.add_argument("--split", help="split for --dataset-index (default: the eval split)")
  parser.add_argument("--step", type=int, metavar="N", help="checkpoint step (default: the latest)")
  parser.add_argument("--out", required=True, metavar="FILE.png", help="output PNG path")
  parser.add_argument("--reduce", choices=REDUCTIONS, default="mean",
                      help="per panel: the gate averaged over channels (default) or the channel "
                      "whose gate varies most over the pixels")
  parser.add_argument("--max-cols", "--max_cols", type=int, default=5, dest="max_cols",
                      help="panels per row (default 5)")
  parser.add_argument("--dpi", type=int, default=100, help="PNG resolution (default 100)")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the CLI; returns the exit status (2 for a request that cannot be served)."""
  args = parse_args(argv)
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  try:
    result = visualize(args.workdir, args.out, image=args.image, dataset_index=args.dataset_index,
                       split=args.split, step=args.step, reduce=args.reduce,
                       max_cols=args.max_cols, dpi=args.dpi)
  except (ValueError, FileNotFoundError) as error:
    print(f"atac-viz: error: {error}", file=sys.stderr)
    return 2
  print(json.dumps(result))
  return 0


def run() -> None:
  """Console-script entry point."""
  sys.exit(main())


if __name__ == "__main__":
  run()
