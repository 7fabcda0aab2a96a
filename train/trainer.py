"""The training loop: one jitted, sharded step over a ``data`` mesh; eval; checkpoints; logs."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from atac_jax import checkpoint as checkpoint_lib
from atac_jax import models
from atac_jax import ops
from atac_jax import workdir as workdir_lib
from atac_train import (checkpointing, data, hooks, interrupts, metrics, optim, parallel, resume,
                        rundir, steps, validation)
from atac_train.data.device import DeviceTransform
from atac_train.errors import ConfigError, NonFiniteLossError
from atac_train.metrics import MetricWriter, Progress, Throughput
from atac_train.state import TrainState, create_train_state
from atac_train.workdir_lock import WorkdirLock

__all__ = ["NonFiniteLossError", "Setup", "setup", "train_and_evaluate", "build_model",
           "compile_steps", "compile_eval_step", "evaluate", "eval_variables", "resolved_config"]


@dataclasses.dataclass
class Setup:
  """Everything derived from the config before the loop starts."""
  info: Any
  model: Any
  mesh: Any
  steps_per_epoch: int
  total_steps: int
  learning_rate_fn: Any
  abstract_state: Any
  state_sharding: Any
  batch_sharding: Any
  init_fn: Any


build_model = workdir_lib.build_model  # the one definition, shared with atac_jax.checkpoint


def setup(config: ml_collections.ConfigDict, *, devices: list[Any] | None = None,
          model: Any = None) -> Setup:
  """Validates the config against the devices and the data, and builds model, optimizer, mesh.

  Nothing is compiled or written: the model is only traced (``jax.eval_shape``).

  Args:
    config: the training config.
    devices: devices of the ``data`` mesh (default: all devices of all processes).
    model: a Flax module to train instead of the config's (``atac-bench baseline`` passes another
      checkout's); the config still names the data, optimizer and schedule.

  Raises:
    ConfigError: (or ValueError / FileNotFoundError from the data) naming the key, the value
      and what is accepted.
  """
  validation.validate(config)
  mesh = parallel.create_mesh(devices)
  parallel.check_batch_size(config.global_batch_size, num_devices=mesh.size)
  parallel.check_batch_size(config.eval_batch_size or config.global_batch_size,
                            num_devices=mesh.size, what="eval_batch_size")
  info = data.get_info(config.dataset)
  steps_per_epoch = info.num_train // config.global_batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"global_batch_size={config.global_batch_size} is larger than the "
                     f"{info.num_train} training examples of {config.dataset.name!r}.")
  total_steps = int(config.num_epochs * steps_per_epoch)
  if total_steps < 1:
    raise ConfigError(f"config.num_epochs={config.num_epochs!r} is not accepted: it makes 0 "
                      f"training steps ({steps_per_epoch} steps per epoch); accepted: at least "
                      f"{1 / steps_per_epoch:.3g}.")
  if model is None:
    model = build_model(config, num_classes=info.num_classes)
  learning_rate_fn = optim.create_schedule(config.schedule, steps_per_epoch=steps_per_epoch,
                                           num_epochs=config.num_epochs)
  tx = optim.create_optimizer(config.optimizer, learning_rate_fn)
  init_fn = functools.partial(create_train_state, model=model, tx=tx,
                              image_shape=tuple(info.image_shape))
  abstract_state = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
  replicated = parallel.replicated(mesh)
  state_sharding = jax.tree.map(lambda _: replicated, abstract_state)
  return Setup(info=info, model=model, mesh=mesh, steps_per_epoch=steps_per_epoch,
               total_steps=total_steps, learning_rate_fn=learning_rate_fn,
               abstract_state=abstract_state, state_sharding=state_sharding,
               batch_sharding=parallel.data_sharded(mesh), init_fn=init_fn)


def compile_steps(config: ml_collections.ConfigDict, s: Setup):
  """The jitted train step (state donated) and eval step, with explicit shardings."""
  replicated = parallel.replicated(s.mesh)
  train_fn = functools.partial(
      steps.train_step, base_rng=jax.random.fold_in(jax.random.PRNGKey(config.seed), 1),
      num_classes=s.info.num_classes, learning_rate_fn=s.learning_rate_fn,
      label_smoothing=config.label_smoothing, mixup_alpha=config.mixup_alpha,
      transform=DeviceTransform.from_info(s.info))
  train_step = jax.jit(_data_parallel(train_fn, s.mesh),
                       in_shardings=(s.state_sharding, s.batch_sharding),
                       out_shardings=(s.state_sharding, replicated), donate_argnums=0)
  return train_step, compile_eval_step(s)


def _data_parallel(fn, mesh):
  """``fn`` traced under ``ops.pallas_backward.data_parallel`` for the batch's mesh axis (the
  Pallas backward then runs per device on its shard of the batch)."""
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with ops.pallas_backward.data_parallel(mesh, (parallel.DATA_AXIS,)):
      return fn(*args, **kwargs)
  return traced


def compile_eval_step(s: Setup):
  """The jitted eval step over ``({'params', 'batch_stats'}, batch)``."""
  replicated = parallel.replicated(s.mesh)
  return jax.jit(functools.partial(steps.eval_step, apply_fn=s.model.apply,
                                   num_classes=s.info.num_classes,
                                   transform=DeviceTransform.from_info(s.info)),
                 in_shardings=(replicated, s.batch_sharding), out_shardings=replicated)


def eval_variables(state: TrainState) -> dict:
  """The variables a forward pass needs."""
  return {"params": state.params, "batch_stats": state.batch_stats}


def evaluate(eval_step, variables: dict, config: ml_collections.ConfigDict, s: Setup, *,
             split: str | None = None) -> dict[str, float]:
  """Full-split evaluation: every example counted exactly once (padded rows are masked)."""
  sums = None
  for local in data.create_eval_iterable(
      config.dataset, split=split, global_batch_size=config.eval_batch_size or
      config.global_batch_size, process_index=jax.process_index(),
      process_count=jax.process_count()):
    sums = steps.accumulate(sums, eval_step(variables,
                                            parallel.global_batch(local, s.batch_sharding)))
  return steps.summarize_eval(jax.device_get(sums))


def _stop_requested() -> bool:
  """Whether SIGINT/SIGTERM reached any process (one answer for all; see interrupts)."""
  if jax.process_count() == 1:
    return interrupts.requested()
  flags = multihost_utils.process_allgather(np.array(interrupts.requested()))
  return bool(np.any(flags))


class _TrainAccumulator:
  """Device-side sums of per-step train metrics between two log points."""

  def __init__(self):
    self.sums, self.last, self.steps = None, None, 0

  def add(self, metrics: dict) -> None:
    self.sums = steps.accumulate(self.sums, {"loss": metrics["loss"],
                                             "accuracy": metrics["accuracy"]})
    self.last = metrics
    self.steps += 1

  def flush(self, end_step: int) -> dict[str, float]:
    sums, last = jax.device_get((self.sums, self.last))
    n = self.steps
    self.sums, self.steps = None, 0
    loss = float(sums["loss"]) / n
    if not math.isfinite(loss):
      raise NonFiniteLossError(
          f"Non-finite training loss (mean {loss}) in the {n} steps ending at step {end_step}; "
          "stopping. The last good checkpoint is kept; lower the learning rate or enable "
          "gradient clipping (--config.optimizer.grad_clip_norm).")
    return {"train/loss": loss, "train/accuracy": float(sums["accuracy"]) / n,
            "train/learning_rate": float(last["learning_rate"]),
            "train/grad_norm": float(last["grad_norm"])}


def resolved_config(config: ml_collections.ConfigDict, s: Setup) -> dict:
  """The config as a dict, plus what was derived from the data.

  ``model.num_classes`` rebuilds the model; ``dataset.image_shape``, ``dataset.mean``,
  ``dataset.std`` (the statistics actually used, also when the config left them empty) and
  ``dataset.max_value`` (the pixel value of full intensity) describe the preprocessing, which
  :func:`atac_jax.checkpoint.preprocess` applies.
  """
  resolved = json.loads(config.to_json_best_effort())
  resolved["model"]["num_classes"] = s.info.num_classes
  channels = s.info.image_shape[-1]
  mean, std = data.config.normalization_values(config.dataset, channels)
  resolved["dataset"].update(image_shape=list(s.info.image_shape), mean=mean, std=std,
                             max_value=float(s.info.max_value))
  return resolved


def _check_init_from(config: ml_collections.ConfigDict) -> None:
  source = config.get("init_from", "")
  if source:
    try:
      checkpoint_lib.resolve_step_dir(source)
    except FileNotFoundError as e:
      raise ConfigError(f"config.init_from={source!r} is not accepted: {e}") from e


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       devices: list[Any] | None = None, fresh: bool = False,
                       extend: bool = False) -> dict[str, Any]:
  """Trains (resuming from the latest good checkpoint in ``workdir``) and evaluates.

  Everything is checked before anything is compiled or written: the config values, ``workdir``
  (a writable directory, not in use by another trainer) and the config against the one the
  workdir's checkpoints were trained with (see :mod:`atac_train.resume`).

  Args:
    config: the training config.
    workdir: output directory (see the workdir contract in the README).
    devices: devices of the ``data`` mesh (default: all).
    fresh: start at step 0 even if ``workdir`` holds a run (its outputs are moved to
      ``workdir/archive/<time>/`` first).
    extend: allow a larger ``num_epochs`` than the checkpoints were trained with; from the
      restored step on, the learning rate follows the schedule of the new ``num_epochs``.

  Returns:
    The final record: the last train and eval metrics, ``step``, ``epoch``, and ``preempted``.

  Raises:
    TrainingError: (ConfigError, WorkdirError, ResumeError, NonFiniteLossError) with a message
      that names the problem and the fix.
  """
  validation.validate(config)
  _check_init_from(config)
  rundir.check(workdir)
  layout = workdir_lib.Layout(workdir)
  rundir.lead_only(WorkdirLock(layout.lock).check)  # a busy workdir stops us before any work
  hooks.reached("setup")
  s = setup(config, devices=devices)
  config_dict = resolved_config(config, s)
  is_lead = jax.process_index() == 0
  with rundir.hold(layout):
    hooks.reached("locked")
    if fresh and is_lead:
      archived = rundir.archive(layout)
      if archived:
        logging.warning("--fresh: moved the previous run in %s to %s.", workdir, archived)
    if fresh and jax.process_count() > 1:
      multihost_utils.sync_global_devices("atac_train.trainer.fresh")
    train_iter = data.create_train_iterator(
        config.dataset, global_batch_size=config.global_batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count())
    ckpt = checkpointing.Checkpointer(
        workdir, keep=config.keep_checkpoints,
        keep_every_steps=config.keep_every_epochs * s.steps_per_epoch)
    try:
      abstract = checkpointing.abstract_with_sharding(s.abstract_state,
                                                      lambda _: parallel.replicated(s.mesh))
      start = resume.find_start(ckpt, abstract_state=abstract, data_iterator=train_iter,
                                config=config_dict, extend=extend)
      if start.state is not None:
        logging.warning("Resumed from step %d in %s", start.step, ckpt.directory)
        state = start.state
      else:
        state = jax.jit(s.init_fn, out_shardings=s.state_sharding)(
            jax.random.PRNGKey(config.seed))
        state = init_from_checkpoint(config, state, s)
      if is_lead:
        rundir.prepare_outputs(layout, start_step=start.step, config_dict=config_dict)
      return _train_loop(config, s, state=state, start_step=start.step, ckpt=ckpt,
                         train_iter=train_iter, config_dict=config_dict, layout=layout)
    finally:
      ckpt.close()


def _train_loop(config: ml_collections.ConfigDict, s: Setup, *, state: TrainState,
                start_step: int, ckpt: checkpointing.Checkpointer, train_iter: Any,
                config_dict: dict, layout: workdir_lib.Layout) -> dict[str, Any]:
  """Steps from ``start_step`` to the end (or to a SIGINT/SIGTERM), with logs, evals, saves."""
  is_lead = jax.process_index() == 0
  if start_step >= s.total_steps:  # finished: re-running the command reports the result again
    record = metrics.final_record(layout.metrics, step=start_step) if is_lead else {}
    return {"step": start_step, "epoch": start_step / s.steps_per_epoch, "preempted": False,
            **record}
  if _stop_requested():  # interrupted while restoring or initialising: nothing new to save
    return {"step": start_step, "epoch": start_step / s.steps_per_epoch, "preempted": True}
  train_step, eval_step = compile_steps(config, s)
  hooks.reached("compile")
  writer = MetricWriter(layout.root, enabled=is_lead)
  progress = Progress(total=s.total_steps, initial=start_step,
                      enabled=is_lead and config.progress_bar)
  acc, throughput = _TrainAccumulator(), Throughput()
  images_since_log = 0
  ckpt_every = config.checkpoint_every_steps or s.steps_per_epoch
  step, record, preempted = start_step, {}, False
  try:
    while step < s.total_steps:
      batch = parallel.global_batch(next(train_iter), s.batch_sharding)
      state, step_metrics = train_step(state, batch)
      step += 1
      acc.add(step_metrics)
      images_since_log += config.global_batch_size
      epoch_end = step % s.steps_per_epoch == 0
      last = step == s.total_steps
      preempted = _stop_requested() and not last
      save = last or step % ckpt_every == 0 or preempted
      if step % config.log_every_steps == 0 or epoch_end or save:
        record = acc.flush(step)
        record["train/images_per_second"] = throughput.measure(images_since_log)
        record.update(models.learned_scalars(state.params))
        images_since_log = 0
        writer.write(step, step / s.steps_per_epoch, record)
        progress.update(0, loss=record["train/loss"], acc=record["train/accuracy"],
                        img_s=record["train/images_per_second"])
      progress.update(1)
      ckpt_metrics = None
      epoch = step // s.steps_per_epoch
      if last or (epoch_end and epoch % config.eval_every_epochs == 0):
        eval_record = evaluate(eval_step, eval_variables(state), config, s)
        writer.write(step, step / s.steps_per_epoch, eval_record)
        writer.plot()
        record.update(eval_record)
        ckpt_metrics = {checkpointing.BEST_METRIC: eval_record["eval/accuracy"]}
        throughput.measure(0)  # do not count eval time as training time
      if save:
        ckpt.save(step, state=state, data_iterator=train_iter, config=config_dict,
                  metrics=ckpt_metrics)
        hooks.reached("checkpoint_saving", step)
        hooks.reached("checkpoint_saved", step, before_kill=ckpt.wait)
      if preempted:
        logging.warning("Preempted: checkpoint saved at step %d; re-run the same command to "
                        "resume.", step)
        break
  finally:
    progress.close()
    writer.close()
  return {"step": step, "epoch": step / s.steps_per_epoch, "preempted": preempted, **record}


def init_from_checkpoint(config: ml_collections.ConfigDict, state: TrainState, s: Setup
                         ) -> TrainState:
  """Fine-tuning: copies matching parameters from ``config.init_from`` (head re-initialised)."""
  source = config.get("init_from", "")
  if not source:
    return state
  _, variables, _ = checkpoint_lib.load(source)
  params = checkpoint_lib.merge_matching(state.params, variables["params"])
  batch_stats = checkpoint_lib.merge_matching(state.batch_stats,
                                              variables.get("batch_stats", {}))
  state = state.replace(params=params, batch_stats=batch_stats,
                        opt_state=state.tx.init(params))
  return jax.device_put(state, s.state_sharding)
