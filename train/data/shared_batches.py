"""Batches from grain's worker processes through reused shared-memory slots.

grain's ``mp_prefetch`` hands each worker's batch to the main process in a *new* shared-memory
segment: the worker copies the batch into it and the main process unlinks it once the batch is
dropped. The new segment's pages are the cost: on the project's 2-core AMD EPYC VM, copying a
128x224x224x3 uint8 batch into a new segment takes ~17 ms of worker CPU (page faults and zeroing;
stacking the same crops into memory already mapped takes ~2 ms) and unmapping and freeing it ~2.7
ms of the main process's, together ~14% of the ~141 ms the batch takes to make on one core.

Here each worker keeps a pool of segments, grown on demand up to `MAX_SLOTS`, and stacks a batch
straight into a free one (`stack`); what crosses grain's queue is the segment's name and layout
(`SlotBatch`). Unpickled in the main process that maps the segment and becomes a dict of NumPy
views of it. When the last view of the batch is gone (a ``weakref.finalize`` on the views' common
base), the main process marks the slot free in the segment's header and unmaps it, and the worker
writes a later batch there. The values are exactly ``np.stack``'s. With no free slot (a consumer
holding many batches) a batch takes grain's own path, so nothing waits for a slot.

Outside a worker (``num_workers=0``), or where POSIX shared memory is missing, `stack` is plain
``np.stack``. A worker unlinks its segments when it exits; after a crash the multiprocessing
resource tracker unlinks them when the main process exits.
"""

from __future__ import annotations

import mmap
import os
import threading
import weakref
from collections.abc import Mapping, Sequence
from multiprocessing import shared_memory
from multiprocessing import util as mp_util
from typing import Any

import numpy as np

try:  # the POSIX shm_open that multiprocessing.shared_memory itself uses
  import _posixshmem
except ImportError:  # no slots there: grain's own path
  _posixshmem = None

MAX_SLOTS = 32  # per worker; each holds one batch, and a pool grows only to the batches in flight
_HEADER = 64  # bytes before the first array; byte 0 is 1 while the slot's batch is alive
_ALIGN = 64


class _Pool:
  """A worker's shared-memory segments; ``acquire`` marks a free one used (or makes one)."""

  def __init__(self, max_slots: int):
    self.max_slots = max_slots
    self.segments: list[shared_memory.SharedMemory] = []
    self.closed = False  # at exit: the prefetch threads may still be batching
    self.lock = threading.Lock()  # the worker's prefetch threads batch concurrently

  def acquire(self, size: int) -> shared_memory.SharedMemory | None:
    with self.lock:
      if self.closed:
        return None
      for segment in self.segments:
        if segment.size >= size and segment.buf[0] == 0:
          segment.buf[0] = 1
          return segment
      if len(self.segments) >= self.max_slots:
        return None
      segment = shared_memory.SharedMemory(create=True, size=size)
      segment.buf[0] = 1
      self.segments.append(segment)
      return segment

  def unlink_all(self) -> None:
    with self.lock:
      self.closed = True
      for segment in self.segments:
        try:
          segment.unlink()
        except FileNotFoundError:
          pass
      self.segments = []


_POOL: _Pool | None = None


def enable_in_worker(max_slots: int = MAX_SLOTS) -> None:
  """Makes `stack` write into reused shared-memory slots in this (grain worker) process."""
  global _POOL
  if _POOL is None and _posixshmem is not None:
    _POOL = _Pool(max_slots)
    mp_util.Finalize(_POOL, _POOL.unlink_all, exitpriority=10)


def enabled() -> bool:
  """Whether `stack` writes into shared-memory slots in this process."""
  return _POOL is not None


Column = Sequence[Any] | np.ndarray


def _spec(column: Column) -> tuple[tuple[int, ...], np.dtype]:
  if isinstance(column, np.ndarray):
    return column.shape, column.dtype
  first = np.asarray(column[0])
  return (len(column), *first.shape), np.result_type(*column)


def _fill(out: np.ndarray, column: Column) -> None:
  if isinstance(column, np.ndarray):
    np.copyto(out, column, casting="no")
  else:
    np.stack(column, out=out)


class SlotBatch:
  """A batch written into a worker's slot; unpickles (in the main process) to ``{key: view}``."""

  def __init__(self, name: str, size: int, layout: tuple[tuple[str, int, tuple[int, ...], str],
                                                          ...]):
    self.name, self.size, self.layout = name, size, layout

  def __reduce__(self):
    return _open, (self.name, self.size, self.layout)


def stack(columns: Mapping[str, Column], *, pool: _Pool | None = None
          ) -> dict[str, np.ndarray] | SlotBatch:
  """One batch: each column (a sequence of equally shaped arrays, stacked along a new leading
  axis, or an array taken as it is) into one array per key; in a worker with slots (or given a
  ``pool``), written into a free slot and returned as a `SlotBatch`."""
  pool = _POOL if pool is None else pool
  specs = {key: _spec(column) for key, column in columns.items()}
  layout, offset = [], _HEADER
  for key, (shape, dtype) in specs.items():
    layout.append((key, offset, shape, dtype.str))
    offset += -(-int(np.prod(shape)) * dtype.itemsize // _ALIGN) * _ALIGN
  segment = pool.acquire(offset) if pool is not None and all(
      not dtype.hasobject for _, dtype in specs.values()) else None
  if segment is None:
    return {key: column if isinstance(column, np.ndarray) else np.stack(column)
            for key, column in columns.items()}
  try:
    for (key, start, shape, dtype), column in zip(layout, columns.values()):
      _fill(np.ndarray(shape, dtype, buffer=segment.buf, offset=start), column)
  except BaseException:
    segment.buf[0] = 0
    raise
  return SlotBatch(segment.name, offset, tuple(layout))


def _release(mapping: mmap.mmap) -> None:
  mapping[0] = 0  # the worker may write a new batch here; the mapping goes with the views


def _open(name: str, size: int, layout) -> dict[str, np.ndarray] | None:
  """The batch in segment ``name`` as views that free the slot when the last one is gone."""
  try:
    fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
  except FileNotFoundError:  # the worker has exited: grain drains its queue when stopping
    return None
  try:
    mapping = mmap.mmap(fd, size)
  finally:
    os.close(fd)
  base = np.frombuffer(mapping, np.uint8)  # every view below keeps `base` (not the mmap) alive
  weakref.finalize(base, _release, mapping)
  batch = {}
  for key, start, shape, dtype in layout:
    dtype = np.dtype(dtype)
    stop = start + int(np.prod(shape)) * dtype.itemsize
    batch[key] = base[start:stop].view(dtype).reshape(shape)
  return batch
