"""The distribution adds only `atac_jax` and `atac_train` to site-packages, ships the configs, and
every console script sets the XLA flags before JAX is imported (atac_train.cli)."""

import glob
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile

import pytest

from atac_train import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


def _package_dirs(folder, name):
  """Dotted names of the packages (folders with __init__.py) under ``folder``, as ``name``."""
  found = []
  for root, _, files in os.walk(os.path.join(REPO, folder)):
    if "__init__.py" in files and "__pycache__" not in root:
      rel = os.path.relpath(root, os.path.join(REPO, folder))
      found.append(name if rel == "." else f"{name}.{rel.replace(os.sep, '.')}")
  return found


def test_package_list_covers_every_package_folder():
  tool = _pyproject()["tool"]["setuptools"]
  assert tool["package-dir"] == {"atac_train": "train", "atac_train.configs": "configs"}
  expected = (_package_dirs("atac_jax", "atac_jax") + _package_dirs("train", "atac_train")
              + _package_dirs("configs", "atac_train.configs"))
  assert sorted(tool["packages"]) == sorted(expected)


def test_console_scripts_start_in_cli():
  scripts = _pyproject()["project"]["scripts"]
  assert scripts == {f"atac-{c}": f"atac_train.cli:{'evaluate' if c == 'eval' else c}"
                     for c in cli.COMMANDS}


@pytest.mark.slow
def test_wheel_has_no_generic_top_level_names(tmp_path):
  source = tmp_path / "src"
  os.makedirs(source)
  for name in ("pyproject.toml", "README.md", "atac_jax", "train", "configs"):
    copy = shutil.copytree if os.path.isdir(os.path.join(REPO, name)) else shutil.copy
    copy(os.path.join(REPO, name), source / name,
         **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}))
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                  str(tmp_path / "dist"), str(source)], check=True, capture_output=True,
                 timeout=600)
  (wheel,) = glob.glob(str(tmp_path / "dist" / "*.whl"))
  with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    z.extractall(tmp_path / "site")
  assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {
      "atac_jax", "atac_train"}
  assert "atac_train/configs/quickstart.py" in names
  # The installed copy (not the checkout) works from anywhere: packaged configs included.
  probe = textwrap.dedent("""
      import atac_train, importlib.util
      from atac_train import config_file
      assert atac_train.__file__.startswith(%r), atac_train.__file__
      assert importlib.util.find_spec("train") is None and importlib.util.find_spec("configs") is None
      print(config_file.resolve("quickstart"), config_file.packaged_configs())
  """ % str(tmp_path / "site"))
  result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(tmp_path / "site")))
  assert result.returncode == 0, result.stderr[-2000:]
  assert "site/atac_train/configs/quickstart.py" in result.stdout


def test_no_generic_import_names_outside_the_checkout(tmp_path):
  probe = ("import importlib.util as u; print(u.find_spec('train'), u.find_spec('configs'), "
           "u.find_spec('atac_train.configs.quickstart') is not None)")
  result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, check=True)
  assert result.stdout.split() == ["None", "None", "True"]


def test_cli_sets_xla_flags_before_jax_is_imported(tmp_path):
  (tmp_path / "probe_command.py").write_text(textwrap.dedent("""
      import os, sys
      def run():
        print("jax imported:", "jax" in sys.modules, "| XLA_FLAGS:", os.environ["XLA_FLAGS"])
  """))
  code = ("from atac_train import cli; cli.COMMANDS['probe'] = 'probe_command'; "
          "cli.main(['python', 'probe'])")
  env = dict(os.environ, PYTHONPATH=str(tmp_path), XLA_FLAGS="--xla_dump_to=/tmp/x")
  env.pop("ATAC_JAX_CPU_DEFAULTS", None)
  result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env=env, check=True)
  assert result.stdout.strip() == ("jax imported: False | XLA_FLAGS: --xla_dump_to=/tmp/x "
                                   "--xla_cpu_experimental_ynn_fusion_type=")


def test_command_modules_do_not_defer_imports_to_set_flags():
  """The training CLIs import JAX at the top: cli.py is the one place that runs first."""
  for name in ("main.py", "evaluate.py"):
    with open(os.path.join(REPO, "train", name)) as f:
      source = f.read()
    assert "g-import-not-at-top" not in source and "cpu_defaults.apply" not in source, name
    assert "\nimport jax\n" in source or "\nfrom atac_jax import" in source, name
