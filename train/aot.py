"""``atac-bench compile``: the train step compiled ahead of time for a Cloud TPU or NVIDIA GPUs,
without one.

    pip install -e ".[tpu-aot]"        # libtpu, the TPU compiler (jax[tpu] at the tested version)
    atac-bench compile --topology v5e:2x2 --model cifar_resnet20 --act atac --compare relu
    atac-bench compile --topology v5e:2x2 --model cifar_resnet20 --act atac --breakdown 15
    pip install -e ".[gpu-aot]"        # the CUDA plugin, XLA's GPU compiler (jax[cuda12]; ~5.6 GB)
    atac-bench compile --topology h100:8 --model cifar_resnet20 --act atac --batch 1024 --compare relu

The project's real train step (:func:`atac_train.trainer.setup` + :func:`atac_train.trainer.compile_steps`,
the same code ``atac-bench train`` compiles) is lowered on shapes alone and compiled by libtpu's
compiler for the devices of a TPU topology (``jax.experimental.topologies.get_topology_desc``,
as MaxText's ``train_compile.py`` does), or by the CUDA plugin's for a GPU topology (the same call
with ``platform="cuda"`` and a device description of :data:`GPU_GENERATIONS`, shipped in
``atac_train/gpu_targets``): state replicated, global batch split over the chips (GPUs).
Nothing runs and no TPU or GPU is opened, so it works on any machine with the compiler installed.
It prints one JSON line per side, per chip: XLA's FLOPs, bytes accessed and peak memory, and the
compile time; with ``--compare OTHER`` a third line with the ratios A / B. ``--breakdown N`` adds
the N top-level instructions of the optimised HLO that move the most bytes (see :func:`breakdown`).

Caveats:

- The figures are the compiler's *estimates* (its cost and memory analyses) for one libtpu or
  CUDA plugin version; the JSON names it. Another version may fuse, lay out and schedule
  differently.
- No step times: nothing is executed. Bytes accessed is the better proxy for a memory-bound
  step (CIFAR ResNets on a TPU or GPU are); the cost analysis' ``optimal_seconds`` is not
  reported because it is unreliable (it came out negative, -0.999 s, for an ATAC ResNet-8 step).
- Peak memory is ``memory_analysis().peak_memory_in_bytes``: the HBM high-water mark of the
  step, parameters, optimizer state and batch included. ``temp_size_in_bytes`` (the figure
  ``atac-bench train`` reports on CPU) is not a peak on TPU (178 MiB against a 121 MiB peak for
  the ATAC ResNet-20 step on v5e:2x2); it is in the JSON but not compared.
- Bytes accessed count the TPU's tiled layouts: an array whose minor dimension is smaller than
  the 128-lane tile is padded to it (a ResNet-20 activation with the 32-example per-chip batch
  as its minor dimension takes 4x its logical size). The breakdown shows this padding. GPU
  layouts are not tiled: the sizes are the logical ones.
- A v4 or v5p chip is compiled as one megacore device (as JAX uses them), so chips = devices.
- GPU: no autotuning happens without a GPU, so the kernels are XLA's heuristic choices.
  ``compiled.cost_analysis()`` is None without a local GPU, so the cost comes from XLA's HLO
  cost analysis of the optimised module run through the CPU client (:func:`gpu_cost_analysis`),
  which charges custom calls nothing, neither FLOPs nor bytes: the cuDNN convolutions (and any
  Pallas kernel) are left out of ``bytes_accessed``. A GPU record adds their bytes
  (``custom_call_gb_per_chip``: operands and outputs of the optimised HLO's top-level custom
  calls, as :func:`breakdown` charges them) and the sum, ``bytes_with_custom_calls_gb_per_chip``;
  ``--compare`` adds its ratio.

Environment: unless set, ``JAX_PLATFORMS=cpu`` (the command never needs a TPU or GPU; set before
JAX starts, i.e. from the CLI) and ``ALLOW_MULTIPLE_LIBTPU_LOAD=1`` (libtpu otherwise takes a
machine-wide lock, so a second compile, or one beside a TPU job, would fail) are used. libtpu logs
warnings about ``TPU_ACCELERATOR_TYPE`` and worker hostnames on a machine without a TPU; they are
harmless.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib.util
import math
import os
import re
import sys
import time
from importlib import metadata
from typing import Any

from atac_train import hlo

GENERATIONS = ("v4", "v5e", "v5p", "v6e")
TOPOLOGY_FORMS = ("v4:2x2x1", "v5e:2x2", "v5p:2x2x1", "v6e:2x2")
EXTRA_INSTALL = 'pip install -e ".[tpu-aot]"'
# GPU name -> device description in gpu_targets/ (derived from openxla/xla's target_config specs)
GPU_GENERATIONS = ("a100", "h100", "h200", "b200")
GPU_TOPOLOGY_FORMS = ("h100:8", "a100:1", "h200:2x8")
GPU_EXTRA_INSTALL = 'pip install -e ".[gpu-aot]"'
_MEGACORE = ("v4", "v5p")  # two TensorCores per chip, one JAX device
_DEFAULT_HOST_BOUNDS = (2, 2, 1)  # libtpu's chips per host when the topology has at least these
_TOPOLOGY_RE = re.compile(r"^(v\w+):(\d+)x(\d+)(?:x(\d+))?$")
_GPU_TOPOLOGY_RE = re.compile(r"^([a-z]\d+):(?:(\d+)x)?(\d+)$")


class CompilerMissingError(RuntimeError):
  """The target's compiler (libtpu or the CUDA plugin) is not installed."""


