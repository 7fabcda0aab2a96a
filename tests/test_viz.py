"""atac-viz: exact gates from a trained workdir, eval-identical inputs, the PNG, clear errors."""

import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from atac_jax import checkpoint
from atac_jax.layers import ATAC, SE, XUnit, get_activation
from atac_train import data, trainer, viz
from atac_train.data.device import DeviceTransform
from conftest import check_png, small_quickstart_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# gates.py reads the introspection contract: every gate unit sows intermediates/.../gate.


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """One tiny trained run: ATAC cifar_resnet8 (act_layers=4), one epoch of the digits.

  Trained on one device: compiling for the 8 fake devices doubles the time on 2 CPU cores, and
  the sharded paths are tested in test_trainer.py.
  """
  config = small_quickstart_config(num_epochs=1)
  path = str(tmp_path_factory.mktemp("viz") / "atac")
  trainer.train_and_evaluate(config, path, devices=jax.devices()[:1])
  return path


@pytest.fixture(scope="module")
def loaded(workdir):
  return checkpoint.load(workdir)


def _atac_units(params, path=()):
  """Module paths of the ATAC units, found from the parameter tree alone."""
  if set(params) >= {"conv_down", "bn_down", "conv_up", "bn_up"}:
    return {"/".join(path)}
  return set().union(*(_atac_units(v, path + (k,)) for k, v in params.items()
                       if isinstance(v, dict)))


def _subtree(tree, path):
  for name in path.split("/"):
    tree = tree[name]
  return tree


def _unit_calls(model, variables, image, unit_types):
  """Input and output of every unit call, recorded with a method interceptor (no viz code)."""
  calls = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, unit_types) and context.method_name == "__call__":
      calls["/".join(context.module.path)] = (np.asarray(args[0][0]), np.asarray(out[0]))
    return out
  with nn.intercept_methods(record):
    model.apply(jax.device_get(variables), image[None], train=False)
  return calls


def _expected_size(num_panels, dpi=100, **kwargs):
  width, height = viz.gate_figure_size(num_panels, **kwargs)
  return round(width * dpi), round(height * dpi)


def test_one_gate_per_atac_unit_strictly_inside_0_1(loaded):
  model, variables, config = loaded
  example = viz.load_example(config, 0)
  gates = viz.gate_maps(model, variables, example.image)
  units = _atac_units(jax.device_get(variables["params"]))
  # cifar_resnet8, act_layers=4: act1 and act2 of each of the 3 blocks, plus the head.
  assert len(units) == 7
  assert set(gates) == units
  for path, gate in gates.items():
    channels = _subtree(variables["params"], path)["conv_up"]["kernel"].shape[-1]
    assert gate.ndim == 3 and gate.shape[-1] == channels
    assert 0.0 < gate.min() and gate.max() < 1.0
  # Forward order: stage 1 first, the head unit last.
  assert list(gates)[0] == "stage1_block1/act1" and list(gates)[-1] == "act_out"


def test_gate_is_unit_output_over_input(loaded):
  """Independent check: re-apply each trained ATAC unit alone to its input; y / x == gate."""
  model, variables, config = loaded
  image = viz.load_example(config, 11).image
  gates = viz.gate_maps(model, variables, image)
  calls = _unit_calls(model, variables, image, ATAC)
  assert set(calls) == set(gates)
  host = jax.device_get(variables)
  unit = ATAC(reduction=config["model"]["options"]["reduction"])
  for path, (x, y_in_model) in calls.items():
    unit_variables = {"params": _subtree(host["params"], path),
                      "batch_stats": _subtree(host["batch_stats"], path)}
    y = np.asarray(unit.apply(unit_variables, x[None], train=False)[0])
    np.testing.assert_allclose(y, y_in_model, rtol=1e-5, atol=1e-6)
    mask = np.abs(x) > 1e-3
    assert mask.mean() > 0.5
    np.testing.assert_allclose(gates[path][mask], (y / np.where(mask, x, 1.0))[mask],
                               rtol=1e-4, atol=1e-5)


class _Host(nn.Module):
  """A small host network with two units of one kind, on 8 and 16 channels."""
  act: str

  @nn.compact
  def __call__(self, x, *, train):
    options = {"reduction": 4} if self.act in ("atac_global", "se") else {}
    x = nn.Conv(8, (3, 3))(x)
    x = get_activation(self.act, name="first", **options)(x, train=train)
    x = nn.Conv(16, (3, 3))(x)
    return get_activation(self.act, name="second", **options)(x, train=train)


