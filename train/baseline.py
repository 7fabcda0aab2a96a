"""Times this checkout's units against another checkout's, in one process (``atac-bench baseline``).

Whether a change made a unit slower is a question about two versions of the code on the same
machine at the same moment; figures taken on different days differ by more than the change
(timings on shared hosts drift by 10-20%). :func:`load_package` imports another checkout's
``atac_jax`` under a second name (a copy whose imports are renamed), and
:func:`compare_checkouts` builds one train step per side and times them in alternating rounds:
``--compare`` (e.g. ReLU) and ``--act`` from this checkout, and ``--act`` from the other one.

The step is a plain one shared by all sides (softmax cross-entropy, SGD with Nesterov momentum
0.9 and weight decay 1e-4, learning rate 0.1, ``batch_stats`` updated, parameters and optimizer
state donated), so only the models differ; each side starts from the same seed. The other
checkout needs :func:`atac_jax.models.create` with this signature (every release has it).
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib
import pathlib
import re
import shutil
import statistics
import sys
import tempfile
import time
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


@dataclasses.dataclass
class Side:
  """One timed train step: its name, a runner of one step, and what it measured."""
  name: str
  run: Callable[[], float]
  temp_bytes: int
  first_loss: float
  wall: list[float] = dataclasses.field(default_factory=list)
  cpu: list[float] = dataclasses.field(default_factory=list)


def plain_step(models: ModuleType, name: str, *, model: str, act: str, batch: int,
               image_shape: tuple[int, int, int], num_classes: int, seed: int) -> Side:
  """Compiles the shared plain train step for ``models.create(model, act=act)``.

  Returns:
    A :class:`Side` whose ``run()`` takes one step and returns its loss; ``first_loss`` is the
    loss of an untimed first step.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  net = models.create(model, num_classes=num_classes, act=act)
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.standard_normal((batch, *image_shape)).astype(np.float32))
  labels = jnp.asarray(rng.integers(0, num_classes, batch).astype(np.int32))
  variables = net.init(jax.random.PRNGKey(seed), images[:2], train=False)
  params, stats = variables["params"], variables.get("batch_stats", {})
  optimizer = optax.chain(optax.add_decayed_weights(1e-4),
                          optax.sgd(0.1, momentum=0.9, nesterov=True))

  def step(params, stats, opt_state, images, labels):
    def loss_fn(p):
      logits, updates = net.apply({"params": p, "batch_stats": stats}, images, train=True,
                                  mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, updates.get("batch_stats", {})
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  state = [params, stats, optimizer.init(params)]
  compiled = jax.jit(step, donate_argnums=(0, 1, 2)).lower(*state, images, labels).compile()

  def run() -> float:
    new_params, new_stats, new_opt_state, loss = compiled(*state, images, labels)
    state[:] = [new_params, new_stats, new_opt_state]
    return float(jax.block_until_ready(loss))

  first = run()
  return Side(name, run, int(compiled.memory_analysis().temp_size_in_bytes), first)


def compare_checkouts(checkout: str | pathlib.Path, *, model: str = "cifar_resnet20",
                      act: str = "atac", compare: str = "relu", batch: int = 128,
                      rounds: int = 16, steps: int = 2, seed: int = 0) -> dict[str, Any]:
  """Times ``act`` here, ``act`` in ``checkout`` and ``compare`` here, in alternating rounds.

  Returns:
    One record: per side the median step time (wall clock and process CPU time), temp bytes and
    first-step loss; ``ratio`` (wall) and ``cpu_ratio`` of each side to ``compare``, their
    medians over rounds, and ``speedup_vs_baseline`` (the baseline's wall time over this
    checkout's for ``act``).

  Raises:
    ValueError: bad counts, ``compare == act``, or a ``checkout`` without the package.
  """
  if rounds < 1 or steps < 1 or batch < 1:
    raise ValueError(f"rounds, steps and batch must be >= 1, got {rounds}, {steps}, {batch}.")
  if compare == act:
    raise ValueError(f"--compare names the reference activation (default relu); it must differ "
                     f"from --act, got {act!r} for both.")
  import atac_jax.models as here  # pylint: disable=g-import-not-at-top
  from atac_train.bench import image_spec  # pylint: disable=g-import-not-at-top
  baseline = importlib.import_module(f"{load_package(checkout).__name__}.models")
  image_shape, num_classes = image_spec(model)
  common = dict(model=model, batch=batch, image_shape=image_shape, num_classes=num_classes,
                seed=seed)
  sides = [plain_step(here, compare, act=compare, **common),
           plain_step(here, act, act=act, **common),
           plain_step(baseline, f"{act}@baseline", act=act, **common)]
  for _ in range(rounds):
    for side in sides:
      wall, cpu = time.perf_counter(), time.process_time()
      for _ in range(steps):
        side.run()
      side.wall.append((time.perf_counter() - wall) / steps)
      side.cpu.append((time.process_time() - cpu) / steps)
  ref = sides[0]

  def ratios(values: Callable[[Side], list[float]]) -> tuple[dict, dict]:
    median = {s.name: statistics.median(values(s)) / statistics.median(values(ref)) for s in sides}
    per_round = {s.name: statistics.median([a / b for a, b in zip(values(s), values(ref))])
                 for s in sides}
    return median, per_round

  ratio, ratio_rounds = ratios(lambda s: s.wall)
  cpu_ratio, cpu_rounds = ratios(lambda s: s.cpu)
  return {
      "model": model, "act": act, "compare": compare, "batch": batch, "rounds": rounds,
      "steps_per_round": steps, "baseline": str(_package_dir(checkout)),
      "sides": {s.name: {"step_seconds_median": statistics.median(s.wall),
                         "cpu_seconds_median": statistics.median(s.cpu),
                         "temp_bytes": s.temp_bytes, "first_loss": s.first_loss}
                for s in sides},
      "ratio": ratio, "ratio_median_of_rounds": ratio_rounds,
      "cpu_ratio": cpu_ratio, "cpu_ratio_median_of_rounds": cpu_rounds,
      "speedup_vs_baseline": (statistics.median(sides[2].wall)
                              / statistics.median(sides[1].wall)),
  }
