"""atac-bench: the CLI prints valid JSON with the documented keys (tiny configs, no timing checks)."""

import json
import math
import os

import pytest

from atac_train import bench, cpu_defaults

TRAIN_KEYS = {"images_per_second", "step_seconds_median", "compile_seconds", "temp_bytes",
              "device_kind", "model", "act", "batch", "dtype", "steps"}


@pytest.fixture(autouse=True)
def _restore_xla_flags(monkeypatch):
  """bench.main applies the CPU defaults to XLA_FLAGS; undo that after each test."""
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))


def _run(capsys, *argv):
  bench.main(list(argv))
  lines = capsys.readouterr().out.strip().splitlines()
  return [json.loads(line) for line in lines]


def test_train_prints_one_json_line(capsys):
  (record,) = _run(capsys, "train", "--model", "convnet_mnist", "--act", "atac", "--batch", "8",
                   "--steps", "2")
  assert TRAIN_KEYS <= set(record), TRAIN_KEYS - set(record)
  assert record["model"] == "convnet_mnist" and record["act"] == "atac"
  assert record["batch"] == 8 and record["dtype"] == "float32" and record["steps"] == 2
  assert record["images_per_second"] > 0 and record["temp_bytes"] > 0
  assert record["device_kind"]


def test_compare_alternates_and_prints_ratios(capsys, tmp_path):
  out = tmp_path / "results.jsonl"
  (record,) = _run(capsys, "train", "--model", "convnet_mnist", "--act", "atac", "--batch", "8",
                   "--steps", "1", "--rounds", "2", "--compare", "relu", "--reduction", "2",
                   "--out", str(out))
  assert record["a"]["act"] == "atac" and record["b"]["act"] == "relu"
  assert record["a"]["reduction"] == 2 and "reduction" not in record["b"]
  assert record["a"]["steps"] == record["b"]["steps"] == 2
  for key in ("time_ratio", "temp_bytes_ratio", "images_per_second_a", "images_per_second_b"):
    assert record[key] > 0, key
  assert record["temp_bytes_ratio"] == pytest.approx(record["a"]["temp_bytes"]
                                                     / record["b"]["temp_bytes"])
  assert len(record["time_ratio_per_round"]) == 2
  # The bootstrap median of two values is one of them or their mean: the interval spans both.
  assert record["time_ratio_ci95"] == pytest.approx(sorted(record["time_ratio_per_round"]))
  assert json.loads(out.read_text()) == record


