"""The DP-WGAN: the critic's per-example loss pairs a real row with its generated row,
padding rows contribute nothing, the gradient penalty stays within the clipping bound,
the accountant is charged once per critic step, and the experiment writes its folder."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_dp_classifier import load_script

from jaxdp import accounting, optim
from jaxdp.clipping import fast
from jaxdp.experiment import splits, tasks
from jaxdp.models import gan
from jaxdp.step import DPConfig, init_state, make_step

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "dp_gan_synth.py"
C = 0.5


@pytest.fixture(scope="module")
def tiny():
  g = gan.ImageGenerator(image_shape=(12, 12, 1), num_classes=5, latent_dim=4, width=8)
  d = gan.ImageCritic(num_classes=5, width=4)
  k = jax.random.key(0)
  g_params = g.init(k, jnp.zeros((1, 4)), jnp.zeros((1,), jnp.int32))["params"]
  d_params = d.init(k, jnp.zeros((1, 12, 12, 1)))["params"]
  data = {"image": jax.random.uniform(k, (16, 12, 12, 1)), "label": jnp.arange(16) % 5}
  rows = gan.fake_rows(g, g_params, jax.random.key(1), 16)
  return g, d, g_params, d_params, data, rows


def _step(d, penalty=0.0, engine="reference"):
  loss = gan.critic_loss(d, gradient_penalty=penalty)
  privacy = DPConfig(l2_norm_clip=C, noise_multiplier=0.0, engine=engine)
  return make_step(loss, optax.sgd(0.1), privacy, expected_batch_size=16, has_aux=True)


def _sum(step, params, batch, mask):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the penalty's fallback warning
    return step.clipped_sum(params, batch, jnp.asarray(mask), jax.random.key(3))


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_each_row_pairs_its_real_and_its_fake_and_padding_adds_nothing(tiny, engine):
  _, d, _, params, data, rows = tiny
  step = _step(d, engine=engine)
  mask = np.arange(16) < 10
  full = _sum(step, params, {**data, **rows}, mask)
  # Padding rows: any fake (here the fakes of rows 10-15 replaced) changes nothing.
  other = dict(rows, fake=rows["fake"].at[10:].set(1.0))
  same = _sum(step, params, {**data, **other}, mask)
  pairs = zip(_leaves(full.sum_of_clipped_grads), _leaves(same.sum_of_clipped_grads), strict=True)
  for a, b in pairs:
    np.testing.assert_array_equal(a, b)
  assert np.all(np.asarray(full.clip_factors)[10:] == 0)
  # Row 3's pair is one example: its clipped gradient is the sum with row 3 minus without.
  only3 = _sum(step, params, {**data, **rows}, np.arange(16) == 3)
  without3 = _sum(step, params, {**data, **rows}, mask & (np.arange(16) != 3))
  for a, b, c in zip(_leaves(full.sum_of_clipped_grads), _leaves(only3.sum_of_clipped_grads),
                     _leaves(without3.sum_of_clipped_grads), strict=True):  # fmt: skip
    np.testing.assert_allclose(a, b + c, atol=1e-6)
  # ... and it depends on row 3's fake: its loss is D(fake_3, y~_3) - D(x_3, y_3).
  x3 = {k: v[3] for k, v in {**data, **rows}.items()}
  value, _ = gan.critic_loss(d)(params, x3, jax.random.key(0))
  assert float(full.losses[3]) == pytest.approx(float(value), abs=1e-6)


def test_the_pair_goes_through_each_critic_layer_once_so_the_fast_rules_apply(tiny):
  _, d, _, params, data, rows = tiny
  x0 = {k: v[0] for k, v in {**data, **rows}.items()}
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no "no rule" / fallback note
    plan = fast.discover(gan.critic_loss(d), params, x0, jax.random.key(0), True)
  assert plan.summary() == {"conv": 2, "dense": 2, "vmap_leaves": 0}
  # Scores read from the one call on (real, fake) equal two separate calls.
  value, aux = gan.critic_loss(d)(params, x0, jax.random.key(0))
  d_real = gan.critic_score(d, params, x0["image"], x0["label"])
  d_fake = gan.critic_score(d, params, x0["fake"], x0["fake_label"])
  assert float(value) == pytest.approx(float(d_fake - d_real), abs=1e-6)
  assert float(aux["wasserstein"]) == pytest.approx(float(d_real - d_fake), abs=1e-6)


def test_the_logistic_loss_is_the_gan_cross_entropy_and_its_generator_non_saturating(tiny):
  g, d, g_params, params, data, rows = tiny
  x0 = {k: v[0] for k, v in {**data, **rows}.items()}
  value, aux = gan.critic_loss(d, loss="logistic")(params, x0, jax.random.key(0))
  d_real = gan.critic_score(d, params, x0["image"], x0["label"])
  d_fake = gan.critic_score(d, params, x0["fake"], x0["fake_label"])
  want = -jnp.log(jax.nn.sigmoid(d_real)) - jnp.log(1 - jax.nn.sigmoid(d_fake))
  assert float(value) == pytest.approx(float(want), rel=1e-5)
  assert float(aux["wasserstein"]) == pytest.approx(float(d_real - d_fake), abs=1e-6)
  opt = optax.sgd(0.0)
  state = gan.GeneratorState(g_params, opt.init(g_params))
  _, loss = gan.generator_update(g, d, opt, 8, loss="logistic")(state, params, jax.random.key(2))
  z, y = gan._draw(jax.random.key(2), 8, g.latent_dim, g.num_classes)
  scores = d.apply({"params": params}, g.apply({"params": g_params}, z, y))[jnp.arange(8), y]
  assert float(loss) == pytest.approx(float(jnp.mean(-jnp.log(jax.nn.sigmoid(scores)))), rel=1e-5)
  with pytest.raises(ValueError, match="loss"):
    gan.critic_loss(d, loss="hinge")


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_the_gradient_penalty_stays_within_the_clipping_bound(tiny, engine):
  _, d, _, params, data, rows = tiny
  cs = _sum(_step(d, penalty=10.0, engine=engine), params, {**data, **rows}, np.ones(16, bool))
  shares = np.asarray(cs.per_example_norms) * np.asarray(cs.clip_factors)
  assert np.all(shares <= C * (1 + 1e-6)) and np.max(shares) > 0.99 * C
  assert np.all(np.asarray(cs.per_example_norms) > C)  # the penalty makes the norms large
  ref = _sum(_step(d, penalty=10.0), params, {**data, **rows}, np.ones(16, bool))
  for a, b in zip(_leaves(cs.sum_of_clipped_grads), _leaves(ref.sum_of_clipped_grads), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_generated_rows_and_generator_steps_read_no_private_data(tiny):
  g, d, g_params, d_params, _, _ = tiny
  a = gan.fake_rows(g, g_params, jax.random.key(5), 8)
  b = gan.fake_rows(g, g_params, jax.random.key(5), 8)
  np.testing.assert_array_equal(np.asarray(a["fake"]), np.asarray(b["fake"]))
  assert a["fake"].shape == (8, 12, 12, 1) and set(a) == {"fake", "fake_label"}
  opt = optax.adam(1e-2)
  update = gan.generator_update(g, d, opt, 8)
  state = gan.GeneratorState(g_params, opt.init(g_params))
  new, loss = update(state, d_params, jax.random.key(0))  # arguments: no data at all
  assert np.isfinite(float(loss))
  moved = zip(_leaves(new.params), _leaves(g_params), strict=True)
  assert any(not np.array_equal(x, y) for x, y in moved)
  images = gan.sample(g, g_params, jnp.arange(7) % 5, jax.random.key(0), chunk_size=3)
  assert images.shape == (7, 12, 12, 1) and float(images.min()) >= 0 and float(images.max()) <= 1


def test_the_released_generator_is_the_average_of_its_iterates_when_asked(tiny):
  g, d, g_params, d_params, _, _ = tiny
  state = init_state(d_params, optax.sgd(0.1), jax.random.key(0))
  released, last, iterates = {}, {}, {}
  for ema in (0.0, 0.9):
    trainer = tasks.GeneratorTrainer(
      g, d, g_params, gan.generator_optimizer(1e-2, ema), batch_size=8, every=1,
      key=jax.random.key(0),
    )  # fmt: skip
    for step in range(1, 4):
      trainer.after_step(step, state)
      iterates.setdefault(ema, []).append(trainer.state.params)
    released[ema], last[ema] = trainer.params, trainer.state.params
  # The last iterate without averaging; with it, the warmed-up average of the 3 iterates
  # (decays min(0.9, (1 + t) / (10 + t)) = 2/11, 3/12, 4/13 at t = 1, 2, 3).
  for a, b in zip(_leaves(released[0.0]), _leaves(last[0.0]), strict=True):
    np.testing.assert_array_equal(a, b)
  want = g_params
  for t, p in enumerate(iterates[0.9], start=1):
    dt = min(0.9, (1 + t) / (10 + t))
    want = jax.tree_util.tree_map(lambda w, x, dt=dt: dt * w + (1 - dt) * x, want, p)
  for a, b in zip(_leaves(released[0.9]), _leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_mode_seeking_spreads_a_class_and_reports_the_adversarial_loss_alone(tiny):
  g, d, g_params, d_params, _, _ = tiny
  opt = optax.adam(1e-3)
  state = gan.GeneratorState(g_params, opt.init(g_params))
  key = jax.random.key(4)
  z = jax.random.normal(jax.random.key(9), (64, g.latent_dim))
  y = jnp.arange(32) % 5

  def spread(params):  # mean |G(z1, y) - G(z2, y)| over pairs of one label
    a = g.apply({"params": params}, z[:32], y)
    return float(jnp.mean(jnp.abs(a - g.apply({"params": params}, z[32:], y))))

  plain, _ = gan.generator_update(g, d, opt, 16)(state, d_params, key)
  seeking, loss1 = gan.generator_update(g, d, opt, 16, mode_seeking=1.0)(state, d_params, key)
  assert spread(seeking.params) > spread(plain.params)
  # The reported loss is -mean D at the same draws (paired labels): not the regulariser.
  zd, yd = gan._draw(key, 16, g.latent_dim, g.num_classes)
  yd = yd.at[8:].set(yd[:8])
  scores = d.apply({"params": d_params}, g.apply({"params": g_params}, zd, yd))[jnp.arange(16), yd]
  assert float(loss1) == pytest.approx(float(-jnp.mean(scores)), rel=1e-5)
  with pytest.raises(ValueError, match="mode_seeking"):
    gan.generator_update(g, d, opt, 16, mode_seeking=-1.0)


def test_weight_clipping_keeps_the_critic_in_its_box(tiny):
  _, d, _, params, data, rows = tiny
  opt = optim.make_optimizer("adam", 0.5, weight_clip=0.01)
  step = make_step(gan.critic_loss(d), opt, DPConfig(l2_norm_clip=C, noise_multiplier=1.0),
                   expected_batch_size=16, has_aux=True)  # fmt: skip
  state = init_state(params, opt, jax.random.key(0))
  for _ in range(2):
    state, _ = step(state, data, np.arange(16), np.ones(16, bool), rows)
  top = max(float(jnp.max(jnp.abs(x))) for x in jax.tree_util.tree_leaves(state.params))
  assert 0.0099 < top <= 0.01 * (1 + 1e-6)  # at the box's edge (lr 0.5 pushes past it), not out
  with pytest.raises(ValueError, match="bound must be > 0"):
    optim.clip_weights(0.0)


def test_the_wgan_critic_has_no_class_bias_whose_label_noise_would_take_the_clip_budget(tiny):
  _, d, _, params, data, rows = tiny
  ex = {k: v[0] for k, v in {**data, **rows}.items()}
  ex["fake_label"] = (ex["label"] + 1) % 5  # the pair's labels differ
  grads, _ = jax.grad(gan.critic_loss(d), has_aux=True)(params, ex, jax.random.key(0))
  # With a class bias the WGAN pair loss moves it by e_y~ - e_y, whatever the images.
  bias = np.zeros(5)
  bias[int(ex["fake_label"])], bias[int(ex["label"])] = 1.0, -1.0
  np.testing.assert_allclose(grads["Dense_1"]["bias"], bias, atol=1e-6)
  assert gan.class_bias_for("wasserstein") is False and gan.class_bias_for("logistic") is True
  with pytest.raises(ValueError, match="loss"):
    gan.class_bias_for("hinge")
  for critic, x in ((gan.ImageCritic(5, 4, class_bias=False), jnp.zeros((1, 12, 12, 1))),
                    (gan.VectorCritic(5, (8,), class_bias=False), jnp.zeros((1, 6)))):  # fmt: skip
    p = critic.init(jax.random.key(0), x)["params"]
    (scores,) = [name for name in p if p[name]["kernel"].shape[-1] == 5]  # the score layer
    assert "bias" not in p[scores] and all("bias" in p[n] for n in p if n != scores)


def test_config_json_records_the_gradient_penalty_as_resolved_by_the_loss():
  config = load_script(SCRIPT).Config
  assert config().derived() == {"gradient_penalty_resolved": 0.0}  # logistic: no penalty
  assert config(loss="wasserstein").derived() == {"gradient_penalty_resolved": 10.0}
  explicit = config(loss="wasserstein", gradient_penalty=2.0).derived()
  assert explicit == {"gradient_penalty_resolved": 2.0}


def test_quick_run_charges_each_critic_step_once_and_writes_its_folder(tmp_path, spy):
  exp = load_script(SCRIPT)
  fits, downstreams = spy(tasks, "fit"), spy(tasks, "train_on_synthetic")
  gans = spy(tasks, "fit_gan")
  flags = ["--dataset", "synthetic", "--quick", "--no-progress", "--train-size", "800"]
  flags += ["--validation-size", "300", "--public-size", "300", "--epochs", "2"]
  flags += ["--batch-size", "200", "--num-samples", "500", "--critic-steps", "2"]
  flags += ["--generator-width", "8", "--critic-width", "4", "--latent-dim", "8"]
  flags += ["--classifier-epochs", "1", "--feature-epochs", "1", "--gradient-penalty", "0"]
  flags += ["--weight-clip", "0.05", "--generator-ema", "0.9", "--critic-hidden", "0"]
  flags += ["--mode-seeking", "1", "--public-pretrain-epochs", "1", "--loss", "wasserstein"]
  flags += ["--out", str(tmp_path), "--name", "g"]
  metrics = exp.main(flags)
  # the images each fit and each downstream classifier received, by label
  seen = {c.arguments["label"]: np.asarray(c.arguments["train_data"]["image"]) for c in fits}
  downstream = {c.arguments["label"]: np.asarray(c.arguments["synthetic"].images)
                for c in downstreams}  # fmt: skip
  # The DP-WGAN (weight clipping): its critic is built without the per-class score bias.
  assert [c.arguments["critic"].class_bias for c in gans] == [False]
  out = tmp_path / "g"
  for name in ("config.json", "metrics.json", "plots/synthetic_grid.png",
               "plots/generator_loss.png"):  # fmt: skip
    assert (out / name).is_file(), name
  assert json.loads((out / "config.json").read_text())["gradient_penalty_resolved"] == 0
  (p,) = metrics["pipelines"]
  critic = p["critic"]
  assert critic["steps"] == 2 * round(1 / critic["sampling_prob"]) == 8
  assert p["generator_steps"] == critic["steps"] // 2
  (event,) = p["ledger"]["entries"]  # one DP-SGD event: the critic's steps, nothing else
  assert event["steps"] == critic["steps"]
  want = accounting.epsilon(
    accounting.dpsgd_event(critic["sampling_prob"], critic["noise_multiplier"], critic["steps"]),
    1e-5,
  )
  assert p["epsilon_pld"] == pytest.approx(want, rel=1e-9) and p["epsilon_pld"] <= 10.0
  rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  critic_rows = [r for r in rows if r["model"] == p["label"]]
  assert [r["epoch"] for r in critic_rows] == [1, 2]
  assert all(np.isfinite(r["generator_loss"]) for r in critic_rows)
  assert not any(k.startswith("train_") for r in rows for k in r)
  assert (out / p["synthetic_npz"]).is_file() and (out / p["generator_checkpoint"]).is_file()
  # The public pretraining (critic and generator, no noise) saw exactly the public partition,
  # and cost nothing: the ledger above holds the critic's private steps alone.
  public = splits.load_splits("synthetic", validation_size=300, public_size=300, train_size=800)
  assert [label for label in seen if "pretraining" in label] == ["WGAN public pretraining"]
  np.testing.assert_array_equal(seen["WGAN public pretraining"], public.public.images)
  np.testing.assert_array_equal(seen[p["label"]], public.private.images)
  # Beside it, the classifier trained on the public partition alone (the honest baseline).
  baseline = metrics["public_only_baseline"]
  assert baseline["public_examples"] == 270 and 0.0 <= baseline["test_accuracy"] <= 1.0
  rows = np.resize(np.arange(270), 500)  # repeated to the synthetic set's 500 rows
  np.testing.assert_array_equal(downstream["public-only baseline"], public.public.images[rows])