class LibtpuMissingError(CompilerMissingError):
  """libtpu (the TPU compiler) is not installed."""


class CudaPluginMissingError(CompilerMissingError):
  """The CUDA plugin (XLA's GPU compiler, ``jax[cuda12]``) is not installed."""


@dataclasses.dataclass(frozen=True)
class Topology:
  """A Cloud TPU slice, generation (``v5e``) and chips per axis (``(2, 2, 1)``); or NVIDIA GPUs,
  generation (``h100``) and ``(1, hosts, GPUs per host)`` (``platform == "gpu"``)."""
  name: str
  generation: str
  shape: tuple[int, int, int]
  platform: str = "tpu"

  @property
  def chips(self) -> int:
    return math.prod(self.shape)


def parse_topology(name: str) -> Topology:
  """Parses ``GEN:AxB`` or ``GEN:AxBxC`` (GEN one of :data:`GENERATIONS`), or ``GPU:N`` (one host
  with N GPUs) or ``GPU:HxN`` (H hosts) with GPU one of :data:`GPU_GENERATIONS`; ValueError
  otherwise."""
  name = name.strip()
  tpu, gpu = _TOPOLOGY_RE.match(name), _GPU_TOPOLOGY_RE.match(name)
  match = tpu if tpu and tpu.group(1) in GENERATIONS else (
      gpu if gpu and gpu.group(1) in GPU_GENERATIONS else None)
  if not match or 0 in tuple(int(d) for d in match.groups()[1:] if d):
    raise ValueError(
        f"unknown topology {name!r}; accepted: a TPU slice GEN:AxB or GEN:AxBxC with GEN one of "
        f"{list(GENERATIONS)} and chips per axis, e.g. {', '.join(TOPOLOGY_FORMS)}; or NVIDIA "
        f"GPUs GPU:N (one host) or GPU:HxN (H hosts of N) with GPU one of {list(GPU_GENERATIONS)}"
        f", e.g. {', '.join(GPU_TOPOLOGY_FORMS)}.")
  if match is gpu:
    return Topology(name=name, generation=gpu.group(1),
                    shape=(1, int(gpu.group(2) or 1), int(gpu.group(3))), platform="gpu")
  x, y, z = (int(d) if d else 1 for d in match.groups()[1:])
  return Topology(name=name, generation=match.group(1), shape=(x, y, z))