def _init(model, image):
  return jax.jit(model.init, static_argnames="train")(jax.random.PRNGKey(1), image[None],
                                                      train=False)


@pytest.mark.parametrize("act", ["atac_global", "se", "xunit"])
def test_other_units_gate_their_input(act):
  """For global ATAC, SE and xUnit too, ``unit(x) == x * gate``, in forward order."""
  model = _Host(act)
  image = np.random.RandomState(0).randn(6, 6, 1).astype(np.float32)
  variables = _init(model, image)
  gates = viz.gate_maps(model, variables, image)
  calls = _unit_calls(model, variables, image, (ATAC, SE, XUnit))
  assert list(gates) == list(calls) == ["first", "second"]
  for path, (x, y) in calls.items():
    expected_shape = (6, 6, x.shape[-1]) if act == "xunit" else (1, 1, x.shape[-1])
    assert gates[path].shape == expected_shape
    np.testing.assert_allclose(x * gates[path], y, rtol=1e-5, atol=1e-6)


def test_arelu_slopes_and_panel(tmp_path):
  model = _Host("arelu")
  image = np.random.RandomState(0).randn(6, 6, 1).astype(np.float32)
  variables = _init(model, image)
  variables = {"params": {"first": {"alpha": np.array([1.5], np.float32),
                                    "beta": np.array([-1.0], np.float32)},
                          "second": {"alpha": np.array([0.3], np.float32),
                                     "beta": np.array([0.5], np.float32)},
                          **{k: v for k, v in variables["params"].items()
                             if k not in ("first", "second")}}}
  _, gates, slopes = viz.forward(model, variables, image)
  assert gates == {} and list(slopes) == ["first", "second"]
  # The reference's slopes: clamp(alpha, 0.01, 0.99) for x < 0, 1 + sigmoid(beta) for x >= 0.
  assert slopes["first"] == pytest.approx((0.99, 1 + 1 / (1 + np.exp(1.0))))
  assert slopes["second"] == pytest.approx((0.3, 1 + 1 / (1 + np.exp(-0.5))))
  out = str(tmp_path / "arelu.png")
  size = viz.draw_gate_grid(image + 0.5, gates, out, slopes=slopes)
  check_png(out, _expected_size(1, with_slopes=True))
  assert size == _expected_size(1, with_slopes=True)


class _SharedUnit(nn.Module):
  """One xUnit called twice: one gate per call."""

  @nn.compact
  def __call__(self, x, *, train):
    unit = get_activation("xunit", name="shared")
    return unit(nn.Conv(1, (3, 3))(unit(x, train=train)), train=train)


def test_unit_called_twice_gives_one_gate_per_call():
  image = np.random.RandomState(0).randn(6, 6, 1).astype(np.float32)
  model = _SharedUnit()
  variables = _init(model, image)
  gates = viz.gate_maps(model, variables, image)
  calls = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, XUnit) and context.method_name == "__call__":
      calls.append((np.asarray(args[0][0]), np.asarray(out[0])))
    return out
  with nn.intercept_methods(record):
    model.apply(variables, image[None], train=False)
  assert list(gates) == ["shared", "shared#2"] and len(calls) == 2
  for gate, (x, y) in zip(gates.values(), calls):
    np.testing.assert_allclose(x * gate, y, rtol=1e-5, atol=1e-6)


class _OwnGate(nn.Module):
  """A caller's own unit that keeps the contract (sows ``gate``): drawn like ours."""

  @nn.compact
  def __call__(self, x, *, train):
    del train
    gate = jax.nn.sigmoid(nn.Dense(x.shape[-1], name="scorer")(x))
    self.sow("intermediates", "gate", gate)
    return x * gate


class _OwnHost(nn.Module):
  @nn.compact
  def __call__(self, x, *, train):
    return _OwnGate(name="mine")(nn.Conv(3, (3, 3))(x), train=train)


def test_any_unit_keeping_the_contract_is_drawn():
  image = np.random.RandomState(0).randn(5, 5, 1).astype(np.float32)
  model = _OwnHost()
  variables = _init(model, image)
  gates = viz.gate_maps(model, variables, image)
  p = variables["params"]
  h = nn.Conv(3, (3, 3)).apply({"params": p["Conv_0"]}, image[None])[0]
  scores = np.asarray(h) @ np.asarray(p["mine"]["scorer"]["kernel"]) + np.asarray(
      p["mine"]["scorer"]["bias"])
  assert list(gates) == ["mine"]
  np.testing.assert_allclose(gates["mine"], 1 / (1 + np.exp(-scores)), rtol=1e-5, atol=1e-6)


