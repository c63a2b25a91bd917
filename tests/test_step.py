"""The one step: trains, compiles once, works with any optimiser, and reduces to SGD."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_problem

from jaxdp.sampling import PoissonSampler
from jaxdp.step import (
  DPConfig,
  init_state,
  make_step,
  microbatch_rows,
  parse_microbatch_size,
)


def flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_no_privacy_limit_is_the_plain_mean_gradient(engine):
  """sigma = 0 and a huge clip: the private step is SGD on the mean over expected size."""
  loss_fn, params, batch = make_problem("cnn")
  idx = jnp.arange(12, dtype=jnp.int32)
  mask = jnp.array([True] * 10 + [False] * 2)
  priv = make_step(
    loss_fn,
    optax.sgd(1.0),
    DPConfig(l2_norm_clip=1e6, noise_multiplier=0.0, engine=engine),
    expected_batch_size=10,
  )
  plain = make_step(loss_fn, optax.sgd(1.0), None)
  s0 = init_state(params, optax.sgd(1.0), jax.random.key(0))
  a, ma = priv(s0, batch, idx, mask)
  b, mb = plain(s0, batch, idx, mask)
  real = jax.tree_util.tree_map(lambda x: x[:10], batch)
  mean_grad = jax.grad(lambda p: jnp.mean(jax.vmap(lambda ex: loss_fn(p, ex, None))(real)))(params)
  want = flat(params) - flat(mean_grad)
  np.testing.assert_allclose(flat(a.params), want, atol=1e-5)
  np.testing.assert_allclose(flat(b.params), want, atol=1e-5)
  assert float(ma["batch_size"]) == 10 and float(mb["batch_size"]) == 10
  assert float(ma["clip_fraction"]) == 0.0
  np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), rtol=1e-6)


def test_step_metrics():
  loss_fn, params, batch = make_problem("mlp")
  step = make_step(
    loss_fn,
    optax.sgd(0.1),
    DPConfig(l2_norm_clip=1e-3, noise_multiplier=1.0),
    expected_batch_size=12,
  )
  s = init_state(params, optax.sgd(0.1), jax.random.key(0))
  mask = jnp.array([True] * 7 + [False] * 5)
  _, m = step(s, batch, jnp.arange(12), mask)
  assert float(m["batch_size"]) == 7
  assert float(m["clip_fraction"]) == 1.0  # tiny clip: every example clipped
  assert float(m["grad_norm_median"]) > 0 and np.isfinite(float(m["grad_norm_mean"]))


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_update_ignores_a_real_example_with_a_nan_loss(engine):
  """The update is finite and equals the update without that example; the clip statistics
  count it (factor 0: clipped, and non-finite)."""
  loss_fn, params, batch = make_problem("cnn")
  opt = optax.sgd(1.0)
  privacy = DPConfig(l2_norm_clip=1.0, noise_multiplier=0.0, engine=engine)
  step = make_step(loss_fn, opt, privacy, expected_batch_size=10)
  s = init_state(params, opt, jax.random.key(0))
  mask = jnp.array([True] * 10 + [False] * 2)
  bad = {**batch, "image": batch["image"].at[4].set(jnp.nan)}
  got, m = step(s, bad, jnp.arange(12), mask)
  want, _ = step(s, batch, jnp.arange(12), mask.at[4].set(False))
  assert np.all(np.isfinite(flat(got.params)))
  np.testing.assert_allclose(flat(got.params), flat(want.params), atol=1e-6)
  assert float(m["nonfinite_fraction"]) == pytest.approx(0.1)
  assert float(m["clip_fraction"]) >= 0.1
  assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm_mean"]))


@pytest.mark.slow  # compilation, not privacy
def test_compiles_once_per_batch_shape():
  loss_fn, params, batch = make_problem("mlp", batch_size=40)
  step = make_step(
    loss_fn, optax.sgd(0.1), DPConfig(l2_norm_clip=1.0, noise_multiplier=1.0), expected_batch_size=8
  )
  sampler = PoissonSampler(40, expected_batch_size=8, physical_batch_size=24, seed=0)
  s = init_state(params, optax.sgd(0.1), jax.random.key(0))
  sizes = set()
  for _ in range(15):
    (b,) = sampler.sample()
    sizes.add(int(b.mask.sum()))
    s, _ = step(s, batch, b.indices, b.mask)
  assert len(sizes) > 3  # the real batch size varied ...
  assert step.trace_count == 1  # ... and the step compiled once


@pytest.mark.slow
@pytest.mark.parametrize("opt", [optax.sgd(0.05), optax.sgd(0.05, momentum=0.9), optax.adam(1e-3)])
@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_any_optimizer_and_several_parameter_groups(opt, engine):
  loss_fn, params, batch = make_problem("groupnorm")
  assert len(params) >= 3  # conv, groupnorm, dense and a raw parameter
  step = make_step(
    loss_fn,
    opt,
    DPConfig(l2_norm_clip=1.0, noise_multiplier=0.5, engine=engine),
    expected_batch_size=12,
  )
  s = init_state(params, opt, jax.random.key(0))
  s2, m = step(s, batch, jnp.arange(12), jnp.ones(12, bool))
  assert np.all(np.isfinite(flat(s2.params))) and np.isfinite(float(m["loss"]))
  for k in params:  # every group moved
    assert not np.allclose(flat(s2.params[k]), flat(params[k]))


def test_same_state_same_output_and_fresh_key_each_step():
  loss_fn, params, batch = make_problem("mlp")
  step = make_step(
    loss_fn,
    optax.sgd(0.1),
    DPConfig(l2_norm_clip=1.0, noise_multiplier=1.0),
    expected_batch_size=12,
  )
  s = init_state(params, optax.sgd(0.1), jax.random.key(0))
  a, _ = step(s, batch, jnp.arange(12), jnp.ones(12, bool))
  b, _ = step(s, batch, jnp.arange(12), jnp.ones(12, bool))
  np.testing.assert_array_equal(flat(a.params), flat(b.params))
  assert not np.array_equal(
    np.asarray(jax.random.key_data(a.rng)), np.asarray(jax.random.key_data(s.rng))
  )


def _whole_and_halves():
  """The 12 examples as one physical batch, and as two (6 real, then 6 real + 2 padding)."""
  idx = np.arange(12, dtype=np.int32)
  halves = [
    (idx[:6], np.ones(6, bool)),
    (np.r_[idx[6:], [0, 0]].astype(np.int32), np.array([True] * 6 + [False] * 2)),
  ]
  return [(idx, np.ones(12, bool))], halves


def test_accumulated_physical_batches_equal_one_batch():
  loss_fn, params, batch = make_problem("cnn")
  step = make_step(
    loss_fn,
    optax.sgd(0.5),
    DPConfig(l2_norm_clip=1.0, noise_multiplier=1.0),
    expected_batch_size=10,
  )
  s = init_state(params, optax.sgd(0.5), jax.random.key(0))
  whole, halves = _whole_and_halves()
  one, m1 = step.run(s, batch, whole)
  two, m2 = step.run(s, batch, halves)
  np.testing.assert_allclose(flat(one.params), flat(two.params), atol=1e-6)
  assert float(m2["batch_size"]) == 12
  np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)


@pytest.mark.slow
def test_run_keeps_per_example_aux_of_every_physical_batch():
  base_loss, params, batch = make_problem("cnn")

  def loss_fn(p, ex, rng):
    loss = base_loss(p, ex, rng)
    return loss, {"loss_copy": loss, "label": ex["label"]}

  step = make_step(
    loss_fn,
    optax.sgd(0.5),
    DPConfig(l2_norm_clip=1.0, noise_multiplier=1.0),
    expected_batch_size=10,
    has_aux=True,
  )
  s = init_state(params, optax.sgd(0.5), jax.random.key(0))
  whole, halves = _whole_and_halves()
  _, m1 = step.run(s, batch, whole)
  _, m2 = step.run(s, batch, halves)
  assert m2["aux"]["loss_copy"].shape == (14,)
  # Rows 0-11 are examples 0-11 in order; rows 12, 13 are the padding of batch two.
  # (Two compiled programs: equal up to float rounding.)
  np.testing.assert_allclose(
    np.asarray(m2["aux"]["loss_copy"])[:12], m1["aux"]["loss_copy"], rtol=1e-6
  )
  np.testing.assert_array_equal(np.asarray(m2["aux"]["label"])[:12], batch["label"])


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(l2_norm_clip=-1.0, noise_multiplier=1.0), "l2_norm_clip"),
    (dict(l2_norm_clip=0.0, noise_multiplier=1.0), "l2_norm_clip"),
    (dict(l2_norm_clip=1.0, noise_multiplier=-0.1), "noise_multiplier"),
    (dict(l2_norm_clip=1.0, noise_multiplier=1.0, engine="turbo"), "engine"),
    (dict(l2_norm_clip={"a": 1.0}, noise_multiplier=1.0, engine="fast"), "fast"),
  ],
)
def test_bad_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    DPConfig(**kwargs)


@pytest.mark.parametrize("ebs", [0, -3.0, None])
def test_bad_expected_batch_size(ebs):
  loss_fn, _, _ = make_problem("mlp")
  with pytest.raises(ValueError, match="expected_batch_size"):
    make_step(
      loss_fn,
      optax.sgd(0.1),
      DPConfig(l2_norm_clip=1.0, noise_multiplier=1.0),
      expected_batch_size=ebs,
    )


def _keyed_problem():
  """The CNN problem with a loss that uses its per-example key (as dropout would)."""
  base_loss, params, batch = make_problem("cnn")

  def loss_fn(p, ex, rng):
    scale = 1.0 + 0.5 * jax.random.uniform(rng)
    ex = {**ex, "image": ex["image"] * scale}
    loss = base_loss(p, ex, rng)
    return loss, {"loss_copy": loss, "scale": scale}

  return loss_fn, params, batch


@pytest.mark.parametrize("engine", ["fast", "reference", "none"])
def test_microbatches_equal_one_batch(engine):
  loss_fn, params, batch = _keyed_problem()
  privacy = None
  if engine != "none":
    privacy = DPConfig(l2_norm_clip=1.0, noise_multiplier=1.0, engine=engine)
  opt = optax.sgd(0.5)
  s = init_state(params, opt, jax.random.key(0))
  # 10 rows, 2 of them padding: microbatches of 4 take three pieces (the last one padded).
  idx = jnp.arange(10, dtype=jnp.int32)
  mask = jnp.array([True] * 4 + [False] + [True] * 4 + [False])
  out = {}
  for mb in (None, 4, 5):
    step = make_step(loss_fn, opt, privacy, expected_batch_size=8, has_aux=True, microbatch_size=mb)
    out[mb] = step(s, batch, idx, mask)
  one_state, one = out[None]
  for mb in (4, 5):
    state, metrics = out[mb]
    np.testing.assert_allclose(flat(state.params), flat(one_state.params), atol=1e-6)
    for k in one:
      if k != "aux":
        np.testing.assert_allclose(metrics[k], one[k], rtol=1e-5, atol=1e-7)
    for k in ("loss_copy", "scale"):  # padding rows' aux is unspecified
      assert metrics["aux"][k].shape == (10,)
      np.testing.assert_allclose(metrics["aux"][k][mask], one["aux"][k][mask], rtol=1e-5)


@pytest.mark.slow
def test_microbatches_bound_the_working_memory():
  """Sequential microbatches: XLA plans the memory of one, not of all of them at once."""
  loss_fn, params, batch = make_problem("cnn", batch_size=256)
  opt = optax.sgd(0.1)
  s = init_state(params, opt, jax.random.key(0))
  idx, mask = jnp.arange(256, dtype=jnp.int32), jnp.ones(256, bool)
  temp = {}
  for mb in (None, 32):
    step = make_step(
      loss_fn,
      opt,
      DPConfig(l2_norm_clip=1.0, noise_multiplier=1.0),
      expected_batch_size=256,
      microbatch_size=mb,
    )
    temp[mb] = step.lower(s, batch, idx, mask).compile().memory_analysis().temp_size_in_bytes
  # Eight microbatches run one after the other need well under half of the memory.
  assert temp[32] < 0.35 * temp[None], temp


@pytest.mark.parametrize("mb", [0, -2, 2.5, "big", True])
def test_bad_microbatch_size(mb):
  loss_fn, _, _ = make_problem("mlp")
  with pytest.raises(ValueError, match="microbatch_size"):
    make_step(loss_fn, optax.sgd(0.1), None, microbatch_size=mb)


def test_auto_microbatch_rows():
  assert microbatch_rows("auto", 1024, "cpu") == 256
  assert microbatch_rows("auto", 100, "cpu") == 256  # a batch of 100 is not split
  assert microbatch_rows("auto", 4096, "cpu") == 512  # at most 8 microbatches
  assert microbatch_rows("auto", 4096, "gpu") is None
  assert microbatch_rows(64, 4096, "gpu") == 64
  assert microbatch_rows(None, 4096, "cpu") is None


def test_parse_microbatch_size():
  assert parse_microbatch_size("auto") == "auto"
  assert parse_microbatch_size("None") is None
  assert parse_microbatch_size("128") == 128
  for bad in ("0", "-1", "2.5", "half"):
    with pytest.raises(ValueError, match="--microbatch-size"):
      parse_microbatch_size(bad, "--microbatch-size")
