"""atac_jax.ops.linear_map: a linear map with a custom transpose under every transformation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atac_jax.ops.linear_map import linear_map

CALLS = {"forward": 0, "transpose": 0}


def _forward(r, t):
  CALLS["forward"] += 1
  return {"out": t["a"] * jnp.cos(r) + 2.0 * t["b"]}


def _transpose(r, ct):
  CALLS["transpose"] += 1
  return {"a": ct["out"] * jnp.cos(r), "b": 2.0 * jnp.sum(ct["out"])}


@jax.custom_jvp
def f(x, b):
  """``sin(x) + 2 b``, whose tangent is a linear_map (so its VJP runs ``_transpose``)."""
  return jnp.sin(x) + 2.0 * b


@f.defjvp
def _f_jvp(primals, tangents):
  x, b = primals
  tx, tb = tangents
  return f(x, b), linear_map(_forward, _transpose, x, {"a": tx, "b": tb})["out"]


def reference(x, b):
  return jnp.sin(x) + 2.0 * b


X = jnp.array([0.0, 0.5, 1.0, 2.0])
B = jnp.array(0.3)
loss = lambda fn: (lambda x, b: jnp.sum(fn(x, b) ** 2))


@pytest.mark.parametrize("transform", [
    lambda fn: jax.grad(loss(fn), (0, 1))(X, B),
    lambda fn: jax.jit(jax.grad(loss(fn), (0, 1)))(X, B),
    lambda fn: jax.jvp(fn, (X, B), (jnp.ones(4), jnp.array(1.0))),
    lambda fn: jax.linearize(fn, X, B)[1](jnp.ones(4), jnp.array(0.5)),
    lambda fn: jax.jacfwd(fn)(X, B),
    lambda fn: jax.jacrev(fn)(X, B),
    lambda fn: jax.hessian(loss(fn))(X, B),
    lambda fn: jax.jvp(jax.grad(loss(fn)), (X, B), (jnp.ones(4), jnp.array(1.0))),
    lambda fn: jax.vmap(jax.grad(loss(fn)), (0, None))(jnp.stack([X, X + 1]), B),
    lambda fn: jax.grad(lambda x, b: jnp.sum(jax.vmap(fn, (0, None))(x, b) ** 2))(
        jnp.stack([X, X + 1]), B),
    lambda fn: jax.vmap(lambda x: jax.jvp(fn, (x, B), (jnp.ones(4), jnp.array(0.0)))[1])(
        jnp.stack([X, 2 * X])),
], ids=["grad", "jit-grad", "jvp", "linearize", "jacfwd", "jacrev", "hessian", "jvp-of-grad",
        "vmap-of-grad", "grad-of-vmap", "vmap-of-jvp"])
def test_every_transformation_matches_plain_autodiff(transform):
  got, want = transform(f), transform(reference)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6), got, want)


def test_reverse_mode_runs_the_given_transpose():
  CALLS.update(forward=0, transpose=0)
  jax.grad(loss(f))(X, B)
  assert CALLS["transpose"] >= 1
  transposes = CALLS["transpose"]
  jax.jvp(f, (X, B), (jnp.ones(4), jnp.array(1.0)))
  assert CALLS["transpose"] == transposes and CALLS["forward"] >= 1


def test_not_linear_in_residuals_is_an_error():
  with pytest.raises(ValueError, match="not linear in its residuals"):
    jax.linear_transpose(lambda r: linear_map(_forward, _transpose, r, {"a": X, "b": B})["out"],
                         X)(X)