def test_dataset_example_is_the_eval_input(loaded):
  _, _, config = loaded
  index = 37
  example = viz.load_example(config, index)
  dataset = ml_collections.ConfigDict(config["dataset"])
  batches = data.create_eval_iterable(dataset, global_batch_size=32)
  batch = next(b for k, b in enumerate(batches) if k == index // 32)
  normalize = DeviceTransform.from_info(data.get_info(dataset)).normalize  # eval images: uint8
  np.testing.assert_array_equal(example.image, normalize(batch["image"])[index % 32])
  assert example.label == batch["label"][index % 32]
  assert example.display.min() >= 0.0 and example.display.max() <= 1.0


def test_image_file_is_resized_and_normalised(loaded, tmp_path):
  _, _, config = loaded
  rgb = np.random.RandomState(0).randint(0, 256, (20, 24, 3), np.uint8)
  path = str(tmp_path / "digit.png")
  Image.fromarray(rgb).save(path)
  example = viz.load_image_file(config, path)
  gray = np.asarray(Image.fromarray(rgb).convert("L").resize((8, 8), Image.BILINEAR), np.float32)
  np.testing.assert_allclose(example.image[..., 0], (gray / 255.0 - 0.3053) / 0.3760, rtol=1e-5,
                             atol=1e-5)
  assert example.image.shape == (8, 8, 1) and example.label is None


def test_cli_draws_one_panel_per_unit(loaded, workdir, tmp_path, capsys):
  _, variables, _ = loaded
  num_units = len(_atac_units(jax.device_get(variables["params"])))
  out = str(tmp_path / "gates.png")
  assert viz.main(["--workdir", workdir, "--dataset-index", "3", "--out", out]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["units"] == num_units and result["act"] == "atac" and result["label"] is not None
  check_png(out, _expected_size(1 + num_units))
  assert result["size"] == list(_expected_size(1 + num_units))
  assert all(0.0 < v < 1.0 for v in result["mean_gate"].values())

  image = str(tmp_path / "in.png")
  Image.fromarray(np.full((16, 16), 200, np.uint8)).save(image)
  out2 = str(tmp_path / "gates_file.png")
  assert viz.main(["--workdir", workdir, "--image", image, "--reduce", "top-channel",
                   "--max-cols", "4", "--out", out2]) == 0
  assert json.loads(capsys.readouterr().out)["label"] is None
  check_png(out2, _expected_size(1 + num_units, max_cols=4))


def test_errors_are_clear(workdir, tmp_path, capsys):
  out = str(tmp_path / "x.png")
  empty = str(tmp_path / "empty_run")
  os.makedirs(empty)
  assert viz.main(["--workdir", empty, "--dataset-index", "0", "--out", out]) == 2
  err = capsys.readouterr().err
  assert "No checkpoint" in err and empty in err and "atac-train" in err

  assert viz.main(["--workdir", workdir, "--image", str(tmp_path / "missing.png"),
                   "--out", out]) == 2
  assert "missing.png" in capsys.readouterr().err

  assert viz.main(["--workdir", workdir, "--dataset-index", "360", "--out", out]) == 2
  assert "out of range" in capsys.readouterr().err  # 360 test digits: 0..359
  assert not os.path.exists(out)


def test_model_without_units_fails_clearly(workdir, tmp_path):
  """The same checkpoint declared as act=relu (its unit parameters go unused): nothing to draw.

  Run as a real process to check the exit status of the command.
  """
  relu = str(tmp_path / "relu")
  shutil.copytree(workdir, relu)
  step_dir = checkpoint.resolve_step_dir(relu)
  for path in (os.path.join(step_dir, "config", "metadata"), os.path.join(relu, "config.json")):
    if os.path.exists(path):
      with open(path) as f:
        config = json.load(f)
      config["model"]["act"] = "relu"
      with open(path, "w") as f:
        json.dump(config, f)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  result = subprocess.run([sys.executable, "-m", "atac_train.viz", "--workdir", relu,
                           "--dataset-index", "0", "--out", str(tmp_path / "r.png")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr
  assert "No attention units in this model (act=relu" in result.stderr
