"""Pure JAX functions for the ATAC gate: reference, memory-lean and fused-BatchNorm forms.

>>> params = GateParams(Projection(kd), Affine(g1, b1), Projection(ku), Affine(g2, b2))
>>> y, batch = gate(x, params, epsilon=1e-5, inner_relu=True)          # training
>>> y = gate(x, params, running, epsilon=1e-5, inner_relu=True)        # inference

The Flax modules (:mod:`atac_jax.layers`, :mod:`atac_jax.nnx`) declare variables and call these.
Which backward pass runs is :func:`atac_jax.ops.dispatch.choose` (one decision table);
backend-specific choices live in :mod:`atac_jax.ops.policy`.
"""

from atac_jax.ops import (batch_norm, dispatch, lean, pallas_backward, pallas_gpu, pallas_rows,
                          pallas_tpu, policy, reference)
from atac_jax.ops.dispatch import Backward, Choice, Request, choose
from atac_jax.ops.gate import IMPLS, gate, norm_gate
from atac_jax.ops.types import Affine, GateParams, GateStats, Moments, Projection

__all__ = [
    "Affine", "Backward", "Choice", "GateParams", "GateStats", "IMPLS", "Moments", "Projection",
    "Request", "batch_norm", "choose", "dispatch", "gate", "lean", "norm_gate", "pallas_backward",
    "pallas_gpu", "pallas_rows", "pallas_tpu", "policy", "reference",
]
