"""atac_train.kernel_check (``atac-bench kernels``): passes where the kernels agree with the XLA
backward (here: Pallas' interpreter on the CPU), fails with exit 1 where they do not."""

import json
import os

import jax
import pytest

from atac_jax.ops import pallas_backward
from atac_train import bench, kernel_check

SMALL = ((4, 16, 8), (2, 32, 16))  # (positions per side, channels, bottleneck)


@pytest.fixture(autouse=True)
def _small_units_and_flags(monkeypatch):
  """A quick pair of units instead of ResNet-20's; bench.main's XLA_FLAGS undone afterwards."""
  monkeypatch.setattr(kernel_check, "RESNET20_UNITS", SMALL)
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))


def test_kernels_agree_with_the_xla_backward(capsys):
  bench.main(["kernels", "--batch", "8"])
  (record,) = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
  assert record["ok"] and record["backend"] == jax.default_backend()
  assert [u["shape"] for u in record["units"]] == [[8, 4, 4, 16], [8, 2, 2, 32]]
  for unit in record["units"]:
    assert unit["kernels"] == "yes" and unit["ok"]
    assert 0 <= unit["max_rel_diff"] < 1e-4  # float32 rounding, two summation orders


def test_a_wrong_kernel_result_fails_with_exit_1(capsys, monkeypatch):
  """A kernel whose input gradient is 1% off is caught, named, and exits 1."""
  real = pallas_backward.backward

  def off_by_one_percent(*args, **kwargs):
    dx, dparams, daffine = real(*args, **kwargs)
    return 1.01 * dx, dparams, daffine

  monkeypatch.setattr(pallas_backward, "backward", off_by_one_percent)
  with pytest.raises(SystemExit) as error:
    bench.main(["kernels", "--batch", "8"])
  assert error.value.code == 1
  captured = capsys.readouterr()
  record = json.loads(captured.out.strip())
  assert not record["ok"] and all(not u["ok"] for u in record["units"])
  assert min(u["max_rel_diff"] for u in record["units"]) > 5e-3
  assert "backward_kernel='xla'" in captured.err and "[8, 4, 4, 16]" in captured.err


def test_a_unit_the_kernels_do_not_take_is_reported():
  """Odd channel counts fall back to the XLA backward: the record says why (and agrees)."""
  record = kernel_check.check_unit(batch=4, side=2, channels=12, bottleneck=6)
  assert record["kernels"].startswith("no: ") and "multiples of 8" in record["kernels"]
  assert record["ok"] and record["max_rel_diff"] == 0


@pytest.mark.parametrize("argv,message", [(["--batch", "0"], "--batch"),
                                          (["--tolerance", "0"], "--tolerance")])
def test_bad_options_are_clear_errors(capsys, argv, message):
  with pytest.raises(SystemExit) as error:
    bench.main(["kernels", *argv])
  assert error.value.code == 2 and message in capsys.readouterr().err


def test_gpu_kernels_are_checked_at_the_tf32_tolerance():
  """On a GPU the check asks the Triton kernels whether they apply and allows TF32's error."""
  from atac_jax import ops  # pylint: disable=g-import-not-at-top
  assert kernel_check.default_tolerance() == 1e-3
  with ops.policy.lowering_platform("gpu"):
    assert kernel_check.default_tolerance() == 1e-2
    assert ops.dispatch.kernels_for(ops.policy.platform()) is ops.pallas_gpu
