"""Entry points of the console scripts: the one place that prepares a CLI process.

Every command (``atac-train``, ``atac-eval``, ``atac-bench``, ``atac-prepare``, ``atac-viz``,
``atac-compare``) starts here. Before anything imports JAX, it

1. installs the Ctrl-C/SIGTERM handling of :mod:`atac_train.interrupts` (no tracebacks, no
   segfaults), and
2. adds the measured XLA CPU defaults of :mod:`atac_train.cpu_defaults` to ``XLA_FLAGS``,

and only then imports the command's module, so those modules import JAX at the top like any
other. ``python -m atac_train COMMAND [ARGS]`` runs the same commands without the scripts.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Sequence

from atac_train import cpu_defaults, hooks, interrupts

# command -> module with a run() entry point
COMMANDS = {
    "train": "atac_train.main",
    "eval": "atac_train.evaluate",
    "bench": "atac_train.bench",
    "prepare": "atac_train.prepare",
    "viz": "atac_train.viz",
    "compare": "atac_train.compare",
}


def _run(command: str) -> None:
  interrupts.install()
  cpu_defaults.apply()
  # gcsfs warns on every bucket it opens without default credentials (the emulator, workload
  # identity); its real failures still reach the user as errors.
  logging.getLogger("gcsfs").setLevel(logging.ERROR)
  hooks.reached("import")
  importlib.import_module(COMMANDS[command]).run()


def train() -> None:
  """``atac-train``."""
  _run("train")


def evaluate() -> None:
  """``atac-eval``."""
  _run("eval")


def bench() -> None:
  """``atac-bench``."""
  _run("bench")


def prepare() -> None:
  """``atac-prepare``."""
  _run("prepare")


def viz() -> None:
  """``atac-viz``."""
  _run("viz")


def compare() -> None:
  """``atac-compare``."""
  _run("compare")


def main(argv: Sequence[str] | None = None) -> None:
  """``python -m atac_train COMMAND [ARGS]``: runs ``atac-COMMAND [ARGS]``."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] not in COMMANDS:
    got = repr(argv[1]) if len(argv) > 1 else "nothing"
    print(f"usage: python -m atac_train {{{','.join(COMMANDS)}}} [ARGS]; got {got}.",
          file=sys.stderr)
    sys.exit(2)
  sys.argv = [f"atac-{argv[1]}", *argv[2:]]
  _run(argv[1])
