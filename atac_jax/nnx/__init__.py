"""Flax NNX API: the ATAC units (and the model registry) as ``nnx.Module`` subclasses.

>>> from flax import nnx
>>> import atac_jax.nnx as anx
>>> unit = anx.ATAC(16, reduction=2, rngs=nnx.Rngs(0))   # training mode, as nnx.BatchNorm
>>> y = unit(x); unit.eval(); y = unit(x)                 # running statistics after eval()
>>> anx.from_linen(unit, linen_variables); variables = anx.to_linen(unit)

Native modules (:class:`ATAC`, :class:`AReLU`, :class:`PReLU`) call :mod:`atac_jax.ops` like
the linen units. :class:`LinenModule` runs a linen module with NNX-owned variables;
:func:`SE`, :func:`XUnit`, :func:`AWConv` and the host networks of :mod:`atac_jax.nnx.models`
are such wrappers.
"""

from atac_jax.nnx import models
from atac_jax.nnx.activations import AReLU, PReLU, available_activations, get_activation
from atac_jax.nnx.atac import ATAC
from atac_jax.nnx.convert import from_linen, to_linen
from atac_jax.nnx.wrapped import SE, AWConv, XUnit
from atac_jax.nnx.wrapper import LinenModule

__all__ = [
    "ATAC", "AReLU", "AWConv", "LinenModule", "PReLU", "SE", "XUnit", "available_activations",
    "from_linen", "get_activation", "models", "to_linen",
]
