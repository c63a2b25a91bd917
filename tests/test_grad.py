"""private_grad and PrivacyPlan: the gradient is the step's (one path), its noise has the
claimed spread and is drawn once, each example's share is bounded by the clip, and the plan
accounts exactly what it samples and noises."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_problem

import jaxdp
from jaxdp import accounting
from jaxdp.grad import PrivacyPlan, private_grad
from jaxdp.step import DPConfig, init_state, make_step

MASK = np.array([True] * 9 + [False] * 3)


@pytest.mark.parametrize("model", ["cnn", "nnx"])
@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_private_grad_is_the_steps_gradient(model, engine):
  loss_fn, params, batch = make_problem(model)
  key = jax.random.key(7)
  grad_fn = private_grad(loss_fn, l2_norm_clip=0.5, noise_multiplier=1.3,
                         expected_batch_size=10.0, engine=engine)  # fmt: skip
  grads, info = jax.jit(grad_fn)(params, batch, MASK, key)
  opt = optax.sgd(1.0)  # params' = params - g
  step = make_step(loss_fn, opt, DPConfig(l2_norm_clip=0.5, noise_multiplier=1.3, engine=engine),
                   expected_batch_size=10.0, microbatch_size=None)  # fmt: skip
  state, metrics = step(init_state(params, opt, key), batch, np.arange(12), MASK)
  diff = jax.tree.map(lambda p, q, g: float(jnp.max(jnp.abs(p - q - g))), params, state.params,
                      grads)  # fmt: skip
  assert max(jax.tree.leaves(diff)) < 1e-5
  assert info["batch_size"] == 9 and float(info["loss"]) == pytest.approx(float(metrics["loss"]))
  np.testing.assert_allclose(info["grad_norms"], metrics["grad_norms"], rtol=1e-6)


def test_private_grad_noise_is_drawn_once_with_the_claimed_spread():
  loss_fn, params, batch = make_problem("mlp")
  grad_fn = jax.jit(private_grad(loss_fn, l2_norm_clip=2.0, noise_multiplier=1.5,
                                 expected_batch_size=8.0))  # fmt: skip
  # Every row padding: the gradient is the noise alone, N(0, (sigma C / B)^2) per coordinate.
  grads, _ = grad_fn(params, batch, np.zeros(12, bool), jax.random.key(1))
  flat = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])
  assert flat.size > 2000
  assert np.std(flat) == pytest.approx(1.5 * 2.0 / 8.0, rel=0.05)
  # A fresh key gives fresh noise; the same key the same gradient.
  again, _ = grad_fn(params, batch, np.zeros(12, bool), jax.random.key(1))
  other, _ = grad_fn(params, batch, np.zeros(12, bool), jax.random.key(2))
  same = lambda x, y: [bool(jnp.array_equal(a, b)) for a, b in zip(x, y, strict=True)]
  assert all(same(jax.tree.leaves(grads), jax.tree.leaves(again)))
  assert not any(same(jax.tree.leaves(grads), jax.tree.leaves(other)))


def test_private_grad_bounds_each_examples_share():
  loss_fn, params, batch = make_problem("nnx")
  grad_fn = jax.jit(private_grad(loss_fn, l2_norm_clip=0.1, noise_multiplier=0.0,
                                 expected_batch_size=1.0))  # fmt: skip
  for i in range(12):  # one real row: the gradient is its clipped gradient
    one = np.arange(12) == i
    grads, info = grad_fn(params, batch, one, jax.random.key(i))
    norm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads))))
    assert norm <= 0.1 * (1 + 1e-5)
    assert norm == pytest.approx(min(0.1, float(info["grad_norms"][i])), rel=1e-4)


def test_privacy_plan_accounts_what_it_samples_and_noises():
  plan = PrivacyPlan.calibrate(num_examples=60_000, expected_batch_size=256, epochs=3,
                               target_epsilon=3.0, l2_norm_clip=1.0)  # fmt: skip
  assert plan.steps == 704 and plan.sampling_prob == 256 / 60_000
  want = accounting.epsilon(accounting.dpsgd_event(256 / 60_000, plan.noise_multiplier, 704),
                            1e-5, "pld")  # fmt: skip
  assert plan.epsilon() == want and 2.97 <= want <= 3.0
  assert plan.epsilon(100) < plan.epsilon()
  sampler = plan.sampler(seed=0)
  assert sampler.sampling_prob == plan.sampling_prob
  grad_fn = plan.private_grad(lambda p, ex, rng: jnp.sum(p * ex))
  assert grad_fn.privacy == plan.config()
  assert (
    grad_fn.expected_batch_size == 256 and plan.config().noise_multiplier == plan.noise_multiplier
  )
  with pytest.raises(ValueError, match="exactly one of epochs and steps"):
    PrivacyPlan.calibrate(num_examples=100, expected_batch_size=10, target_epsilon=1.0,
                          l2_norm_clip=1.0)  # fmt: skip
  with pytest.raises(ValueError, match="expected_batch_size must be <= num_examples"):
    PrivacyPlan(num_examples=10, expected_batch_size=20, noise_multiplier=1.0,
                l2_norm_clip=1.0, steps=5)  # fmt: skip


def test_private_grad_rejects_bad_settings_in_one_line():
  loss = lambda p, ex, rng: jnp.sum(p * ex)
  with pytest.raises(ValueError, match="l2_norm_clip"):
    private_grad(loss, l2_norm_clip=0.0, noise_multiplier=1.0, expected_batch_size=8)
  with pytest.raises(ValueError, match="expected_batch_size"):
    private_grad(loss, l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=0)
  assert jaxdp.private_grad is private_grad


def test_fast_engine_says_once_which_parameters_take_vmap():
  def loss(p, ex, rng):  # a plain function: no layer to record
    return jnp.sum(jnp.tanh(ex["x"] @ p["w"]))

  grad_fn = private_grad(loss, l2_norm_clip=1.0, noise_multiplier=0.0, expected_batch_size=4,
                         engine="fast")  # fmt: skip
  data = {"x": jnp.ones((4, 3))}
  params = {"w": jnp.ones((3, 2)) * 0.37}  # shapes of their own: the note is new here
  with pytest.warns(UserWarning, match=r"1 of 1 parameter arrays .*\['w'\].*vmap"):
    fast_grads, _ = grad_fn(params, data, np.ones(4, bool), jax.random.key(0))
  ref = private_grad(loss, l2_norm_clip=1.0, noise_multiplier=0.0, expected_batch_size=4,
                     engine="reference")  # fmt: skip
  ref_grads, _ = ref(params, data, np.ones(4, bool), jax.random.key(0))
  np.testing.assert_allclose(fast_grads["w"], ref_grads["w"], rtol=1e-6)
