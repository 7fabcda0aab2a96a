"""Which backward pass a gate runs here, and why: :func:`choose` and its decision table.

Every caller (:func:`atac_jax.ops.gate`, :func:`atac_jax.ops.norm_gate`, the linen and NNX
units) states a :class:`Request` and gets one typed :class:`Choice`, resolved once per call when
the op is traced, for every platform: the lean op's backward pass is traced when the program is
lowered and takes the platform's row then (:meth:`Choice.here`), so an AOT compile or a
multi-platform ``jax.export`` gets each platform's backward (the TPU kernels only in the TPU
lowering). Inputs: the request (the module's ``memory_lean``/``backward_kernel``, or the
ops' ``impl``), training or inference, ``axis_name``, the input's shape and dtype, the platform
lowered for (:func:`atac_jax.ops.policy.platform`; override :func:`~atac_jax.ops.policy.
lowering_platform`) and where the batch lies (:func:`where_batch_lies`; override
:func:`~atac_jax.ops.pallas_backward.data_parallel`).

Requests: ``impl`` ``"auto"`` is ``Request("auto", "xla")``, ``"lean"`` ``Request("lean",
"xla")``, ``"pallas"`` ``Request("lean", "pallas")``, ``"reference"`` ``Request("reference")``;
a module with ``memory_lean=True`` is ``Request("auto", backward_kernel)``, with ``False``
``Request("reference", backward_kernel)``.

Decision table (first matching row; the ``reason`` of the :class:`Choice` quotes it):

===  ========================  ===============================  ==========  ======================
row  request                   condition                        backward    why
===  ========================  ===============================  ==========  ======================
1    op reference              --                               REFERENCE   asked for
4    op auto                   inference                        REFERENCE   nothing is kept
5    op lean, kernel pallas    inference                        REFERENCE   kernels train only
6    op lean                   inference                        XLA         asked for
7    op auto                   policy ``gate_impl``: reference  REFERENCE   policy
8    kernel xla                --                               XLA         asked for
9    kernel auto               policy ``backward_kernel``: xla  XLA         policy (CPU)
10   kernel auto               batch split unknown              XLA         see below
12   kernel pallas or auto     ``supported()`` gives a reason   XLA         that reason
13   kernel pallas or auto     --                               PALLAS      2-3 passes, not ~17
===  ========================  ===============================  ==========  ======================

Rows 8-13 apply to a training-mode lean op (op ``lean``, or ``auto`` by the policy). Row 10:
without knowing the split the kernels would see the whole batch on every device. Row 12: the
platform's kernels' ``supported`` (:func:`kernels_for`): on TPU (and the CPU's interpreter)
``pallas_tpu.supported``: the two-pass kernels' (float32, rank >= 3, ``inner_relu``, channels
multiples of 8, a tile within the on-chip budget, the batch a multiple of its shards), else the
row kernels' (bfloat16, channels on the lanes, a row block within the budget); on GPU
``pallas_gpu.supported`` (float32 or bfloat16, channels a power of two >= 16, ...); and, on the
CPU, Pallas' interpreter outside a ``shard_map`` that checks varying axes. (Row 11, "no GPU
kernels", is gone since the GPU kernels exist.) The choice also carries the lean
op's ``tie`` (:func:`atac_jax.ops.lean._tie`): the policy's ``tie``, except ``"scalar"`` becomes
``"zeros"`` where the batch may lie on several devices (the scalar would be broadcast by a
collective). The figures behind each policy entry are in ``docs/ops_decisions.md``.

Where the batch lies (:func:`where_batch_lies`) is read from JAX itself, so a user's own step
needs no declaration: one device; ``jax.shard_map``/``pmap`` (the local shard); JAX's mesh
context (``jax.set_mesh``: the input's type names the batch's axes under explicit sharding, else
the mesh's first axis); the :func:`~atac_jax.ops.pallas_backward.data_parallel` declaration
overrides them all.
"""

from __future__ import annotations

import enum
from typing import Any, NamedTuple, Optional

import jax

from atac_jax.ops import pallas_backward, pallas_gpu, pallas_tpu, policy, types

IMPLS = ("auto", "lean", "pallas", "reference")
OPS = ("auto", "lean", "reference")
KERNELS = ("auto", "xla", "pallas")


class Backward(enum.Enum):
  """The backward pass a gate runs."""
  REFERENCE = "reference"  # plain autodiff of ops.reference (stores the bottleneck)
  XLA = "xla"  # the lean op (ops.lean), its backward written in XLA
  PALLAS = "pallas"  # the lean op, its training backward as the platform's Pallas kernels


