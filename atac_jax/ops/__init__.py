"""Pure JAX functions for the ATAC gate: reference, memory-lean and fused-BatchNorm forms.

>>> params = GateParams(Projection(kd), Affine(g1, b1), Projection(ku), Affine(g2, b2))
>>> y, batch = gate(x, params, epsilon=1e-5, inner_relu=True)          # training
>>> y = gate(x, params, running, epsilon=1e-5, inner_relu=True)        # inference

The Flax modules (:mod:`atac_jax.layers`, :mod:`atac_jax.nnx`) declare variables and call these.
Backend-specific choices live in :mod:`atac_jax.ops.policy`.
"""

from atac_jax.ops import batch_norm, lean, pallas_backward, policy, reference
from atac_jax.ops.gate import IMPLS, gate, module_impl, norm_gate, resolve_impl
from atac_jax.ops.types import Affine, GateParams, GateStats, Moments, Projection

__all__ = [
    "Affine", "GateParams", "GateStats", "IMPLS", "Moments", "Projection", "batch_norm", "gate",
    "lean", "module_impl", "norm_gate", "pallas_backward", "policy", "reference", "resolve_impl",
]
