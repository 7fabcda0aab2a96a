"""Times this checkout's units against another checkout's, in one process (``atac-bench baseline``).

Whether a change made a unit slower is a question about two versions of the code on the same
machine at the same moment; figures taken on different days differ by more than the change
(timings on shared hosts drift by 10-20%). :func:`load_package` imports another checkout's
``atac_jax`` under a second name (a copy whose imports are renamed), and
:func:`compare_checkouts` builds one train step per side and times them in alternating rounds:
``--compare`` (e.g. ReLU) and ``--act`` from this checkout, and ``--act`` from the other one.

Every side is ``atac-bench train``'s step (this checkout's training system, optimizer and
synthetic batch, same seed), so only the model differs. The other checkout needs
:func:`atac_jax.models.create` with this signature (every release has it).
"""

from __future__ import annotations

import atexit
import importlib
import pathlib
import re
import shutil
import statistics
import sys
import tempfile
from types import ModuleType
from typing import Any, Callable

PACKAGE = "atac_jax"
BASELINE_NAME = "atac_jax_baseline"


def _package_dir(checkout: str | pathlib.Path) -> pathlib.Path:
  path = pathlib.Path(checkout).expanduser().resolve()
  for candidate in (path / PACKAGE, path):
    if candidate.name == PACKAGE and (candidate / "__init__.py").is_file():
      return candidate
  raise ValueError(f"--checkout {str(checkout)!r} holds no {PACKAGE} package; give the root of "
                   f"a checkout of this project (e.g. `git worktree add /tmp/old <commit>`) or "
                   f"its {PACKAGE}/ folder.")


def load_package(checkout: str | pathlib.Path, *, name: str = BASELINE_NAME) -> ModuleType:
  """Imports the ``atac_jax`` of ``checkout`` as package ``name``, beside this checkout's.

  The package is copied to a temporary folder (removed at exit) with every ``atac_jax`` in its
  sources renamed, so its modules import one another, not this checkout's.

  Raises:
    ValueError: ``checkout`` holds no ``atac_jax`` package, or ``name`` is already imported from
      elsewhere.
  """
  source = _package_dir(checkout)
  if name in sys.modules:
    loaded = pathlib.Path(getattr(sys.modules[name], "__file__", "") or "")
    origin = getattr(sys.modules[name], "__baseline_source__", None)
    if origin == str(source):
      return sys.modules[name]
    raise ValueError(f"A package {name!r} is already imported (from {loaded}); one baseline a "
                     f"process.")
  root = pathlib.Path(tempfile.mkdtemp(prefix="atac_baseline_"))
  atexit.register(shutil.rmtree, root, ignore_errors=True)
  target = root / name
  shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
  pattern = re.compile(rf"\b{PACKAGE}\b")
  for path in target.rglob("*.py"):
    path.write_text(pattern.sub(name, path.read_text()))
  sys.path.insert(0, str(root))
  try:
    module = importlib.import_module(name)
  finally:
    sys.path.remove(str(root))
  module.__baseline_source__ = str(source)
  return module


def compare_checkouts(checkout: str | pathlib.Path, *, model: str = "cifar_resnet20",
                      act: str = "atac", compare: str = "relu", batch: int = 128,
                      rounds: int = 16, steps: int = 2, seed: int = 0) -> dict[str, Any]:
  """Times ``act`` here, ``act`` in ``checkout`` and ``compare`` here, in alternating rounds.

  Each side is ``atac-bench train``'s step (:func:`atac_train.bench.build_step`, this checkout's
  training system); the baseline side trains the other checkout's
  ``models.create(model, num_classes=..., act=act)``.

  Returns:
    One record: per side :meth:`~atac_train.bench.StepBench.summary` (median step time, process
    CPU time, temp bytes, first-step loss, ...); ``ratio`` (wall) and ``cpu_ratio`` of each side
    to ``compare``, their medians over rounds, and ``speedup_vs_baseline`` (the baseline's wall
    time over this checkout's for ``act``); ``ratio_ci95`` and ``speedup_vs_baseline_ci95``
    bound the medians of rounds (:func:`atac_train.bench.median_interval`).

  Raises:
    ValueError: bad counts, ``compare == act``, or a ``checkout`` without the package.
  """
  if rounds < 1 or steps < 1 or batch < 1:
    raise ValueError(f"rounds, steps and batch must be >= 1, got {rounds}, {steps}, {batch}.")
  if compare == act:
    raise ValueError(f"--compare names the reference activation (default relu); it must differ "
                     f"from --act, got {act!r} for both.")
  from atac_train import bench  # pylint: disable=g-import-not-at-top
  package = load_package(checkout)
  other = importlib.import_module(f"{package.__name__}.models")
  config = bench.bench_config(model, act, batch=batch, seed=seed)
  _, num_classes = bench.image_spec(model)
  sides = [bench.build_step(bench.bench_config(model, compare, batch=batch, seed=seed),
                            name=compare),
           bench.build_step(config, name=act),
           bench.build_step(config, name=f"{act}@baseline",
                            model=other.create(model, num_classes=num_classes, act=act))]
  bench.alternate(sides, rounds=rounds, steps=steps)
  ref = sides[0]

  def ratios(times: Callable[[bench.StepBench], list[float]]) -> tuple[dict, dict]:
    """Each side's overall median ratio to ``ref`` and its per-round ratios."""
    median = {s.name: statistics.median(times(s)) / statistics.median(times(ref)) for s in sides}
    rounds_ = {s.name: bench.per_round_ratios(times(s), times(ref), steps=steps) for s in sides}
    return median, rounds_

  def medians(per_round: dict) -> dict:
    return {name: statistics.median(values) for name, values in per_round.items()}

  ratio, wall_rounds = ratios(lambda s: s.times)
  cpu_ratio, cpu_rounds = ratios(lambda s: s.cpu_times)
  ratio_ci = {s.name: bench.median_interval(wall_rounds[s.name]) for s in sides[1:]}
  speedup_rounds = bench.per_round_ratios(sides[2].times, sides[1].times, steps=steps)
  return {
      "model": model, "act": act, "compare": compare, "batch": batch, "rounds": rounds,
      "steps_per_round": steps, "baseline": package.__baseline_source__,
      "sides": {s.name: s.summary() for s in sides},
      "ratio": ratio, "ratio_median_of_rounds": medians(wall_rounds),
      "ratio_ci95": ratio_ci,
      "cpu_ratio": cpu_ratio, "cpu_ratio_median_of_rounds": medians(cpu_rounds),
      "speedup_vs_baseline": (statistics.median(sides[2].times)
                              / statistics.median(sides[1].times)),
      "speedup_vs_baseline_median_of_rounds": statistics.median(speedup_rounds),
      "speedup_vs_baseline_ci95": bench.median_interval(speedup_rounds),
  }
