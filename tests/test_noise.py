"""The Gaussian mechanism: noise at the right scale, fresh per key, reproducible per key."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_problem
from scipy import stats

from jaxdp.noise import add_gaussian_noise, privatize, sensitivity, standard_normal
from jaxdp.step import DPConfig, init_state, make_step


def test_noise_std_is_multiplier_times_clip():
  clip, sigma = 0.7, 1.3
  zeros = {"a": jnp.zeros((200, 50)), "b": jnp.zeros((1000,))}
  noised = privatize(
    zeros, jax.random.key(0), l2_norm_clip=clip, noise_multiplier=sigma, normalizer=1.0
  )
  x = np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(noised)])
  # KS test against N(0, (sigma C)^2) passes; against a scale 10% off it fails.
  assert stats.kstest(x, "norm", args=(0, sigma * clip)).pvalue > 1e-3
  assert stats.kstest(x, "norm", args=(0, 0.9 * sigma * clip)).pvalue < 1e-6
  assert abs(x.std() / (sigma * clip) - 1) < 0.02


def test_noise_is_fresh_per_key_and_reproducible():
  z = jnp.zeros((1000,))
  a = add_gaussian_noise(z, jax.random.key(1), 1.0)
  b = add_gaussian_noise(z, jax.random.key(1), 1.0)
  c = add_gaussian_noise(z, jax.random.key(2), 1.0)
  np.testing.assert_array_equal(a, b)
  assert abs(np.corrcoef(a, c)[0, 1]) < 0.1


def test_leaves_get_independent_noise():
  tree = {"a": jnp.zeros(2000), "b": jnp.zeros(2000)}
  out = add_gaussian_noise(tree, jax.random.key(3), 1.0)
  assert abs(np.corrcoef(out["a"], out["b"])[0, 1]) < 0.1


@pytest.mark.parametrize("shape", [(1,), (7,), (784, 256), (3, 5, 11), (2, 1, 4, 9)])
@pytest.mark.parametrize("seed", [0, 1, 2**31 + 5])
def test_standard_normal_is_jax_random_normal_bit_for_bit(shape, seed):
  """The fused Threefry gives JAX's own samples: the noise's distribution is JAX's."""
  key = jax.random.fold_in(jax.random.key(seed), 17)
  expected = jax.random.normal(key, shape, jnp.float32)
  np.testing.assert_array_equal(jax.jit(standard_normal, static_argnums=1)(key, shape), expected)
  np.testing.assert_array_equal(standard_normal(key, shape), expected)
  raw = jax.random.key_data(key)  # a legacy uint32 key gives the same samples
  np.testing.assert_array_equal(standard_normal(raw, shape), expected)


def test_standard_normal_other_key_kinds_use_jax():
  key = jax.random.key(4, impl="rbg")
  np.testing.assert_array_equal(standard_normal(key, (300,)), jax.random.normal(key, (300,)))
  key = jax.random.key(4)
  with jax.threefry_partitionable(False):
    np.testing.assert_array_equal(standard_normal(key, (300,)), jax.random.normal(key, (300,)))


def test_standard_normal_does_not_call_jax_threefry():
  """Under jit the samples come from the unrolled rounds, not JAX's (rolled on CPU) primitive."""
  key = jax.random.key(0)
  assert "random_bits" in str(jax.make_jaxpr(lambda k: jax.random.normal(k, (64,)))(key))
  assert "random_bits" not in str(jax.make_jaxpr(lambda k: standard_normal(k, (64,)))(key))


def test_per_layer_sensitivity():
  assert sensitivity({"a": 3.0, "b": 4.0}) == pytest.approx(5.0)
  assert sensitivity(2.0) == 2.0


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_step_noise_has_std_sigma_clip_over_batch(engine):
  """End to end: with every example masked out, the update is pure noise of std sigma*C/B."""
  loss_fn, params, batch = make_problem("mlp")
  clip, sigma, expected = 0.5, 2.0, 4.0
  step = make_step(
    loss_fn,
    optax.sgd(1.0),
    DPConfig(l2_norm_clip=clip, noise_multiplier=sigma, engine=engine),
    expected_batch_size=expected,
  )
  idx = jnp.arange(12, dtype=jnp.int32)
  mask = jnp.zeros(12, bool)
  deltas = []
  state = init_state(params, optax.sgd(1.0), jax.random.key(0))
  for _ in range(20):
    new, _ = step(state, batch, idx, mask)
    deltas.append(
      np.concatenate(
        [
          np.ravel(a - b)
          for a, b in zip(
            jax.tree_util.tree_leaves(new.params),
            jax.tree_util.tree_leaves(state.params),
            strict=True,
          )
        ]
      )
    )
    state = new._replace(params=state.params)
  x = np.concatenate(deltas)
  assert abs(x.std() / (sigma * clip / expected) - 1) < 0.02
  # consecutive steps draw different noise
  assert abs(np.corrcoef(deltas[0], deltas[1])[0, 1]) < 0.1
