"""``atac-bench``: train-step and input-pipeline benchmarks on synthetic data; one JSON line each.

    atac-bench train --model cifar_resnet20 --act atac --batch 128 --compare relu
    atac-bench train --model cifar_resnet20 --act atac --compare atac \
        --compare-act-option memory_lean=false          # memory-lean vs plain ATAC
    atac-bench train --model resnet50 --act atac --act-layers 2 --batch 256 --dtype bf16 \
        --steps 0 --compare relu                        # compile only: temp_bytes
    atac-bench data --kind cifar --workers 0 2
    atac-bench step-with-input --model cifar_resnet20 --batch 128
    atac-bench compile --topology v5e:2x2 --model cifar_resnet20 --act atac --compare relu
    atac-bench compile --topology h100:1 --model cifar_resnet20 --act atac --compare relu
    atac-bench kernels                                  # on a TPU: Pallas vs XLA backward
    atac-bench baseline --checkout /tmp/old             # this checkout's ATAC vs another's

``train`` builds the real training step of the project (``atac_train.trainer.setup`` +
``compile_steps``: ``atac_train.steps.train_step`` on ``train.state.create_train_state`` with the
``train.optim`` optimizer, state donated, batch sharded over the ``data`` mesh) for a model of
:func:`atac_jax.models.create` on a synthetic batch, and reports the compile time, XLA's
``temp_size_in_bytes`` (scratch memory of one step, parameters and batch excluded) and the median
step time. ``--compare OTHER`` builds both steps in one process and times them in alternating
rounds (A, B, A, B, ...) so that drift and load from other processes hit both alike.
``compile`` compiles the same step for a Cloud TPU topology with libtpu, or for NVIDIA GPUs with
the CUDA plugin, and reports XLA's per-chip (per-GPU) cost there (no TPU or GPU needed;
:mod:`atac_train.aot`). ``kernels`` checks the Pallas
backward against the XLA backward on this machine's device (:mod:`atac_train.kernel_check`).
``baseline`` times this checkout's unit against another checkout's in one process
(:mod:`atac_train.baseline`).

The XLA CPU defaults of :mod:`train.cpu_defaults` are applied before JAX starts (a flag the
user set in ``XLA_FLAGS`` wins).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from typing import Any, Sequence

DTYPES = ("float32", "bf16")
_IMAGE_SHAPES = {"resnet": ((224, 224, 3), 1000), "alexnet": ((128, 128, 3), 10),
                 "convnet": ((28, 28, 1), 10), "cifar": ((32, 32, 3), 10)}


def image_spec(model: str) -> tuple[tuple[int, int, int], int]:
  """``(image_shape, num_classes)`` of the data a model is made for (ImageNet for ``resnetN``)."""
  for prefix, spec in _IMAGE_SHAPES.items():
    if model.startswith(prefix):
      return spec
  return _IMAGE_SHAPES["cifar"]


def bench_config(model: str, act: str, *, batch: int, dtype: str = "float32",
                 reduction: int | None = None, act_layers: int | None = None,
                 act_options: dict[str, Any] | None = None, augment: str = "none",
                 seed: int = 0):
  """A training config (``atac_train.defaults.base_config``) for ``model``/``act`` on synthetic data.

  Args:
    model: a name of ``atac_jax.models.available_models()``.
    act: an activation name.
    batch: global batch size.
    dtype: 'float32' or 'bf16' (``half_precision``: bf16 compute, float32 params).
    reduction: ATAC reduction (None: the unit's default).
    act_layers: placement option of the model (None: the model's default).
    act_options: further activation options, e.g. ``{'memory_lean': False}``.
    augment: dataset augmentation ('none', or 'cifar' for the real CIFAR input path).
    seed: init and data seed.
  """
  from atac_train import defaults  # pylint: disable=g-import-not-at-top
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}.")
  shape, num_classes = image_spec(model)
  config = defaults.base_config()
  config.seed = seed
  config.model.name, config.model.act = model, act
  options = {}
  if reduction is not None:
    options["reduction"] = reduction
  if act_layers is not None:
    options["act_layers"] = act_layers
  if act_options:
    options["act_options"] = dict(act_options)
  config.model.options = options
  config.half_precision = dtype == "bf16"
  config.global_batch_size = batch
  config.num_epochs = 1
  config.progress_bar = False
  ds = config.dataset
  ds.name, ds.source, ds.augment = "synthetic", "synthetic", augment
  ds.synthetic_shape, ds.synthetic_num_classes = shape, num_classes
  ds.synthetic_num_examples = max(1024, 4 * batch)
  ds.synthetic_seed = seed
  return config


@dataclasses.dataclass
class StepBench:
  """A compiled train step with its state and a device batch, ready to be timed."""
  name: str
  config: Any
  setup: Any
  step: Any  # the compiled (AOT) train step: step(state, batch) -> (state, metrics)
  state: Any
  batch: Any
  compile_seconds: float
  temp_bytes: int
  argument_bytes: int
  output_bytes: int
  times: list[float] = dataclasses.field(default_factory=list)
  cpu_times: list[float] = dataclasses.field(default_factory=list)  # process CPU seconds
  first_loss: float | None = None  # of the untimed warm-up step
  last_metrics: Any = None  # of the last step run

  def run(self, steps: int) -> None:
    """Runs ``steps`` steps, blocking after each, and records their wall and CPU times."""
    import jax  # pylint: disable=g-import-not-at-top
    for _ in range(steps):
      start, cpu_start = time.perf_counter(), time.process_time()
      self.state, metrics = self.step(self.state, self.batch)
      jax.block_until_ready(metrics)
      self.times.append(time.perf_counter() - start)
      self.cpu_times.append(time.process_time() - cpu_start)
      self.last_metrics = metrics

  def info(self) -> dict[str, Any]:
    """What was measured: model, activation, batch, dtype, compile time, memory, device."""
    import jax  # pylint: disable=g-import-not-at-top
    c = self.config
    options = dict(c.model.options)
    act_options = dict(options.pop("act_options", {}))
    device = jax.devices()[0]
    return {"model": c.model.name, "act": c.model.act, "batch": c.global_batch_size,
            "dtype": "bf16" if c.half_precision else "float32", **options,
            "act_options": act_options, "compile_seconds": self.compile_seconds,
            "temp_bytes": self.temp_bytes, "argument_bytes": self.argument_bytes,
            "output_bytes": self.output_bytes, "num_devices": self.setup.mesh.size,
            "device_kind": device.device_kind, "platform": device.platform}

  def summary(self) -> dict[str, Any]:
    """:meth:`info` plus the median (and min) over the recorded, post-compilation steps.

    Without timed steps (compile-only), the timing fields are None.
    """
    median = statistics.median(self.times) if self.times else None
    return {**self.info(), "steps": len(self.times), "step_seconds_median": median,
            "step_seconds_min": min(self.times) if self.times else None,
            "cpu_seconds_median": statistics.median(self.cpu_times) if self.cpu_times else None,
            "images_per_second": self.config.global_batch_size / median if median else None,
            "first_loss": self.first_loss}


def _devices(num_devices: int):
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  if not 1 <= num_devices <= len(devices):
    raise ValueError(f"num_devices must be in 1..{len(devices)}, got {num_devices}.")
  return devices[:num_devices]


def build_step(config, *, num_devices: int = 1, name: str = "",
               compile_only: bool = False, model: Any = None) -> StepBench:
  """Compiles the project's train step for ``config`` and makes its state and a device batch.

  The step is ``atac_train.trainer.compile_steps`` (jit of ``atac_train.steps.train_step`` with explicit
  shardings and the state donated), lowered and compiled ahead of time for the batch; the
  compiled executable is what gets timed (after one untimed warm-up step), and its memory
  analysis gives ``temp_bytes``. ``compile_only`` lowers on shapes alone and allocates nothing,
  so a model too big to train here can still be compiled and measured. ``model`` trains that
  Flax module instead of the config's (``trainer.setup``).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from atac_train import parallel, trainer  # pylint: disable=g-import-not-at-top
  from atac_train.data import device  # pylint: disable=g-import-not-at-top
  s = trainer.setup(config, devices=_devices(num_devices), model=model)
  batch_shape = (config.global_batch_size, *s.info.image_shape)
  if compile_only:
    state = s.abstract_state
    batch = {k: jax.ShapeDtypeStruct(shape, dtype)
             for k, (shape, dtype) in device.batch_shapes(s.info, batch_shape[0]).items()}
  else:
    state = jax.jit(s.init_fn, out_shardings=s.state_sharding)(jax.random.PRNGKey(config.seed))
    local = device.example_batch(s.info, batch_shape[0], seed=config.seed)
    batch = parallel.global_batch(local, s.batch_sharding)
  train_step, _ = trainer.compile_steps(config, s)
  start = time.perf_counter()
  compiled = train_step.lower(state, batch).compile()
  compile_seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  bench = StepBench(name=name or config.model.act, config=config, setup=s, step=compiled,
                    state=state, batch=batch, compile_seconds=compile_seconds,
                    temp_bytes=int(memory.temp_size_in_bytes),
                    argument_bytes=int(memory.argument_size_in_bytes),
                    output_bytes=int(memory.output_size_in_bytes))
  if not compile_only:
    bench.run(1)  # first-run allocations; not recorded
    bench.first_loss = float(bench.last_metrics["loss"])
    bench.times.clear()
    bench.cpu_times.clear()
  return bench


def bench_train(config, *, steps: int = 10, num_devices: int = 1) -> dict[str, Any]:
  """Figures of one train step: compile time, temp bytes, median step time and images/s.

  ``steps=0`` compiles only (timing fields None).
  """
  bench = build_step(config, num_devices=num_devices, compile_only=steps <= 0)
  bench.run(steps)
  return bench.summary()


def alternate(benches: Sequence[StepBench], *, rounds: int, steps: int) -> None:
  """Runs ``steps`` steps of each bench per round, the first one rotating every round (with
  two: A, B, then B, A), so that drift and load from other processes hit all alike."""
  for i in range(rounds):
    for j in range(len(benches)):
      benches[(i + j) % len(benches)].run(steps)


def per_round_ratios(times_a: Sequence[float], times_b: Sequence[float], *,
                     steps: int) -> list[float]:
  """Per round of ``steps`` steps, the median of A's times over the median of B's (robust when
  the machine's load changes between rounds)."""
  if steps < 1:
    return []
  return [statistics.median(times_a[i:i + steps]) / statistics.median(times_b[i:i + steps])
          for i in range(0, min(len(times_a), len(times_b)) // steps * steps, steps)]


def median_interval(values: Sequence[float], *, confidence: float = 0.95,
                    resamples: int = 4000, seed: int = 0) -> list[float] | None:
  """A percentile-bootstrap confidence interval ``[low, high]`` for the median of ``values``.

  For per-round ratios: how far the median of rounds could move if the run were repeated
  under the same drift. It does not cover what changes between runs or hosts (another day's
  machine), so compare two codes inside one run. None for fewer than two values.
  """
  if len(values) < 2:
    return None
  import numpy as np  # pylint: disable=g-import-not-at-top
  from scipy import stats  # pylint: disable=g-import-not-at-top
  result = stats.bootstrap((np.asarray(values, dtype=np.float64),), np.median,
                           confidence_level=confidence, n_resamples=resamples,
                           method="percentile", rng=np.random.default_rng(seed))
  interval = result.confidence_interval
  return [float(interval.low), float(interval.high)]


def compare(config_a, config_b, *, steps: int = 10, rounds: int = 5,
            num_devices: int = 1) -> dict[str, Any]:
  """Times two train steps in alternating rounds (A, B, A, B, ...) in one process.

  Each round runs ``steps`` steps of A then ``steps`` of B (the order flips every round, so
  neither always follows the other); the medians are over all rounds.

  Returns:
    ``{'a': summary_a, 'b': summary_b, 'time_ratio': median_a / median_b,
    'time_ratio_median_of_rounds': ..., 'time_ratio_ci95': [low, high] (of the median of
    rounds, :func:`median_interval`), 'temp_bytes_ratio': temp_a / temp_b, ...}``.
  """
  timed = steps > 0 and rounds > 0
  a = build_step(config_a, num_devices=num_devices, name="a", compile_only=not timed)
  b = build_step(config_b, num_devices=num_devices, name="b", compile_only=not timed)
  alternate([a, b], rounds=rounds if timed else 0, steps=steps)
  sa, sb = a.summary(), b.summary()
  per_round = per_round_ratios(a.times, b.times, steps=steps)
  return {"a": sa, "b": sb, "rounds": rounds, "steps_per_round": steps,
          "time_ratio": sa["step_seconds_median"] / sb["step_seconds_median"] if timed else None,
          "time_ratio_per_round": per_round,
          "time_ratio_median_of_rounds": statistics.median(per_round) if timed else None,
          "time_ratio_ci95": median_interval(per_round),
          "temp_bytes_ratio": sa["temp_bytes"] / sb["temp_bytes"],
          "images_per_second_a": sa["images_per_second"],
          "images_per_second_b": sb["images_per_second"]}


def bench_step_with_input(config, *, steps: int = 20, num_devices: int = 1) -> dict[str, Any]:
  """Step time with the real input pipeline vs with a pre-made device batch.

  Runs the trainer's loop shape (``next(train_iter)`` -> ``global_batch`` -> step, no blocking
  between steps, so input preparation overlaps the asynchronous step) for ``steps`` steps, and
  the same loop re-using one device batch. ``input_wait_fraction`` near 0 means the step does
  not wait on input.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from atac_train import data, parallel  # pylint: disable=g-import-not-at-top
  bench = build_step(config, num_devices=num_devices)
  s = bench.setup
  it = data.create_train_iterator(config.dataset, global_batch_size=config.global_batch_size,
                                  seed=config.seed)
  for _ in range(2):  # warm the pipeline's prefetch threads
    next(it)

  def loop(with_input: bool) -> float:
    start = time.perf_counter()
    for _ in range(steps):
      batch = parallel.global_batch(next(it), s.batch_sharding) if with_input else bench.batch
      bench.state, metrics = bench.step(bench.state, batch)
    jax.block_until_ready((bench.state, metrics))
    return (time.perf_counter() - start) / steps

  fixed, real = [], []
  for _ in range(2):  # alternate to cancel drift
    fixed.append(loop(False))
    real.append(loop(True))
  start = time.perf_counter()
  for _ in range(steps):
    next(it)
  input_only = (time.perf_counter() - start) / steps
  fixed_s, real_s = min(fixed), min(real)
  return {**bench.info(), "augment": config.dataset.augment, "num_workers": config.dataset.num_workers,
          "steps": steps, "step_seconds_device_batch": fixed_s,
          "step_seconds_with_input": real_s, "input_seconds_per_batch": input_only,
          "input_images_per_second": config.global_batch_size / input_only,
          "images_per_second_device_batch": config.global_batch_size / fixed_s,
          "images_per_second_with_input": config.global_batch_size / real_s,
          "input_wait_fraction": max(0.0, 1.0 - fixed_s / real_s)}


def act_options(args) -> dict[str, Any]:
  """``--act-option KEY=JSON`` arguments as a dict (a bare ``KEY`` means True)."""
  options: dict[str, Any] = {}
  for item in args.act_option or ():
    key, _, value = item.partition("=")
    options[key] = json.loads(value) if value else True
  return options


def config_from_args(args, act: str, act_options: dict[str, Any], augment: str = "none"):
  """The benchmark config of parsed ``atac-bench train``/``compile`` arguments for ``act``."""
  return bench_config(args.model, act, batch=args.batch, dtype=args.dtype,
                      reduction=args.reduction if act.startswith("atac") or act == "se" else None,
                      act_layers=args.act_layers, act_options=act_options, augment=augment,
                      seed=args.seed)


def emit(record: dict[str, Any], out: str | None = None) -> None:
  """Prints a result record as one JSON line and appends it to ``out`` if given."""
  line = json.dumps(record, default=float)
  print(line, flush=True)
  if out:
    with open(out, "a") as f:
      f.write(line + "\n")


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="atac-bench", description=__doc__.split("\n", 1)[0])
  sub = parser.add_subparsers(dest="command", required=True)

  def model_args(p, timed=True):
    p.add_argument("--model", default="cifar_resnet20")
    p.add_argument("--act", default="atac")
    p.add_argument("--batch", type=int, default=128)
    if timed:
      p.add_argument("--steps", type=int, default=10,
                     help="timed steps (per round with --compare); 0 compiles only")
      p.add_argument("--num-devices", type=int, default=1)
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--reduction", type=int, default=None)
    p.add_argument("--act-layers", type=int, default=None)
    p.add_argument("--act-option", action="append", metavar="KEY=JSON",
                   help="activation option, e.g. memory_lean=false (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also append the JSON line to this file")

  train = sub.add_parser("train", help="train-step time and memory on synthetic data")
  model_args(train)
  train.add_argument("--compare", default=None, metavar="ACT",
                     help="also build the step with activation ACT; alternate timed rounds")
  train.add_argument("--compare-act-option", action="append", metavar="KEY=JSON",
                     help="activation option of the --compare side (default: none)")
  train.add_argument("--rounds", type=int, default=5, help="alternating rounds with --compare")

  step = sub.add_parser("step-with-input",
                        help="step time with the real grain input pipeline vs a device batch")
  model_args(step)
  step.add_argument("--augment", default="cifar")
  step.add_argument("--workers", type=int, default=0)
  step.set_defaults(steps=20)

  comp = sub.add_parser("compile", help="per-chip FLOPs, bytes and peak memory of the step "
                        "compiled for a Cloud TPU topology (libtpu) or NVIDIA GPUs (the CUDA "
                        "plugin); no TPU or GPU needed")
  model_args(comp, timed=False)
  comp.add_argument("--topology", default="v5e:2x2",
                    help="GEN:AxB[xC], GEN in v4 v5e v5p v6e; or GPU:N (one host) or GPU:HxN, "
                    "GPU in a100 h100 h200 b200 (default: %(default)s)")
  comp.add_argument("--compare", default=None, metavar="ACT", help="also compile with ACT")
  comp.add_argument("--compare-act-option", action="append", metavar="KEY=JSON",
                    help="activation option of the --compare side (default: none)")
  comp.add_argument("--breakdown", type=int, default=0, metavar="N",
                    help="add the N instructions that move the most bytes")
  comp.add_argument("--step", choices=("project", "user", "shard_map"), default="project",
                    help="the project's train step; a plain SGD step in the user's own jax.jit "
                    "under jax.set_mesh, no project code ('user'); or that step under "
                    "jax.shard_map with the model's axis_name (default: %(default)s)")

  kern = sub.add_parser("kernels", help="the Pallas backward's gradients against the XLA "
                        "backward's on this machine's device (run it on a TPU or an NVIDIA "
                        "GPU); exits 1 on a mismatch")
  kern.add_argument("--batch", type=int, default=32, help="images a unit (default: %(default)s)")
  kern.add_argument("--tolerance", type=float, default=None,
                    help="largest difference relative to a gradient's magnitude (default: 1e-3; "
                    "1e-2 on a GPU, whose kernels multiply in TF32 as XLA's float32 products do)")
  kern.add_argument("--seed", type=int, default=0)
  kern.add_argument("--out", default=None)

  base = sub.add_parser("baseline", help="this checkout's --act against another checkout's, "
                        "and --compare, in one process (alternating rounds of the train step)")
  base.add_argument("--checkout", required=True, metavar="DIR",
                    help="root of another checkout (e.g. `git worktree add DIR <commit>`)")
  base.add_argument("--model", default="cifar_resnet20")
  base.add_argument("--act", default="atac")
  base.add_argument("--compare", default="relu", metavar="ACT",
                    help="the reference side, from this checkout (default: %(default)s)")
  base.add_argument("--batch", type=int, default=128)
  base.add_argument("--rounds", type=int, default=16)
  base.add_argument("--steps", type=int, default=2, help="timed steps a round")
  base.add_argument("--seed", type=int, default=0)
  base.add_argument("--out", default=None)

  dat = sub.add_parser("data", help="input-pipeline images/s (train.data.benchmark)")
  dat.add_argument("--kind", choices=("cifar", "imagenet"), default="cifar")
  dat.add_argument("--workers", type=int, nargs="+", default=[0])
  dat.add_argument("--num-batches", type=int, default=50)
  dat.add_argument("--batch", type=int, default=128)
  dat.add_argument("--prefetch-buffer", type=int, default=2)
  dat.add_argument("--seed", type=int, default=0)
  dat.add_argument("--out", default=None)
  return parser


def main(argv: Sequence[str] | None = None) -> None:
  """Parses ``argv`` (default: ``sys.argv[1:]``) and prints one JSON line per measurement."""
  args = _parser().parse_args(argv)
  if args.command == "compile":  # for a TPU or GPU, with its compiler: no CPU flags
    from atac_train import aot  # pylint: disable=g-import-not-at-top
    aot.main(args)
    return
  from atac_train import cpu_defaults  # pylint: disable=g-import-not-at-top
  cpu_defaults.apply()  # before JAX initialises its backends
  if args.command == "kernels":
    from atac_train import kernel_check  # pylint: disable=g-import-not-at-top
    try:
      record = kernel_check.check(batch=args.batch, seed=args.seed, tolerance=args.tolerance)
    except ValueError as error:
      print(f"atac-bench: error: {error}", file=sys.stderr)
      sys.exit(2)
    emit(record, args.out)
    if not record["ok"]:
      bad = [r["shape"] for r in record["units"] if not r["ok"]]
      print(f"atac-bench kernels: the Pallas backward differs from the XLA backward for units "
            f"{bad}; train with backward_kernel='xla' (act option) and report it.",
            file=sys.stderr)
      sys.exit(1)
    return
  if args.command == "data":
    from atac_train.data import benchmark  # pylint: disable=g-import-not-at-top
    for workers in args.workers:
      emit(benchmark.benchmark_input(args.kind, num_workers=workers,
                                      num_batches=args.num_batches, batch_size=args.batch,
                                      seed=args.seed, prefetch_buffer=args.prefetch_buffer),
            args.out)
    return
  import os  # pylint: disable=g-import-not-at-top
  flags_info = {"xla_flags": os.environ.get("XLA_FLAGS", "")}
  try:
    if args.command == "baseline":
      from atac_train import baseline  # pylint: disable=g-import-not-at-top
      record = baseline.compare_checkouts(args.checkout, model=args.model, act=args.act,
                                          compare=args.compare, batch=args.batch,
                                          rounds=args.rounds, steps=args.steps, seed=args.seed)
    elif args.command == "step-with-input":
      config = config_from_args(args, args.act, act_options(args), augment=args.augment)
      config.dataset.num_workers = args.workers
      record = bench_step_with_input(config, steps=args.steps, num_devices=args.num_devices)
    elif args.compare:
      other = argparse.Namespace(act_option=args.compare_act_option)
      record = compare(config_from_args(args, args.act, act_options(args)),
                       config_from_args(args, args.compare, act_options(other)),
                       steps=args.steps, rounds=args.rounds, num_devices=args.num_devices)
    else:
      record = bench_train(config_from_args(args, args.act, act_options(args)), steps=args.steps,
                           num_devices=args.num_devices)
  except ValueError as error:
    print(f"atac-bench: error: {error}", file=sys.stderr)
    sys.exit(2)
  emit({**record, **flags_info}, args.out)


def run() -> None:
  """Console-script entry point."""
  main()


if __name__ == "__main__":
  run()
