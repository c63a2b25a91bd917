"""ScatterNet features: fixed filters, the right shape, and the invariances they promise."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdp.models.scatternet import ScatterCNN, scattering, scattering_filters

pytestmark = pytest.mark.slow  # the ScatterNet features' numerics (not a privacy property)


def test_shape_and_channel_count():
  x = jax.random.uniform(jax.random.key(0), (3, 28, 28, 1))
  out = scattering(x)
  assert out.shape == (3, 7, 7, 81)
  assert out.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(out)))
  assert scattering(jax.random.uniform(jax.random.key(0), (2, 16, 16, 1)), J=1, L=4).shape == (
    2,
    8,
    8,
    1 + 4,
  )


def test_filters_depend_only_on_hyperparameters():
  a = scattering_filters(44, 2, 8)
  b = scattering_filters(44, 2, 8)
  assert a[0] is b[0]  # cached: no data can reach them
  psi, phi = a
  # Wavelets have zero mean (no DC), the low-pass has unit mean.
  np.testing.assert_allclose(np.abs(psi[:, 0, 0]), 0.0, atol=1e-5)
  np.testing.assert_allclose(np.real(phi[0, 0]), 1.0, atol=1e-5)


def test_features_are_per_example():
  x = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1))
  together = scattering(x)
  alone = jnp.concatenate([scattering(x[i : i + 1]) for i in range(4)])
  np.testing.assert_allclose(together, alone, atol=1e-5)


def test_small_shift_changes_features_little():
  x = jnp.zeros((1, 28, 28, 1)).at[0, 10:18, 12:16, 0].set(1.0)
  shifted = jnp.roll(x, 1, axis=2)
  a, b = scattering(x), scattering(shifted)
  rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))
  pixel_rel = float(jnp.linalg.norm(x - shifted) / jnp.linalg.norm(x))
  assert rel < 0.5 * pixel_rel


def test_bad_input_shape():
  with pytest.raises(ValueError, match="images"):
    scattering(jnp.zeros((1, 30, 30, 1)))


def test_scatter_cnn_runs():
  m = ScatterCNN()
  p = m.init(jax.random.key(0), jnp.zeros((1, 7, 7, 81)))
  assert m.apply(p, jnp.zeros((2, 7, 7, 81))).shape == (2, 10)