def check_batch(batch: int, topology: Topology) -> None:
  """The global batch must split evenly over the chips; ValueError naming valid sizes."""
  chips = topology.chips
  if batch <= 0 or batch % chips:
    below, above = (batch // chips) * chips, -(-max(batch, 1) // chips) * chips
    near = f"{below} or {above}" if below > 0 else f"{above}"
    what = "GPUs" if topology.platform == "gpu" else "chips"
    raise ValueError(f"--batch {batch} must be a positive multiple of the {chips} {what} of "
                     f"{topology.name} (the global batch is split over them); e.g. {near}.")


def _version(dist: str) -> str | None:
  try:
    return metadata.version(dist)
  except metadata.PackageNotFoundError:
    return None


def jax_version() -> str:
  """The installed jax's version, read without starting JAX."""
  return _version("jax") or "unknown"


def libtpu_version() -> str | None:
  """The installed libtpu's version, or None when libtpu is not installed."""
  if importlib.util.find_spec("libtpu") is None:
    return None
  return _version("libtpu") or _version("libtpu-nightly") or "unknown"


def cuda_plugin_version() -> str | None:
  """The installed CUDA plugin's version (``jax-cuda12-plugin``), or None without it."""
  try:
    if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
      return None
  except ModuleNotFoundError:  # no jax_plugins package at all
    return None
  return _version("jax-cuda12-plugin") or "unknown"


def require_libtpu() -> str:
  """Returns libtpu's version; raises :class:`LibtpuMissingError` naming the install command."""
  version = libtpu_version()
  if version is None:
    raise LibtpuMissingError(
        f"libtpu (the TPU compiler) is not installed; install it with {EXTRA_INSTALL} "
        f"or, to keep this jax, pip install \"jax[tpu]=={jax_version()}\".")
  return version


def require_cuda_plugin() -> str:
  """Returns the CUDA plugin's version; raises :class:`CudaPluginMissingError` naming the
  install command."""
  version = cuda_plugin_version()
  if version is None:
    raise CudaPluginMissingError(
        f"the CUDA plugin (XLA's GPU compiler) is not installed; install it with "
        f"{GPU_EXTRA_INSTALL} or, to keep this jax, pip install \"jax[cuda12]=={jax_version()}\""
        " (about 5.6 GB; no GPU needed).")
  return version


def require_compiler(topology: Topology) -> tuple[str, str]:
  """``(record key, version)`` of the compiler for ``topology``'s platform (libtpu or the CUDA
  plugin); raises a :class:`CompilerMissingError` naming the install command."""
  if topology.platform == "gpu":
    return "cuda_plugin_version", require_cuda_plugin()
  return "libtpu_version", require_libtpu()


def gpu_target_config(generation: str) -> str:
  """The device description of ``generation`` (``GpuTargetConfigProto`` text) from the package."""
  from importlib import resources  # pylint: disable=g-import-not-at-top
  return (resources.files("atac_train") / "gpu_targets" / f"{generation}.txtpb").read_text()


def topology_devices(topology: Topology) -> list[Any]:
  """Compile-only devices of ``topology`` (libtpu's or the CUDA plugin's compiler; no TPU or GPU
  needed), one per chip (GPU)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  kwargs: dict[str, Any] = {}
  if topology.platform == "gpu":  # slices x hosts x GPUs
    args = ("", "cuda")
    kwargs = {"topology": "x".join(map(str, topology.shape)),
              "target_config": gpu_target_config(topology.generation)}
    forms = GPU_TOPOLOGY_FORMS
  else:
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if topology.generation in _MEGACORE:
      kwargs["chip_config_name"] = "megacore"
    if any(s < d for s, d in zip(topology.shape, _DEFAULT_HOST_BOUNDS)):  # smaller than one host
      kwargs["chips_per_host_bounds"] = tuple(min(s, d) for s, d in
                                              zip(topology.shape, _DEFAULT_HOST_BOUNDS))
    args = (f"{topology.generation}:{'x'.join(map(str, topology.shape))}", "tpu")
    forms = TOPOLOGY_FORMS
  try:
    devices = list(topologies.get_topology_desc(*args, **kwargs).devices)
  except Exception as error:  # pylint: disable=broad-except  # JaxRuntimeError from the compiler
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    raise ValueError(f"the compiler rejected topology {topology.name!r}: {message} "
                     f"(accepted e.g. {', '.join(forms)}).") from error
  if len(devices) != topology.chips:
    raise ValueError(f"topology {topology.name!r} has {len(devices)} devices for "
                     f"{topology.chips} chips; expected one device per chip.")
  return devices


def gpu_cost_analysis(compiled) -> dict[str, float]:
  """XLA's HLO cost analysis of a GPU executable's optimised module, run through the CPU client
  (``compiled.cost_analysis()`` is None without a local GPU). A private JAX API of jax 0.10.2:
  if it moved, :class:`CompilerMissingError` naming the install of the tested jax."""
  try:
    from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    module = compiled.runtime_executable().hlo_modules()[0]
    return dict(_jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module))
  except (ImportError, AttributeError, TypeError) as error:
    raise CompilerMissingError(
        "the GPU cost analysis uses jax._src.lib._jax.hlo_module_cost_analysis on "
        "compiled.runtime_executable().hlo_modules() (private; jax 0.10.2), which failed in jax "
        f"{jax_version()} ({type(error).__name__}: {error}); {GPU_EXTRA_INSTALL} installs the "
        "tested jax.") from error


STEPS = ("project", "user", "shard_map")


def user_train_step(model, *, learning_rate: float = 0.1):
  """A plain SGD step written as a user writes one around the Flax modules: ``model.apply``,
  ``jax.value_and_grad``, no project code (no ``data_parallel`` declaration, no optimizer
  state). Returns ``step(variables, images, labels) -> (variables, loss)``."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  def step(variables, images, labels):
    def loss_fn(params):
      logits, updates = model.apply({**variables, "params": params}, images, train=True,
                                    mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    params = jax.tree.map(lambda p, g: p - learning_rate * g, variables["params"], grads)
    return {**variables, **updates, "params": params}, loss

  return step


def _lower_project_step(config, devices):
  """The project's train step (``trainer.compile_steps``) lowered on shapes for ``devices``."""
  import jax  # pylint: disable=g-import-not-at-top
  from atac_train import trainer  # pylint: disable=g-import-not-at-top
  from atac_train.data import device  # pylint: disable=g-import-not-at-top
  s = trainer.setup(config, devices=devices)
  train_step, _ = trainer.compile_steps(config, s)
  struct = lambda shape, dtype, sharding: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  state = jax.tree.map(lambda a, sh: struct(a.shape, a.dtype, sh), s.abstract_state,
                       s.state_sharding)
  batch = {k: struct(shape, dtype, s.batch_sharding)
           for k, (shape, dtype) in device.batch_shapes(s.info, config.global_batch_size).items()}
  return train_step.lower(state, batch)


def _lower_user_step(config, devices, *, shard_map: bool = False):
  """:func:`user_train_step` in the user's own ``jax.jit`` over a ``data`` mesh of ``devices``
  in JAX's mesh context (``jax.set_mesh``): variables replicated, the batch split. With
  ``shard_map``, the step runs per device under ``jax.shard_map`` with the model's
  ``axis_name="data"`` (every BatchNorm and unit with statistics over the whole batch); the
  parameters' gradients are summed over the devices by ``shard_map`` itself."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  from atac_train import trainer  # pylint: disable=g-import-not-at-top
  from atac_train.data import device  # pylint: disable=g-import-not-at-top
  s = trainer.setup(config, devices=devices)  # the model and the data's shapes
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  n = config.global_batch_size
  shape = tuple(device.batch_shapes(s.info, n)["image"][0][1:])  # the images the model takes
  variables = jax.eval_shape(lambda: s.model.init(jax.random.key(0), jnp.zeros((1,) + shape),
                                                  train=False))
  replicated, split = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh,
                                                                          PartitionSpec("data"))
  struct = lambda a, sharding: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
  variables = jax.tree.map(lambda a: struct(a, replicated), variables)
  images = jax.ShapeDtypeStruct((n,) + shape, jnp.float32, sharding=split)
  labels = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=split)
  if shard_map:
    per_device = user_train_step(s.model.clone(axis_name="data"))

    def step_fn(variables, images, labels):
      variables, loss = per_device(variables, images, labels)
      return variables, jax.lax.pmean(loss, "data")

    step_fn = jax.shard_map(step_fn, mesh=mesh,
                            in_specs=(PartitionSpec(), PartitionSpec("data"),
                                      PartitionSpec("data")),
                            out_specs=(PartitionSpec(), PartitionSpec()))
  else:
    step_fn = user_train_step(s.model)
  step = jax.jit(step_fn, out_shardings=(replicated, replicated))
  with jax.set_mesh(mesh):
    return step.lower(variables, images, labels)


def compile_step(config, topology: Topology, *, step: str = "project"
                 ) -> tuple[dict[str, Any], Any]:
  """AOT-compiles a train step for ``config`` on ``topology``.

  Args:
    config: the training config.
    topology: the TPU or GPU topology.
    step: ``"project"``, the project's train step (what the CLI runs); ``"user"``, a plain
      SGD step in the user's own ``jax.jit`` under ``jax.set_mesh`` (:func:`user_train_step`);
      ``"shard_map"``, the same step per device under ``jax.shard_map``, the model's BatchNorms
      and units taking ``axis_name``. The project's step is traced inside
      ``ops.policy.lowering_platform`` of the target (as the CLI's AOT path); the user steps
      are not (a user's own compile: the ops take the target's choices from the lowering and
      the mesh context).

  Returns:
    ``(record, compiled)``: the per-chip figures (see the module docstring) and the compiled
    executable (``compiled.as_text()`` is the optimised HLO).
  """
  import jax  # pylint: disable=g-import-not-at-top
  if step not in STEPS:
    raise ValueError(f"Unknown --step {step!r}; accepted: {list(STEPS)}.")
  check_batch(config.global_batch_size, topology)
  compiler_key, compiler_version = require_compiler(topology)
  devices = topology_devices(topology)
  from atac_jax import ops  # pylint: disable=g-import-not-at-top
  if step == "project":
    with ops.policy.lowering_platform(topology.platform):  # the ops' choices for the target
      lowered = _lower_project_step(config, devices)
  else:  # no project code: the ops read the platform from the lowering and the mesh context
    lowered = _lower_user_step(config, devices, shard_map=step == "shard_map")
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_seconds = time.perf_counter() - start
  cost = (gpu_cost_analysis(compiled) if topology.platform == "gpu"
          else compiled.cost_analysis())
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  extra: dict[str, Any] = {}
  if topology.platform == "gpu":  # the cost analysis charges the custom calls nothing
    calls = breakdown(compiled.as_text(), 0)["by_op"].get("custom-call", 0)
    extra = {"custom_call_gb_per_chip": round(calls / 1e9, 4),
             "bytes_with_custom_calls_gb_per_chip": round((cost["bytes accessed"] + calls) / 1e9,
                                                          4)}
  memory = compiled.memory_analysis()
  memory_fields = ("peak_memory_in_bytes", "temp_size_in_bytes", "argument_size_in_bytes",
                   "output_size_in_bytes", "alias_size_in_bytes", "generated_code_size_in_bytes")
  n = config.global_batch_size
  options = dict(config.model.options)
  act_options = dict(options.pop("act_options", {}))
  record = {
      "model": config.model.name, "act": config.model.act, "step": step, "batch": n,
      "dtype": "bf16" if config.half_precision else "float32", **options,
      "act_options": act_options, "topology": topology.name, "chips": len(devices),
      "batch_per_chip": n // len(devices), "device_kind": devices[0].device_kind,
      "gflop_per_chip": round(cost["flops"] / 1e9, 4),
      "bytes_accessed_gb_per_chip": round(cost["bytes accessed"] / 1e9, 4), **extra,
      "peak_memory_mib_per_chip": round(memory.peak_memory_in_bytes / 2**20, 2),
      "compile_seconds": round(compile_seconds, 2),
      "cost_per_chip": {"flops": cost["flops"], "bytes_accessed": cost["bytes accessed"],
                        "transcendentals": cost.get("transcendentals"),
                        **({"custom_call_bytes": calls} if extra else {})},
      "memory_per_chip": {f: int(getattr(memory, f)) for f in memory_fields},
      "jax_version": jax.__version__, "jaxlib_version": _version("jaxlib"),
      compiler_key: compiler_version}
  return record, compiled


def ratios(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
  """The ratio line of ``--compare``: A over B for FLOPs, bytes accessed and peak memory (on GPU
  also bytes accessed with the custom calls' bytes)."""
  ca, cb = a["cost_per_chip"], b["cost_per_chip"]
  ma, mb = a["memory_per_chip"], b["memory_per_chip"]
  side = lambda r: {k: r[k] for k in ("model", "act", "act_options", "batch", "dtype")}
  out = {"ratio": f"{a['act']}/{b['act']}", "topology": a["topology"], "a": side(a),
         "b": side(b), "gflop_ratio": round(ca["flops"] / cb["flops"], 4),
         "bytes_accessed_ratio": round(ca["bytes_accessed"] / cb["bytes_accessed"], 4),
         "peak_memory_ratio": round(ma["peak_memory_in_bytes"] / mb["peak_memory_in_bytes"], 4)}
  if "custom_call_bytes" in ca and "custom_call_bytes" in cb:
    with_calls = lambda c: c["bytes_accessed"] + c["custom_call_bytes"]
    out["bytes_with_custom_calls_ratio"] = round(with_calls(ca) / with_calls(cb), 4)
  return out


# --- Where the bytes go: per-instruction accounting of the optimised HLO --------------------

# Instructions that move no data of their own (or whose data is counted at their other half).
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "partition-id",
         "replica-id", "after-all"}


def breakdown(hlo_text: str, top: int = 10) -> dict[str, Any]:
  """Bytes read and written by each top-level instruction of an optimised HLO module's entry.

  Each instruction is charged its operands' and its output's sizes in their layouts (a TPU's
  tiled ones, :func:`atac_train.hlo.array_bytes`; a GPU's are untiled, so the logical sizes);
  parameters, constants, tuples and bitcasts nothing. Asynchronous pairs follow what the
  compiler's own total was found to count: a ``copy-start`` its operand and its output tuple
  (destination and source) and its ``copy-done`` the copy again, so an async copy costs four
  times its size; a ``slice-start`` the slice; other ``-done`` halves nothing.

  This reproduces the compiler's ``bytes accessed`` to 0.1-1.6% for the CIFAR ResNet train
  steps on v5e (``breakdown.coverage`` in the record), not exactly: the compiler also charges
  costs this accounting cannot see, e.g. about 0.5 MB for each small ``gather`` (what
  ``jnp.diagonal`` lowers to), and an operand read by two instructions inside one fusion twice
  (a tiny ``convnet_mnist`` step is the known outlier: 113% for ReLU, 91% for ATAC).

  Returns:
    ``{'total_bytes', 'logical_bytes' (unpadded), 'instructions', 'by_op': {op: bytes},
    'by_source': [{'source', 'bytes', 'instructions'}, ...],
    'top': [{'bytes', 'output_bytes', 'padding', 'op', 'name', 'shape', 'source'}, ...]}``:
    ``op`` is the opcode with the fusion kind (``fusion:kOutput``), ``source`` the JAX op the
    instruction came from (its ``op_name``); ``by_source`` sums instructions whose source is
    the same up to numbers (``stage*_block*/act*/...``: one entry per kind of layer). ``top``
    and ``by_source`` hold the ``top`` largest, by bytes.
  """
  sizes: dict[str, tuple[int, int]] = {}
  rows = []
  for inst in hlo.instructions(hlo.computations(hlo_text)["ENTRY"]):
    name, shape, op, rest = inst.name, inst.shape, inst.op, inst.attributes
    out = hlo.shape_bytes(shape)
    sizes[name] = out
    if op in _FREE:
      continue
    inputs = [sizes.get(o, (0, 0)) for o in inst.operands]
    if op == "slice-start":  # reads the slice (element 1 of its output) into on-chip memory
      arrays = hlo.ARRAY_RE.findall(shape)
      inputs, out = ([hlo.array_bytes(*arrays[1])] if len(arrays) > 1 else inputs), (0, 0)
    elif op.endswith("-done"):
      if op != "copy-done":
        continue
      inputs = []  # its operand is the -start's tuple; the copy's output is written again
    padded = out[0] + sum(p for p, _ in inputs)
    logical = out[1] + sum(l for _, l in inputs)
    kind = re.search(r"\bkind=(k\w+)", rest)
    source = re.search(r'op_name="([^"]*)"', rest)
    rows.append({"bytes": padded, "logical_bytes": logical, "output_bytes": out[0],
                 "padding": round(padded / logical, 2) if logical else 1.0,
                 "op": f"{op}:{kind.group(1)}" if kind else op, "name": name,
                 "shape": shape if len(shape) <= 160 else shape[:157] + "...",
                 "source": re.sub(r"^jit\([^)]*\)/", "", source.group(1)) if source else ""})
  by_op: dict[str, int] = collections.Counter()
  by_source: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
  for row in rows:
    by_op[row["op"]] += row["bytes"]
    head, _, tail = row["source"].partition("/")  # the model's name keeps its digits
    group = by_source[head + _ + re.sub(r"\d+", "*", tail)]
    group[0] += row["bytes"]
    group[1] += 1
  rows.sort(key=lambda r: r["bytes"], reverse=True)
  sources = sorted(by_source.items(), key=lambda item: item[1][0], reverse=True)[:top]
  return {"total_bytes": sum(r["bytes"] for r in rows),
          "logical_bytes": sum(r["logical_bytes"] for r in rows), "instructions": len(rows),
          "by_op": dict(by_op.most_common()),
          "by_source": [{"source": k, "bytes": v[0], "instructions": v[1]} for k, v in sources],
          "top": rows[:top]}


def format_breakdown(record: dict[str, Any]) -> str:
  """A readable table of a record's breakdown (printed to stderr; stdout stays JSON lines)."""
  b = record["breakdown"]
  lines = [f"# {record['model']} {record['act']} on {record['topology']}: "
           f"{b['total_bytes'] / 1e9:.3f} GB over {b['instructions']} instructions "
           f"({b['coverage']:.1%} of bytes accessed; {b['total_bytes'] / b['logical_bytes']:.2f}x "
           "the unpadded size)",
           f"{'MB':>8} {'pad':>5}  {'op':<16} {'shape':<48} source"]
  for r in b["top"]:
    lines.append(f"{r['bytes'] / 1e6:8.1f} {r['padding']:5.2f}  {r['op'][:16]:<16} "
                 f"{r['shape'][:48]:<48} {r['source'][-90:]}")
  lines.append(f"{'GB':>8} {'n':>5}  source, numbers as *")
  for g in b["by_source"]:
    lines.append(f"{g['bytes'] / 1e9:8.3f} {g['instructions']:5d}  {g['source'][-120:]}")
  lines.append("by op: " + ", ".join(f"{op} {v / 1e9:.3f} GB" for op, v in
                                     list(b["by_op"].items())[:6]))
  return "\n".join(lines)


def run_compile(args, config_a, config_b=None, emit=None) -> list[dict[str, Any]]:
  """``atac-bench compile``: compiles A (and B), emits one record per side and the ratios."""
  topology = parse_topology(args.topology)
  check_batch(args.batch, topology)
  if args.breakdown < 0:
    raise ValueError(f"--breakdown must be >= 0 (instructions to list), got {args.breakdown}.")
  require_compiler(topology)
  if emit is None:
    from atac_train.bench import emit  # pylint: disable=g-import-not-at-top  # one record writer
  records = []
  for side, config in (("a", config_a), ("b", config_b)):
    if config is None:
      continue
    record, compiled = compile_step(config, topology, step=getattr(args, "step", "project"))
    record = {"side": side, **record}
    if args.breakdown:
      b = breakdown(compiled.as_text(), args.breakdown)
      cost = record["cost_per_chip"]  # on GPU the compiler's total leaves the custom calls out
      b["coverage"] = round(b["total_bytes"] / (cost["bytes_accessed"]
                                                + cost.get("custom_call_bytes", 0)), 4)
      record["breakdown"] = b
      print(format_breakdown(record), file=sys.stderr, flush=True)
    emit(record)
    records.append(record)
  if len(records) == 2:
    records.append(ratios(*records))
    emit(records[-1])
  return records


def main(args) -> list[dict[str, Any]]:
  """Runs ``atac-bench compile`` for parsed ``args``; a bad argument or no compiler exits 2."""
  from atac_train import bench  # pylint: disable=g-import-not-at-top
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # effective when JAX has not started yet
  other = argparse.Namespace(act_option=args.compare_act_option)
  try:
    config_a = bench.config_from_args(args, args.act, bench.act_options(args))
    config_b = (bench.config_from_args(args, args.compare, bench.act_options(other))
                if args.compare else None)
    return run_compile(args, config_a, config_b, emit=lambda r: bench.emit(r, args.out))
  except (ValueError, CompilerMissingError) as error:
    print(f"atac-bench: error: {error}", file=sys.stderr)
    sys.exit(2)
