"""Model building blocks: jaxdp's max pooling equals flax's, values and derivatives."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdp.models.classifier import max_pool

pytestmark = pytest.mark.slow  # the models' numerics (not a privacy property)


def _flax_pool(x, window, stride):
  pool = lambda y: nn.max_pool(y, (window, window), (stride, stride))
  return pool(x) if x.ndim == 4 else jax.vmap(pool)(x)


@pytest.mark.parametrize(
  "shape, window, stride",
  [((3, 9, 9, 4), 2, 1), ((2, 1, 10, 11, 3), 3, 2), ((2, 8, 8, 2), 2, 2), ((1, 14, 14, 16), 2, 1)],
)
def test_max_pool_equals_flax_with_ties(shape, window, stride):
  """Inputs rounded to halves and passed through a ReLU: most windows hold exact ties, so
  a derivative taken from any maximum other than flax's (the first, in row-major order) or
  split between them would differ by O(1)."""
  x = jax.nn.relu(jnp.round(jax.random.normal(jax.random.key(0), shape) * 2) / 2)
  want, want_vjp = jax.vjp(lambda y: _flax_pool(y, window, stride), x)
  got, got_vjp = jax.vjp(lambda y: max_pool(y, window, stride), x)
  np.testing.assert_array_equal(got, want)
  g = jax.random.normal(jax.random.key(1), want.shape)
  # Equal up to the order in which overlapping windows' contributions are added.
  np.testing.assert_allclose(got_vjp(g)[0], want_vjp(g)[0], atol=1e-6)
  # Forward mode too.
  t = jax.random.normal(jax.random.key(2), shape)
  _, got_t = jax.jvp(lambda y: max_pool(y, window, stride), (x,), (t,))
  _, want_t = jax.jvp(lambda y: _flax_pool(y, window, stride), (x,), (t,))
  np.testing.assert_array_equal(got_t, want_t)


def test_max_pool_under_jit_vmap_and_second_order():
  x = jax.random.normal(jax.random.key(3), (2, 6, 6, 3))
  f = lambda y: jnp.sum(max_pool(y, 2, 1) ** 2)
  flax_f = lambda y: jnp.sum(_flax_pool(y, 2, 1) ** 2)
  np.testing.assert_allclose(jax.jit(jax.grad(f))(x), jax.grad(flax_f)(x), atol=1e-6)
  per_example = jax.vmap(jax.grad(lambda y: f(y[None])))(x)
  np.testing.assert_allclose(per_example, jax.grad(f)(x), atol=1e-6)
  v = jax.random.normal(jax.random.key(4), x.shape)
  hvp = lambda fn: jax.jvp(jax.grad(fn), (x,), (v,))[1]
  np.testing.assert_allclose(hvp(f), hvp(flax_f), atol=1e-5)


def test_vae_softplus_equals_jax_softplus_and_its_gradient():
  from jaxdp.models.vae import softplus

  x = jnp.concatenate([jnp.linspace(-100.0, 100.0, 2001), jnp.array([-jnp.inf, jnp.inf, 0.0])])
  np.testing.assert_array_equal(softplus(x), jax.nn.softplus(x))  # the same formula
  grad = jax.vmap(jax.grad(softplus))(x[:-3])
  want = jax.vmap(jax.grad(jax.nn.softplus))(x[:-3])
  np.testing.assert_allclose(grad, want, rtol=1e-6, atol=1e-12)
  assert float(jax.grad(softplus)(0.0)) == 0.5
