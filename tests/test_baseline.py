"""atac-bench baseline: another checkout's package imported beside this one, timed in one process."""

import importlib
import json
import pathlib
import sys

import pytest

from atac_jax import models
from atac_train import baseline, bench

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_load_package_imports_a_renamed_copy_of_the_checkout():
  package = baseline.load_package(REPO, name="atac_jax_copy_under_test")
  copy_models = importlib.import_module("atac_jax_copy_under_test.models")
  here = pathlib.Path(models.__file__).resolve()
  there = pathlib.Path(copy_models.__file__).resolve()
  assert there != here and REPO not in there.parents
  # Its modules import one another, not this checkout's.
  lean = sys.modules["atac_jax_copy_under_test.ops.lean"]
  assert lean.dispatch.__name__ == "atac_jax_copy_under_test.ops.dispatch"
  assert "atac_jax." not in there.read_text().replace("atac_jax_copy_under_test", "")
  # The same model, parameter for parameter.
  shape = (1, 32, 32, 3)
  ours = models.count_params(models.init_shapes(
      models.create("cifar_resnet20", num_classes=10, act="atac"), shape)["params"])
  theirs = copy_models.count_params(copy_models.init_shapes(
      copy_models.create("cifar_resnet20", num_classes=10, act="atac"), shape)["params"])
  # ResNet-20 (272,282) plus 19 ATAC units with r = 2 (C^2 + 3C each, 34,576 in all).
  assert ours == theirs == 306_858
  # Loading the same checkout again under the same name reuses the import.
  assert baseline.load_package(REPO, name="atac_jax_copy_under_test") is package


def test_a_folder_without_the_package_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="holds no atac_jax package.*git worktree"):
    baseline.load_package(tmp_path, name="atac_jax_never_loaded")


def test_a_second_baseline_under_one_name_is_refused(tmp_path):
  baseline.load_package(REPO, name="atac_jax_one_baseline")
  other = tmp_path / "atac_jax"
  other.mkdir()
  (other / "__init__.py").write_text("")
  with pytest.raises(ValueError, match="already imported"):
    baseline.load_package(tmp_path, name="atac_jax_one_baseline")


def test_compare_checkouts_times_three_sides_of_the_same_step(capsys):
  """This checkout as its own baseline: identical programs give identical first-step losses."""
  bench.main(["baseline", "--checkout", str(REPO), "--model", "convnet_mnist", "--act", "atac",
              "--batch", "4", "--rounds", "2", "--steps", "1"])
  (record,) = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
  sides = record["sides"]
  assert set(sides) == {"relu", "atac", "atac@baseline"}
  assert sides["atac"]["first_loss"] == sides["atac@baseline"]["first_loss"]
  assert sides["relu"]["first_loss"] != sides["atac"]["first_loss"]
  assert sides["atac"]["temp_bytes"] == sides["atac@baseline"]["temp_bytes"]
  for side in sides.values():
    assert side["step_seconds_median"] > 0 and side["cpu_seconds_median"] > 0
  assert record["ratio"]["relu"] == 1.0 and record["cpu_ratio"]["relu"] == 1.0
  expected = (sides["atac@baseline"]["step_seconds_median"]
              / sides["atac"]["step_seconds_median"])
  assert record["speedup_vs_baseline"] == pytest.approx(expected)
  # Two rounds: the bootstrap interval of the median of two ratios spans the two.
  low, high = record["speedup_vs_baseline_ci95"]
  assert record["speedup_vs_baseline_median_of_rounds"] == pytest.approx((low + high) / 2)
  assert set(record["ratio_ci95"]) == {"atac", "atac@baseline"}
  for side, (low, high) in record["ratio_ci95"].items():
    assert low <= record["ratio_median_of_rounds"][side] <= high
  assert record["baseline"] == str(REPO / "atac_jax")


@pytest.mark.parametrize("argv, message", [
    (["--checkout", "/nonexistent/checkout"], "holds no atac_jax package"),
    (["--checkout", str(REPO), "--rounds", "0"], "must be >= 1"),
    (["--checkout", str(REPO), "--compare", "atac"], "must differ from --act"),
])
def test_bad_options_are_clear_errors(capsys, argv, message):
  with pytest.raises(SystemExit) as error:
    bench.main(["baseline", *argv])
  assert error.value.code == 2 and message in capsys.readouterr().err
