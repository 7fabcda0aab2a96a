"""Loading ``--config``: packaged config names, and one-line errors instead of tracebacks.

``ml_collections.config_flags`` loads the config file while absl parses the command line, so a
missing file, a syntax error, a ``get_config()`` that raises or a misspelt ``--config.KEY``
would otherwise surface as tracebacks from inside absl. :func:`parse_flags` is the
``flags_parser`` that ``absl.app.run`` calls instead of its default: it resolves the config
argument, parses, and turns each of those failures into ``PROG: error: ...`` and exit status 2.

``--config`` takes a file path (``configs/quickstart.py``, optionally ``path:arg`` for a
``get_config(arg)``), or the name of a config shipped with the package (``quickstart``), which
works from any directory; so does ``configs/NAME.py`` where no such file exists.
"""

from __future__ import annotations

import difflib
import importlib.resources
import os
import re
import runpy
import sys
from typing import Any, Sequence

import ml_collections
from absl import flags

from atac_train.errors import ConfigError

PACKAGE = "atac_train.configs"


def packaged_configs() -> list[str]:
  """Names of the configs shipped in :mod:`atac_train.configs` (``--config NAME``)."""
  files = importlib.resources.files(PACKAGE)
  return sorted(entry.name[:-3] for entry in files.iterdir()
                if entry.name.endswith(".py") and not entry.name.startswith("_"))


def resolve(value: str) -> str:
  """The file ``--config=value`` designates (a path, or a packaged config name), ``:arg`` kept.

  Raises:
    ConfigError: if it is neither an existing file nor a packaged config.
  """
  path, sep, arg = value.partition(":")
  if os.path.isfile(path):
    return value
  name = os.path.basename(path)[:-3] if path.endswith(".py") else os.path.basename(path)
  # NAME, NAME.py, or the README's configs/NAME.py run outside a checkout.
  if name in packaged_configs() and os.path.dirname(os.path.normpath(path)) in ("", "configs"):
    return str(importlib.resources.files(PACKAGE) / f"{name}.py") + sep + arg
  problem = "is a directory" if os.path.isdir(path) else "does not exist"
  raise ConfigError(f"--config={value}: {path} {problem}; give a config file (e.g. "
                    f"configs/quickstart.py) or a packaged config name: "
                    f"{', '.join(packaged_configs())}.")


def _config_argument(argv: Sequence[str], name: str) -> tuple[int, str] | None:
  """(index, value) of ``--name=value`` or ``--name value`` in ``argv``."""
  for i, arg in enumerate(argv):
    if arg in (f"--{name}", f"-{name}") and i + 1 < len(argv):
      return i + 1, argv[i + 1]
    for prefix in (f"--{name}=", f"-{name}="):
      if arg.startswith(prefix):
        return i, arg
  return None


def _overrides(argv: Sequence[str], name: str) -> list[str]:
  """The dotted keys of ``--name.KEY=...`` / ``--noname.KEY`` overrides, in order."""
  keys = []
  for arg in argv:
    match = re.match(rf"^--?(?:no)?{re.escape(name)}\.([^=\s]+)", arg)
    if match:
      keys.append(match.group(1))
  return keys


def unknown_key_message(config: Any, key: str) -> str | None:
  """Explains why ``key`` (dotted) is not a key of ``config``, or None if it is one."""
  node, walked = config, []
  for part in re.sub(r"\[[^\]]*\]", "", key).split("."):
    section = ".".join(["config", *walked])
    if not isinstance(node, ml_collections.ConfigDict):
      return (f"--config.{key}: {section} is a {type(node).__name__} ({node!r}), it has no key "
              f"{part!r}.")
    if part in node:
      node = node[part]
      walked.append(part)
      continue
    keys = sorted(node.keys())
    close = difflib.get_close_matches(part, keys, n=1)
    hint = f" Did you mean {section}.{close[0]}?" if close else ""
    return (f"--config.{key}: unknown key {part!r} in {section}.{hint} Valid keys of "
            f"{section}: {', '.join(keys) or '(none)'}.")
  return None


def _load(value: str) -> Any:
  path, _, arg = value.partition(":")
  get_config = runpy.run_path(path)["get_config"]
  return get_config(arg) if arg else get_config()


def _one_line(error: BaseException) -> str:
  return " ".join(str(error).split())


def _explain(error: BaseException, argv: Sequence[str], name: str) -> str:
  """A one-line message for an exception raised while absl parsed ``argv``."""
  found = _config_argument(argv, name)
  value = found[1].split("=", 1)[-1] if found else ""
  path = value.partition(":")[0]
  if isinstance(error, flags.Error):
    return _one_line(error)
  if isinstance(error, SyntaxError):
    return (f"config file {error.filename or path}, line {error.lineno}: {error.msg}: "
            f"{(error.text or '').strip()!r}.")
  overrides = _overrides(argv, name)
  if overrides:  # the file may be fine and an override name a key it does not have
    try:
      config = _load(value)
    except Exception:  # pylint: disable=broad-except  # the file itself fails: reported below
      config = None
    for key in overrides if config is not None else ():
      message = unknown_key_message(config, key)
      if message:
        return message
  original = error
  if str(error).startswith("Error whilst parsing config file") and error.__context__:
    original = error.__context__  # config_flags re-raises TypeError/ValueError with a traceback
  if isinstance(original, OSError) and "earlier failure to load" in str(original):
    original = original.__cause__ or original
  return (f"config file {path}: get_config() failed: {type(original).__name__}: "
          f"{_one_line(original)}")


def parse_flags(argv: list[str], *, name: str = "config", prog: str = "atac-train"
                ) -> list[str]:
  """``absl.app.run`` flags parser: like absl's, with one-line errors for the config flag.

  Args:
    argv: the command line, program name first.
    name: the ``DEFINE_config_file`` flag.
    prog: the program name for error messages.

  Returns:
    The arguments absl did not consume (program name first).
  """
  argv = list(argv)
  try:
    found = _config_argument(argv, name)
    if found:
      index, arg = found
      if arg.startswith("-"):
        flag, value = arg.split("=", 1)
        argv[index] = f"{flag}={resolve(value)}"
      else:
        argv[index] = resolve(arg)
    remaining = flags.FLAGS(argv)
    config = flags.FLAGS[name].value
    if config is not None:
      config.keys()  # a file that failed to load raises here (config_flags defers the error)
    return remaining
  except Exception as error:  # pylint: disable=broad-except  # reported as one line
    message = str(error) if isinstance(error, ConfigError) else _explain(error, argv, name)
    sys.stderr.write(f"{prog}: error: {message}\n")
    sys.exit(2)
