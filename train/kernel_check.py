"""``atac-bench kernels``: the Pallas backward against the XLA backward on this machine's device.

The kernels are the default training backward on TPU (:mod:`atac_jax.ops.pallas_backward`,
Mosaic) and on NVIDIA GPUs (:mod:`atac_jax.ops.pallas_gpu`, Triton). They are checked in Pallas'
interpreter on the CPU and compiled ahead of time in the tests; this check runs them on the
device JAX uses here and compares their gradients with the XLA backward's, unit by unit, at
ResNet-20's widths, the XLA backward at float32 ``HIGHEST`` matmul precision (the TPU kernels'
own; the GPU kernels multiply in TF32, hence the GPU's looser default tolerance).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from atac_jax import ops
from atac_jax.ops import Affine, GateParams, Projection, dispatch, policy

# (positions per side, channels, bottleneck): the ResNet-20 units' inputs at each stage.
RESNET20_UNITS: tuple[tuple[int, int, int], ...] = ((32, 16, 8), (16, 32, 16), (8, 64, 32))
EPSILON = 1e-5


def _inputs(key, batch: int, side: int, c: int, k: int):
  keys = jax.random.split(key, 10)
  n = lambda i, shape, scale: scale * jax.random.normal(keys[i], shape, jnp.float32)
  params = GateParams(Projection(n(0, (c, k), c ** -0.5), None),
                      Affine(1 + n(1, (k,), 0.1), n(2, (k,), 0.1)),
                      Projection(n(3, (k, c), k ** -0.5), None),
                      Affine(1 + n(4, (c,), 0.1), n(5, (c,), 0.1)))
  affine = Affine(1 + n(6, (c,), 0.1), n(7, (c,), 0.1))
  x = 2 * n(8, (batch, side, side, c), 1.0) + 0.5
  weights = n(9, x.shape, 1.0)
  return x, affine, params, weights


def _grads(impl: str, x, affine, params, weights):
  def loss(x, affine, params):
    y, _, _ = ops.norm_gate(x, affine, params, norm_epsilon=EPSILON, epsilon=EPSILON,
                            inner_relu=True, dtype=jnp.float32, impl=impl)
    return jnp.sum(y * weights)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, affine, params)


def check_unit(*, batch: int, side: int, channels: int, bottleneck: int, seed: int = 0,
               tolerance: float = 1e-3) -> dict[str, Any]:
  """Gradients of one fused BatchNorm + gate unit (training mode) through the kernels and
  through the XLA backward.

  Returns:
    A record: the shape, whether the kernels apply (``kernels``: else the reason), the largest
    difference of any gradient relative to that gradient's largest magnitude (``max_rel_diff``)
    and ``ok`` (at most ``tolerance``).
  """
  x, affine, params, weights = _inputs(jax.random.PRNGKey(seed), batch, side, channels,
                                       bottleneck)
  reason = dispatch.kernels_for(policy.platform()).supported(x, params, inner_relu=True)
  # The kernels' products are float32 at HIGHEST precision; XLA:TPU's default would round the
  # XLA backward's operands to bfloat16 (differences of ~1e-2), so both run at HIGHEST.
  with jax.default_matmul_precision("highest"):
    want = _grads("lean", x, affine, params, weights)
    got = _grads("pallas", x, affine, params, weights)
  worst = 0.0
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    scale = max(float(np.max(np.abs(w))), 1e-30)
    worst = max(worst, float(np.max(np.abs(g - w))) / scale)
  return {"shape": [batch, side, side, channels], "bottleneck": bottleneck,
          "kernels": "yes" if reason is None else f"no: {reason}",
          "max_rel_diff": worst, "ok": bool(np.isfinite(worst) and worst <= tolerance)}


def default_tolerance() -> float:
  """1e-2 where the kernels are the GPU's (TF32 products), else 1e-3."""
  return 1e-2 if policy.platform() == "gpu" else 1e-3


def check(*, batch: int = 32, units: Sequence[tuple[int, int, int]] | None = None,
          seed: int = 0, tolerance: float | None = None) -> dict[str, Any]:
  """:func:`check_unit` for each ``(side, channels, bottleneck)`` in ``units`` (default:
  :data:`RESNET20_UNITS`); ``tolerance`` None is :func:`default_tolerance`.

  Returns:
    ``{'backend', 'device_kind', 'batch', 'tolerance', 'units': [...], 'ok'}``.

  Raises:
    ValueError: for a batch below 1 or a tolerance that is not positive.
  """
  if batch < 1:
    raise ValueError(f"--batch must be at least 1, got {batch}.")
  tolerance = default_tolerance() if tolerance is None else tolerance
  if not tolerance > 0:
    raise ValueError(f"--tolerance must be positive, got {tolerance}.")
  records = [check_unit(batch=batch, side=side, channels=c, bottleneck=k, seed=seed,
                        tolerance=tolerance)
             for side, c, k in (RESNET20_UNITS if units is None else units)]
  return {"check": "pallas_backward_vs_xla", "backend": jax.default_backend(),
          "device_kind": jax.devices()[0].device_kind, "batch": batch, "tolerance": tolerance,
          "units": records, "ok": all(r["ok"] for r in records)}