class Request(NamedTuple):
  """What a caller asks for: the op (``OPS``) and the lean op's backward kernel (``KERNELS``)."""
  op: str = "auto"
  kernel: str = "auto"

  @classmethod
  def from_impl(cls, impl: str) -> "Request":
    """The request an ``impl`` name (``IMPLS``) of :func:`atac_jax.ops.gate` stands for.

    Raises:
      ValueError: for an unknown ``impl``.
    """
    if impl not in IMPLS:
      raise ValueError(f"Unknown gate impl {impl!r}; accepted: {list(IMPLS)}.")
    op = "lean" if impl == "pallas" else impl
    return cls(op, "pallas" if impl == "pallas" else "xla")

  @classmethod
  def from_module(cls, *, memory_lean: bool, backward_kernel: str,
                  layer: str = "ATAC") -> "Request":
    """The request of a unit's ``memory_lean`` and ``backward_kernel`` options.

    Raises:
      ValueError: for an unknown ``backward_kernel``.
    """
    if backward_kernel not in KERNELS:
      raise ValueError(f"{layer}: unknown backward_kernel {backward_kernel!r}; accepted: "
                       f"{list(KERNELS)}.")
    return cls("auto" if memory_lean else "reference", backward_kernel)


class BatchSplit(NamedTuple):
  """Where the batch of an op traced now lies.

  ``shards``: how many devices hold a part of it (None: unknown); ``parallel``: the declared
  mesh axes the kernels run per device over (None: the kernels see the whole batch); ``source``:
  how it is known.
  """
  shards: Optional[int]
  parallel: Optional[pallas_backward.DataParallel]
  source: str

  @property
  def known(self) -> bool:
    return self.shards is not None

  @property
  def on_one_device(self) -> bool:
    return self.shards == 1


