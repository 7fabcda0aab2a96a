"""A reader of optimised HLO text (``compiled.as_text()``): computations, instructions, sizes.

The one parser of HLO text in the project: ``atac-bench compile --breakdown``
(:func:`atac_train.aot.breakdown`) and the fusion tests (``tests/test_atac_fusion.py``) read
programs through it.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

ELEMENT_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "f16": 16,
                "bf16": 16, "s32": 32, "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64,
                "c64": 64, "c128": 128, "f8e4m3fn": 8, "f8e5m2": 8}
ARRAY_RE = re.compile(r"\b(" + "|".join(sorted(ELEMENT_BITS, key=len, reverse=True))
                      + r")\[([0-9,]*)\](\{[^}]*\})?")
_INSTRUCTION_RE = re.compile(r"^\s*(ROOT )?%(\S+) = (.*?) ([a-z][\w-]*)\((.*)$")
_COMPUTATION_RE = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*?\) -> .*?\{\n(.*?)\n\}",
                             re.M | re.S)


class Instruction(NamedTuple):
  """One HLO instruction: ``%name = shape op(operands), attributes``."""
  name: str
  shape: str  # the output shape's text, e.g. ``f32[8,32]{1,0}`` or a tuple ``(f32[8], s32[])``
  op: str
  operands: list[str]  # operand names, without ``%``
  attributes: str  # the text after the operands (``kind=``, ``calls=``, ``metadata=...``)
  root: bool

  @property
  def calls(self) -> str:
    """The computation a fusion or call runs (``calls=%name``), or ''."""
    match = re.search(r"calls=%([\w.\-]+)", self.attributes)
    return match.group(1) if match else ""


def computations(text: str) -> dict[str, str]:
  """Name -> body of every computation of an HLO module; the entry is under ``'ENTRY'``.

  Raises:
    ValueError: if the text has no ENTRY computation.
  """
  entry = re.search(r"^ENTRY %?([\w.\-]+) ", text, re.M)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text.")
  return {("ENTRY" if name == entry.group(1) else name): body
          for name, body in _COMPUTATION_RE.findall(text)}


def _split_operands(rest: str) -> tuple[list[str], str]:
  """The ``%names`` up to the opcode's closing parenthesis, and the text after it."""
  depth = 1
  for i, char in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(char, 0)
    if depth == 0:
      return re.findall(r"%([\w.\-]+)", rest[:i]), rest[i + 1:]
  return re.findall(r"%([\w.\-]+)", rest), ""


def instructions(body: str) -> list[Instruction]:
  """The instructions of one computation's body, in order."""
  out = []
  for line in body.splitlines():
    match = _INSTRUCTION_RE.match(line)
    if match:
      root, name, shape, op, rest = match.groups()
      operands, attributes = _split_operands(rest)
      out.append(Instruction(name, shape, op, operands, attributes, bool(root)))
  return out


def elements(shape: str) -> int:
  """Elements of an array shape's text (``f32[8,32]{1,0}`` -> 256); 0 for a tuple."""
  dims = re.match(r"\w+\[([\d,]*)\]", shape)
  return math.prod(int(d) for d in dims.group(1).split(",") if d) if dims else 0


def array_bytes(dtype: str, dims: str, layout: str | None) -> tuple[int, int]:
  """``(padded, logical)`` bytes of one HLO array, e.g. ``('f32', '32,16', '{0,1:T(8,128)}')``.

  The padded size rounds the minor dimensions (in the layout's minor-to-major order) up to the
  layout's first tile, ``T(8,128)``: how the TPU stores the array (a tiled scalar fills its
  tile). ``E(n)`` overrides the element size in bits.
  """
  shape = [int(d) for d in dims.split(",") if d]
  bits = ELEMENT_BITS[dtype]
  logical = math.prod(shape) * bits // 8
  order, _, attributes = (layout or "{}")[1:-1].partition(":")
  physical = [shape[int(i)] for i in reversed(order.split(","))] if order.strip() else shape
  tile = re.search(r"T\(([0-9,]+)\)", attributes)
  if tile:
    tile_dims = [int(t) for t in tile.group(1).split(",")]
    physical = physical or [1]
    for k, t in enumerate(reversed(tile_dims[-len(physical):])):  # minor first
      physical[-1 - k] = -(-physical[-1 - k] // t) * t
  element = re.search(r"E\((\d+)\)", attributes)
  if element:
    bits = int(element.group(1))
  return math.prod(physical) * bits // 8, logical


def shape_bytes(text: str) -> tuple[int, int]:
  """``(padded, logical)`` bytes of every array in a shape's text (a tuple's elements summed)."""
  sizes = [array_bytes(*m) for m in ARRAY_RE.findall(text)]
  return sum(p for p, _ in sizes), sum(l for _, l in sizes)
