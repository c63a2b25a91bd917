"""The shared training loop, parameter averaging, classifier evaluation and plots."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdp import (
  DPConfig,
  EpsilonTracker,
  PoissonSampler,
  init_state,
  make_step,
  synthetic_splits,
)
from jaxdp.metrics import evaluate_classifier
from jaxdp.models import MLP, classifier_loss
from jaxdp.optim import ema_params, make_optimizer, param_ema
from jaxdp.plots import plot_curves, plot_epsilon, plot_privacy_utility
from jaxdp.train import train


def test_param_ema_leaves_updates_alone_and_averages_iterates():
  params = {"w": jnp.array([1.0, -2.0])}
  inner = optax.sgd(0.5, momentum=0.9)
  opt = param_ema(inner, 0.9, warmup=False)
  s_inner, s = inner.init(params), opt.init(params)
  p_inner, p, ema = params, params, params["w"]
  for k in range(4):
    g = {"w": jnp.array([1.0, 0.5]) * (k + 1)}
    u_inner, s_inner = inner.update(g, s_inner, p_inner)
    u, s = opt.update(g, s, p)
    np.testing.assert_array_equal(u["w"], u_inner["w"])
    p_inner, p = optax.apply_updates(p_inner, u_inner), optax.apply_updates(p, u)
    ema = 0.9 * ema + 0.1 * p["w"]
    np.testing.assert_allclose(ema_params(s)["w"], ema, rtol=1e-6)
  assert ema_params(s_inner) is None


def test_param_ema_warmup_and_arguments():
  opt = param_ema(optax.sgd(1.0), 0.999)
  params = {"w": jnp.zeros(())}
  s = opt.init(params)
  _, s = opt.update({"w": jnp.ones(())}, s, params)
  # Step 1 uses decay min(0.999, 2/11): the average moves most of the way to the iterate -1.
  np.testing.assert_allclose(ema_params(s)["w"], -(1 - 2 / 11), rtol=1e-6)
  with pytest.raises(ValueError, match="decay must be in"):
    param_ema(optax.sgd(1.0), 1.0)
  with pytest.raises(ValueError, match="needs params"):
    opt.update({"w": jnp.ones(())}, s)
  with pytest.raises(ValueError, match="momentum applies to optimizer 'sgd' only"):
    make_optimizer("adam", 1e-3, momentum=0.9)
  with pytest.raises(ValueError, match="optimizer must be one of"):
    make_optimizer("lamb", 1e-3)


def _setup(private: bool, n: int = 256):
  train_set, test_set = synthetic_splits(n, 128, image_size=8, seed=0)
  model = MLP(hidden=(32,), act="tanh")
  data = jax.device_put(train_set.arrays())
  params = model.init(jax.random.key(0), data["image"][:1])["params"]
  opt = make_optimizer("sgd", 0.5, momentum=0.9, ema_decay=0.9)
  sampler = PoissonSampler(n, expected_batch_size=32, seed=0)
  privacy = DPConfig(l2_norm_clip=1.0, noise_multiplier=0.8) if private else None
  step = make_step(
    classifier_loss(model),
    opt,
    privacy,
    expected_batch_size=sampler.expected_batch_size,
    has_aux=True,
  )
  return model, data, test_set, sampler, step, init_state(params, opt, jax.random.key(1))


def test_train_records_history_and_epsilon():
  model, data, test_set, sampler, step, state = _setup(private=True)
  tracker = EpsilonTracker(sampler.sampling_prob, 0.8, 1e-5)
  seen = []

  def on_epoch(epoch, st):
    seen.append(int(st.step))
    return {
      "test_accuracy": evaluate_classifier(model, ema_params(st.opt_state), test_set)["accuracy"]
    }

  state, history = train(
    step, state, data, sampler, epochs=3, tracker=tracker, on_epoch=on_epoch, progress=False
  )
  spe = sampler.steps_per_epoch
  assert int(state.step) == 3 * spe and seen == [spe, 2 * spe, 3 * spe]
  assert [h["epoch"] for h in history] == [1, 2, 3]
  for h in history:
    assert h["epsilon_rdp"] == tracker.epsilon(h["step"])
    assert 0.0 <= h["train_accuracy"] <= 1.0 and 0.0 <= h["train_clip_fraction"] <= 1.0
    assert np.isfinite(h["train_loss"]) and "test_accuracy" in h
  assert history[0]["time"] <= history[-1]["time"]
  assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_train_reports_aux_when_a_batch_spans_several_physical_batches():
  _, data, _, _, step, state = _setup(private=True)
  sampler = PoissonSampler(256, expected_batch_size=32, physical_batch_size=12, seed=0)
  assert all(len(sampler.sample()) > 1 for _ in range(5))
  _, history = train(step, state, data, sampler, epochs=1, steps_per_epoch=4, progress=False)
  assert 0.0 <= history[0]["train_accuracy"] <= 1.0


def test_train_without_privacy_and_argument_checks():
  _, data, _, sampler, step, state = _setup(private=False)
  state, history = train(step, state, data, sampler, epochs=1, steps_per_epoch=3, progress=False)
  assert int(state.step) == 3 and len(history) == 1
  assert "epsilon_rdp" not in history[0] and "train_clip_fraction" not in history[0]
  with pytest.raises(ValueError, match="epochs must be an integer >= 1"):
    train(step, state, data, sampler, epochs=0)
  _, data, _, sampler, step, state = _setup(private=True)
  with pytest.raises(ValueError, match="tracker must describe the run"):
    train(step, state, data, sampler, epochs=1, tracker=EpsilonTracker(0.5, 0.8, 1e-5))


@pytest.mark.parametrize("chunk_size", [1, 7, 128, 1000])
def test_evaluate_classifier_matches_a_direct_computation(chunk_size):
  model, _, test_set, _, _, state = _setup(private=False)
  logits = model.apply({"params": state.params}, jnp.asarray(test_set.images))
  labels = jnp.asarray(test_set.labels)
  acc = float(jnp.mean(jnp.argmax(logits, -1) == labels))
  loss = float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels)))
  res = evaluate_classifier(model, state.params, test_set, chunk_size=chunk_size)
  assert res["accuracy"] == pytest.approx(acc, abs=1e-9)
  assert res["loss"] == pytest.approx(loss, rel=1e-5)
  assert evaluate_classifier(model, state.params, test_set.arrays()) == pytest.approx(res)


def test_plots_write_png_files(tmp_path):
  hist = [
    {"epoch": e, "train_accuracy": 0.5 + e / 10, "test_accuracy": 0.5 + e / 12, "train_loss": 1 / e}
    for e in range(1, 4)
  ]
  dp_hist = [dict(h, epsilon_rdp=0.5 * h["epoch"], epsilon_pld=0.4 * h["epoch"]) for h in hist]
  paths = [
    plot_curves({"non-private": hist, "DP": dp_hist}, tmp_path / "a" / "curves.png"),
    plot_epsilon({"DP": dp_hist}, tmp_path / "eps.png", keys=("epsilon_pld", "epsilon_rdp")),
    plot_privacy_utility([1, 3, 8], [0.9, 0.95, 0.97], tmp_path / "pu.png", baseline=0.99),
  ]
  for path in paths:
    assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG"
  with pytest.raises(ValueError, match="same length"):
    plot_privacy_utility([1, 3], [0.9], tmp_path / "bad.png")