def _context_mesh():
  """The abstract mesh of JAX's mesh context (``jax.set_mesh``, ``shard_map``, ``pmap``), or
  None outside one."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def _explicit_batch_axes(mesh, x) -> Optional[tuple[str, ...]]:
  """The mesh axes the input's type splits its batch over (explicit sharding), () where the
  type says the batch is whole on each device, None where the type does not say."""
  if x is None or not any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    return None
  spec = jax.typeof(x).sharding.spec
  entry = spec[0] if len(spec) else None
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def where_batch_lies(x: Optional[jax.Array] = None) -> BatchSplit:
  """The batch split of an op traced now, on input ``x`` (its leading axis is the batch).

  First match:

  1. a :func:`~atac_jax.ops.pallas_backward.data_parallel` declaration (the explicit override);
  2. inside ``jax.shard_map`` or ``pmap`` over every axis of the mesh (manual axes): ``x`` is
     this device's shard, the kernels run on it as on one device;
  3. JAX's mesh context (``jax.set_mesh``) with explicit axes: the mesh axes of ``x``'s type on
     its batch axis (none: the batch is whole on every device);
  4. JAX's mesh context with automatic axes: the batch is split over the mesh's first axis (the
     usual data axis; declare others with ``data_parallel``). The kernels run per shard under
     ``shard_map``, so the result is right wherever XLA actually put the batch;
  5. one device in the process's runtime: the batch lies on it;
  6. else unknown (a step whose batch XLA partitions looks the same as a replicated one).
  """
  declared = pallas_backward.current_data_parallel()
  if declared is not None:
    return BatchSplit(pallas_backward.shards(declared), declared, "data_parallel declaration")
  mesh = _context_mesh()
  if mesh is not None:
    manual = tuple(mesh.manual_axes)
    if manual:
      others = [a for a in mesh.axis_names if a not in manual and mesh.shape[a] > 1]
      if others:
        return BatchSplit(None, None, f"shard_map over {list(manual)} of a mesh with "
                          f"{others} automatic (the split over them is unknown)")
      return BatchSplit(1, None, f"shard_map over {list(manual)}: the local shard")
    axes = _explicit_batch_axes(mesh, x)
    source = "the input's sharding in the mesh context"
    if axes is None:
      axes, source = (mesh.axis_names[0],), "the mesh context's first axis"
    parallel = pallas_backward.DataParallel(mesh, axes) if axes else None
    return BatchSplit(pallas_backward.shards(parallel), parallel, source)
  if jax.device_count() == 1:
    return BatchSplit(1, None, "one device")
  return BatchSplit(None, None, "several devices, no declaration")


class Choice(NamedTuple):
  """The resolved backward of one call (hashable: part of the lean op's static config).

  ``by_platform``: the choice for each platform (``policy.PLATFORMS``), resolved with it: the
  lean op's backward pass is traced when the program is lowered, and takes the entry of the
  platform it is lowered for (:meth:`here`).
  """
  backward: Backward
  reason: str  # the table row that decided
  platform: str  # lowered for
  split: BatchSplit
  tie: str  # the lean op's tie mode (lean._tie)
  by_platform: tuple["Choice", ...] = ()

  def on(self, platform: str) -> "Choice":
    """The choice for ``platform`` ('cpu', 'gpu', 'tpu'); itself where it was not resolved."""
    return next((c for c in self.by_platform if c.platform == platform), self)

  def here(self) -> "Choice":
    """The choice for the platform being lowered for now (:func:`policy.platform`)."""
    return self.on(policy.platform())

  @property
  def kernels(self) -> bool:
    """Whether the training backward runs the Pallas kernels."""
    return self.backward is Backward.PALLAS

  @property
  def interpret(self) -> bool:
    """Whether the kernels run in Pallas' interpreter (lowering for the CPU: tests)."""
    return self.platform == "cpu"


def _tie(split: BatchSplit) -> str:
  mode = policy.choice("tie")
  return "zeros" if mode == "scalar" and not split.on_one_device else mode


def choose(request: Request, *, train: bool, axis_name: Any = None,
           x: Optional[jax.Array] = None, params: Any = None, inner_relu: bool = True) -> Choice:
  """The :class:`Choice` for ``request`` here (the module docstring's table).

  Args:
    request: what the caller asks for.
    train: training mode (batch statistics).
    axis_name: the ``shard_map``/``pmap`` axis of cross-device statistics, or None (every
      backward takes it: the lean op and the kernels sum their batch sums over it).
    x, params, inner_relu: the gate's input, :class:`~atac_jax.ops.GateParams` and option,
      for whether the kernels apply (rows 12-13); needed where a Pallas kernel may be chosen.

  Raises:
    ValueError: for an unknown op or kernel.
  """
  if request.op not in OPS:
    raise ValueError(f"Unknown gate op {request.op!r}; accepted: {list(OPS)}.")
  if request.kernel not in KERNELS:
    raise ValueError(f"Unknown backward kernel {request.kernel!r}; accepted: {list(KERNELS)}.")
  split, here = where_batch_lies(x), policy.platform()
  platforms = (here,) if policy.overridden() else policy.PLATFORMS
  by_platform = []
  for platform in platforms:
    with policy.lowering_for(platform):
      by_platform.append(_decide(request, train, axis_name, x, params, inner_relu, split))
  return next(c for c in by_platform if c.platform == here)._replace(
      by_platform=tuple(by_platform))


def _decide(request: Request, train: bool, axis_name: Any, x: Optional[jax.Array], params: Any,
            inner_relu: bool, split: BatchSplit) -> Choice:
  """The table's row for the platform :func:`policy.platform` names."""
  platform = policy.platform()
  make = lambda backward, reason: Choice(backward, reason, platform, split, _tie(split))
  op, kernel = request
  if op == "reference":
    return make(Backward.REFERENCE, "1: asked")
  if not train:
    if op == "auto":
      return make(Backward.REFERENCE, "4: inference keeps nothing for a backward pass")
    if kernel == "pallas":
      return make(Backward.REFERENCE, "5: the kernels are a training backward")
    return make(Backward.XLA, "6: the lean op in inference, asked")
  if op == "auto" and policy.choice("gate_impl") == "reference":
    return make(Backward.REFERENCE, f"7: policy gate_impl on {platform}")
  if kernel == "xla":
    return make(Backward.XLA, "8: asked")
  if kernel == "auto":
    if policy.choice("backward_kernel") == "xla":
      return make(Backward.XLA, f"9: policy backward_kernel on {platform}")
    if not split.known:
      return make(Backward.XLA, f"10: batch split unknown ({split.source})")
  if x is not None and not all(isinstance(d, int) for d in x.shape):
    unsupported = f"symbolic shape {x.shape} (jax.export): the kernels' tiling needs sizes"
  else:
    unsupported = kernels_for(platform).supported(x, params, inner_relu=inner_relu,
                                                  parallel=split.parallel)
  if unsupported is None and axis_name is not None and split.parallel is not None:
    unsupported = (f"axis_name={axis_name!r} inside a data_parallel declaration (declare the "
                   "split or name the axis, not both)")
  if unsupported is None and platform == "cpu" and x is not None and types.varying_axes(x):
    unsupported = ("Pallas' interpreter does not run under a shard_map that checks varying "
                   "axes (check_vma=True; TPU compiles the kernels there)")
  if unsupported is not None:
    return make(Backward.XLA, f"12: kernels do not apply: {unsupported}")
  return make(Backward.PALLAS, f"13: {platform} kernels ({split.source})")


def kernels_for(platform: str):
  """The Pallas backward's module for ``platform``: :mod:`~atac_jax.ops.pallas_gpu` (Triton)
  on GPU, else :mod:`~atac_jax.ops.pallas_tpu` (Mosaic on TPU, Pallas' interpreter on the
  CPU)."""
  return pallas_gpu if platform == "gpu" else pallas_tpu