@pytest.mark.parametrize("n, low_rank, high_rank", [(7, 2, 6), (11, 3, 9)])
def test_median_interval_matches_the_exact_bootstrap_distribution(n, low_rank, high_rank):
  """For n distinct values the bootstrap median is <= the k-th smallest when at least
  (n + 1) / 2 of n draws are: a binomial tail with p = k / n. The interval's ends are the
  values at which that CDF first reaches 2.5% and 97.5% (ranks chosen far from both)."""
  values = [1.0 + 0.01 * i * i for i in range(n)]
  cdf = [sum(math.comb(n, j) * (k / n) ** j * (1 - k / n) ** (n - j)
             for j in range((n + 1) // 2, n + 1)) for k in range(1, n + 1)]
  exact = [next(k for k in range(1, n + 1) if cdf[k - 1] >= q) for q in (0.025, 0.975)]
  assert exact == [low_rank, high_rank]
  shuffled = values[::2] + values[1::2]
  assert bench.median_interval(shuffled) == pytest.approx(
      [values[low_rank - 1], values[high_rank - 1]])


def test_median_interval_edge_cases():
  assert bench.median_interval([1.2]) is None and bench.median_interval([]) is None
  assert bench.median_interval([1.2, 1.2, 1.2]) == pytest.approx([1.2, 1.2])


def test_activation_options_reach_the_model_config():
  args = bench._parser().parse_args(
      ["train", "--act", "atac", "--act-layers", "1", "--act-option", "memory_lean=false",
       "--act-option", "inner_relu=false", "--compare", "relu", "--dtype", "bf16"])
  config = bench.config_from_args(args, args.act, bench.act_options(args))
  assert dict(config.model.options.act_options) == {"memory_lean": False, "inner_relu": False}
  assert config.model.options.act_layers == 1 and config.half_precision
  assert config.dataset.source == "synthetic" and config.global_batch_size == 128
  relu = bench.config_from_args(args, "relu", {})
  assert "act_options" not in relu.model.options and "reduction" not in relu.model.options


def test_data_wraps_the_input_benchmark(capsys):
  (record,) = _run(capsys, "data", "--kind", "cifar", "--workers", "0", "--num-batches", "2",
                   "--batch", "8")
  assert record["kind"] == "cifar" and record["num_workers"] == 0 and record["batch_size"] == 8
  assert record["images_per_second"] > 0


def test_step_with_input(capsys):
  (record,) = _run(capsys, "step-with-input", "--model", "convnet_mnist", "--batch", "8",
                   "--steps", "2")
  assert record["augment"] == "cifar" and record["model"] == "convnet_mnist"
  for key in ("step_seconds_device_batch", "step_seconds_with_input", "input_seconds_per_batch",
              "images_per_second_with_input", "images_per_second_device_batch"):
    assert record[key] > 0, key
  assert 0.0 <= record["input_wait_fraction"] < 1.0


def test_bad_options_are_clear_errors(capsys):
  with pytest.raises(SystemExit) as error:
    bench.main(["train", "--model", "no_such_model", "--batch", "8", "--steps", "1"])
  assert error.value.code == 2
  assert "no_such_model" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    bench.main(["train", "--dtype", "float16"])


def test_cpu_defaults_respect_the_users_flags(monkeypatch):
  name = cpu_defaults.CPU_FLAGS[0].split("=")[0] if cpu_defaults.CPU_FLAGS else "--xla_cpu_foo"
  flags = cpu_defaults.CPU_FLAGS or (f"{name}=1",)
  monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=2 {name}=custom")
  assert cpu_defaults.apply(flags) == []
  assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {name}=custom"

  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  assert cpu_defaults.apply(flags) == list(flags)
  assert os.environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2", *flags]
  assert cpu_defaults.apply(flags) == []  # idempotent

  monkeypatch.delenv("XLA_FLAGS")
  cpu_defaults.apply(flags)
  assert os.environ["XLA_FLAGS"].split() == list(flags)


def test_cpu_defaults_match_flag_names_exactly(monkeypatch):
  """A user flag that merely starts with the same text does not hide a default."""
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_some_flag_extended=1")
  assert cpu_defaults.apply(("--xla_cpu_some_flag=0",)) == ["--xla_cpu_some_flag=0"]


def test_cpu_defaults_can_be_switched_off(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv(cpu_defaults.DISABLE_ENV, "0")
  assert cpu_defaults.apply(("--xla_cpu_some_flag=0",)) == []
  assert os.environ["XLA_FLAGS"] == ""


def test_steps_zero_compiles_only(capsys):
  """For models too big to run here: compile, report memory, time nothing."""
  (record,) = _run(capsys, "train", "--model", "convnet_mnist", "--act", "relu", "--batch", "8",
                   "--steps", "0")
  assert record["steps"] == 0 and record["images_per_second"] is None
  assert record["temp_bytes"] > 0 and record["compile_seconds"] > 0


def test_cpu_defaults_skip_an_older_jaxlib(monkeypatch):
  """XLA aborts on unknown flags: none are added for a jaxlib the flags were not measured on."""
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setattr(cpu_defaults, "jaxlib_version", lambda: (0, 7, 2))
  assert cpu_defaults.apply() == []
  monkeypatch.setattr(cpu_defaults, "jaxlib_version", lambda: (0, 10, 2))
  assert cpu_defaults.apply() == list(cpu_defaults.CPU_FLAGS)
