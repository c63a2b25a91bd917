"""The step trains: a small CNN on the tiny synthetic set learns under DP-SGD."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdp import DPConfig, PoissonSampler, init_state, make_step, synthetic_splits
from jaxdp.models import TFPrivacyCNN, classifier_loss

pytestmark = pytest.mark.slow  # learning behaviour (not a privacy property)


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_private_cnn_learns_on_synthetic_data(engine):
  train, test = synthetic_splits(512, 256, seed=0)
  model = TFPrivacyCNN(act="tanh")
  data = {"image": jnp.asarray(train.images), "label": jnp.asarray(train.labels)}
  params = model.init(jax.random.key(0), data["image"][:1])["params"]
  opt = optax.sgd(0.1, momentum=0.9)
  sampler = PoissonSampler(len(train), expected_batch_size=64, seed=0)
  step = make_step(
    classifier_loss(model),
    opt,
    DPConfig(l2_norm_clip=1.0, noise_multiplier=1.0, engine=engine),
    expected_batch_size=sampler.expected_batch_size,
    has_aux=True,
  )
  state = init_state(params, opt, jax.random.key(1))
  losses = []
  for _ in range(200):
    state, m = step.run(state, data, sampler.sample())
    losses.append(float(m["loss"]))
  first, last = np.mean(losses[:20]), np.mean(losses[-20:])
  assert last < 0.5 * first, (first, last)
  logits = model.apply({"params": state.params}, jnp.asarray(test.images))
  acc = float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(test.labels)))
  assert acc > 0.8
