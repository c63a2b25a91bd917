"""ScatterNet features: fixed filters, the right shape, and the invariances they promise."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdp.models.scatternet import (
  ScatterCNN,
  group_normalize,
  lowpass_matrix,
  scattering,
  scattering_filters,
)

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


@pytest.mark.parametrize("res", [0, 1, 2])
def test_separable_lowpass_is_the_fourier_lowpass(res):
  # M u M^T equals filtering by phi's 2-D spectrum, alias-summing to 2^J and cropping.
  size, J, lo, n = 44, 2, 2, 7
  _, phi = scattering_filters(size, J, 8)
  k, s = 2**res, 2 ** (J - res)
  alias = lambda f, m: f.reshape(m, f.shape[0] // m, m, f.shape[1] // m).mean(axis=(0, 2))
  u = np.random.default_rng(res).normal(size=(size // k, size // k))
  ref = np.real(np.fft.ifft2(alias(np.fft.fft2(u) * alias(phi.astype(np.complex128), k), s)))
  m = lowpass_matrix(size, J, res, lo, n)
  np.testing.assert_allclose(m @ u @ m.T, ref[lo : lo + n, lo : lo + n], atol=1e-6)


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


def test_scatter_cnn_norm_is_flax_groupnorm():
  # group_normalize + Affine is GroupNorm: same function of the same parameters.
  import flax.linen as nn

  x = jax.random.normal(jax.random.key(0), (5, 7, 7, 81)) * 3.0 + 1.0
  scale = jax.random.normal(jax.random.key(1), (81,))
  bias = jax.random.normal(jax.random.key(2), (81,))
  want = nn.GroupNorm(num_groups=27).apply({"params": {"scale": scale, "bias": bias}}, x)
  got = group_normalize(x, 27) * scale + bias
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
  one = group_normalize(x[:1], 27)  # per example
  np.testing.assert_allclose(group_normalize(x, 27)[:1], one, atol=1e-6)
  params = ScatterCNN(affine=True).init(jax.random.key(0), x[:1])["params"]
  assert set(params["Affine_0"]) == {"scale", "bias"} and params["Affine_0"]["scale"].shape == (81,)
  # The default is the authors' GroupNorm(affine=False): the first parameters are the conv's.
  assert set(ScatterCNN().init(jax.random.key(0), x[:1])["params"]) == {
    "Conv_0",
    "Conv_1",
    "Dense_0",
    "Dense_1",
  }
  with pytest.raises(ValueError, match="groups"):
    group_normalize(x, 4)


def test_dataset_features_in_padded_chunks_equal_the_whole_batch():
  from jaxdp.models.scatternet import scattering_dataset

  x = np.asarray(jax.random.uniform(jax.random.key(3), (7, 28, 28, 1)))
  np.testing.assert_allclose(scattering_dataset(x, chunk=3), scattering(x), atol=1e-5)
