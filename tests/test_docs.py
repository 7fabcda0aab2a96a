"""The documentation: the Sphinx site builds offline with warnings as errors, every Python code
block of README.md and docs/*.md runs as written (file by file, in reading order), and the README
stays a front page whose set-up commands are the ones CI runs.

The conventions the blocks follow are in docs/development.md ("Documentation"):
``<!-- docs-test: continues -->`` before a block runs it in the namespace of the previous block of
the same file; ``<!-- docs-test: not run: REASON -->`` only compiles it; blocks run in a temporary
directory where ``workdirs/quickstart`` is the small trained workdir of ``trained_workdir``.
"""

import dataclasses
import glob
import os
import re
import subprocess
import sys
import tomllib

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTINUES = "<!-- docs-test: continues -->"
NOT_RUN = re.compile(r"<!-- docs-test: not run: (.+\S) -->")
MARKER = re.compile(r"<!-- docs-test:")
WORKDIR = "workdirs/quickstart"



@dataclasses.dataclass(frozen=True)
class Block:
  path: str          # relative to the repository
  line: int          # of the opening fence, 1-based
  language: str
  code: str
  continues: bool
  not_run: str | None  # the reason, for blocks that are only compiled


def doc_files() -> list[str]:
  """README.md, then the guides, relative to the repository."""
  docs = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
  return ["README.md"] + docs


def parse(path: str) -> list[Block]:
  """The fenced code blocks of one Markdown file, with the markers that precede them."""
  with open(os.path.join(REPO, path)) as f:
    lines = f.read().split("\n")
  blocks, pending, i = [], [], 0
  while i < len(lines):
    stripped = lines[i].strip()
    if MARKER.match(stripped):
      pending.append((i + 1, stripped))
    elif stripped.startswith("```") and len(stripped) > 3:
      indent = len(lines[i]) - len(lines[i].lstrip())
      start, language, body = i + 1, stripped[3:].strip(), []
      i += 1
      while i < len(lines) and lines[i].strip() != "```":
        body.append(lines[i][indent:])
        i += 1
      markers = [m for _, m in pending]
      not_run = [NOT_RUN.match(m).group(1) for m in markers if NOT_RUN.match(m)]
      unknown = [m for m in markers if m != CONTINUES and not NOT_RUN.match(m)]
      assert not unknown, f"{path}:{start}: unknown marker(s) {unknown}"
      assert language == "python" or not markers, f"{path}:{start}: marker on a {language} block"
      code = "\n".join(body) + "\n"
      reason = not_run[0] if not_run else None
      blocks.append(Block(path, start, language, code, CONTINUES in markers, reason))
      pending = []
    elif stripped and pending:
      raise AssertionError(f"{path}:{pending[0][0]}: a docs-test marker must come right before a "
                           f"code block (blank lines allowed), not before {stripped[:40]!r}")
    i += 1
  assert not pending, f"{path}:{pending[0][0]}: a docs-test marker with no code block after it"
  return blocks


def python_blocks(path: str) -> list[Block]:
  return [b for b in parse(path) if b.language == "python"]


FILES_WITH_PYTHON = [p for p in doc_files() if python_blocks(p)]


def test_blocks_follow_the_conventions():
  total = 0
  for path in doc_files():
    blocks = python_blocks(path)
    total += len(blocks)
    runnable = [b for b in blocks if b.not_run is None]
    if blocks and blocks[0].continues:
      raise AssertionError(f"{path}:{blocks[0].line}: the first block cannot continue another")
    for before, block in zip(blocks, blocks[1:]):
      assert not (block.continues and before.not_run), (
          f"{path}:{block.line} continues a block that is not run")
    for block in blocks:
      compile(block.code, f"{path}:{block.line}", "exec")  # every block is valid Python
    assert all(b.not_run is None for b in runnable)
  # The README's blocks run (none is exempt).
  assert all(b.not_run is None for b in python_blocks("README.md"))
  assert total >= 10


@pytest.mark.parametrize("path", FILES_WITH_PYTHON)
def test_code_blocks_run_in_reading_order(path, tmp_path, monkeypatch, request):
  blocks = python_blocks(path)
  if any(WORKDIR in b.code for b in blocks if b.not_run is None):
    trained, _ = request.getfixturevalue("trained_workdir")
    os.makedirs(tmp_path / "workdirs")
    os.symlink(trained, tmp_path / WORKDIR)
  monkeypatch.chdir(tmp_path)
  namespace = {}
  for block in blocks:
    code = compile(block.code, f"{block.path}:{block.line}", "exec")
    if block.not_run is not None:
      continue
    if not block.continues:
      namespace = {"__name__": f"docs_block_{block.line}"}
    try:
      exec(code, namespace)  # pylint: disable=exec-used
    except Exception as e:  # pylint: disable=broad-except
      raise AssertionError(f"the code block at {block.path}:{block.line} failed: "
                           f"{type(e).__name__}: {e}") from e


def test_sphinx_builds_offline_with_warnings_as_errors(tmp_path):
  pytest.importorskip("sphinx")
  pytest.importorskip("myst_parser")
  out = tmp_path / "html"
  result = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html",
       "docs", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
  with open(out / "api.html") as f:
    api = f.read()
  for name in ("atac_jax.layers.ATAC", "atac_jax.layers.get_activation", "atac_jax.models.create",
               "atac_jax.nnx.ATAC", "atac_jax.nnx.to_linen", "atac_jax.ops.gate",
               "atac_jax.checkpoint.load", "atac_jax.preprocessing.preprocess"):
    assert f'id="{name}"' in api, name
  guides = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(
      os.path.join(REPO, "docs", "*.md"))}
  assert {p.stem for p in out.glob("*.html")} >= guides  # every guide is a page of the site


def _readme():
  with open(os.path.join(REPO, "README.md")) as f:
    return f.read()


def test_readme_is_a_front_page():
  text = _readme()
  assert len(text.split("\n")) <= 300
  cells = [c for line in text.split("\n") if line.startswith("|") for c in line.split("|")]
  assert max(len(c) for c in cells) <= 300


def test_ci_installs_and_runs_what_the_readme_sets_up():
  setup = text = _readme()
  setup = text[text.index("## Set up"):].split("```bash\n", 1)[1].split("```", 1)[0]
  commands = [line for line in setup.split("\n") if line and not line.startswith("#")]
  assert len(commands) == 2
  install, test = commands[1].split(" && ")
  with open(os.path.join(REPO, ".ci", "run")) as f:
    ci = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
  assert install.replace("pip install", "pip install --quiet") in ci
  assert test in ci
  # The test extra pulls in the docs extra, so CI builds the documentation.
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    extras = tomllib.load(f)["project"]["optional-dependencies"]
  assert '".[test]"' in install and "atac-jax[docs]" in extras["test"]
  assert all(re.search(r">=\d", r) for r in extras["docs"])


def test_shell_blocks_name_configs_that_exist():
  named = set()
  for path in doc_files():
    for block in parse(path):
      if block.language in ("bash", "sh", ""):
        named |= set(re.findall(r"--config (configs/[a-z0-9_]+\.py)", block.code))  # not NAME.py
  assert named, "no shell block names a config"
  missing = sorted(c for c in named if not os.path.exists(os.path.join(REPO, c)))
  assert not missing, missing
