"""Audit maths (metrics, attacks, epsilon lower bounds) and the white-box one-run audit: it
flags both broken mechanisms and never the correct one."""

from __future__ import annotations

import math

import dp_accounting
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import special, stats

from jaxdp import accounting, audit
from jaxdp.keys import KeySource
from jaxdp.step import DPConfig

# -- metrics ---------------------------------------------------------------------------------


def test_roc_auc_and_tpr_on_a_worked_example():
  members, others = [0, 4, 6, 7], [1, 2, 3, 5]
  # Thresholds 7, 6, 5, 4, ...: (fp, tp) = (0,1) (0,2) (1,2) (1,3) (2,3) (3,3) (3,4) (4,4).
  fpr, tpr = audit.roc_curve(members, others)
  assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0
  assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
  # Pairs (member > other): 4 > 1,2,3; 6 > 1..5; 7 > all four: 3 + 4 + 4 = 11 of 16.
  assert audit.auc(members, others) == pytest.approx(11 / 16)
  assert audit.tpr_at_fpr(members, others, 0.0) == 0.5  # 7 and 6 above every non-member
  assert audit.tpr_at_fpr(members, others, 0.25) == 0.75
  assert audit.auc([1, 1], [1, 1]) == 0.5  # ties count half
  assert audit.auc([2, 3], [0, 1]) == 1.0 and audit.tpr_at_fpr([2, 3], [0, 1], 0.0) == 1.0


def test_auc_is_the_area_under_the_roc_curve():
  rng = np.random.default_rng(0)
  pos, neg = rng.normal(0.7, 1, 300), rng.normal(0, 1, 500)
  fpr, tpr = audit.roc_curve(pos, neg)
  assert audit.auc(pos, neg) == pytest.approx(np.trapezoid(tpr, fpr), abs=1e-12)


def test_metric_inputs_are_checked():
  with pytest.raises(ValueError, match="member_scores must hold"):
    audit.auc([], [1.0])
  with pytest.raises(ValueError, match="nonmember_scores must be finite"):
    audit.roc_curve([1.0], [np.nan])
  with pytest.raises(ValueError, match="fpr"):
    audit.tpr_at_fpr([1.0], [0.0], 1.5)


# -- attacks ---------------------------------------------------------------------------------


def test_logit_confidence_is_the_logit_of_the_true_class_probability():
  rng = np.random.default_rng(1)
  logits, labels = rng.normal(size=(20, 10)), rng.integers(0, 10, 20)
  p = special.softmax(logits, axis=-1)[np.arange(20), labels]
  assert np.allclose(audit.logit_confidence(logits, labels), np.log(p / (1 - p)))
  big = np.zeros((1, 10))
  big[0, 3] = 80.0  # p_y rounds to 1 in float64
  assert audit.logit_confidence(big, [3])[0] == pytest.approx(80.0 - math.log(9.0))


def test_lira_beats_the_raw_statistic_when_examples_differ_in_difficulty():
  """Each candidate has its own baseline (easy and hard examples): LiRA's per-example
  calibration separates members where the raw statistic cannot."""
  rng = np.random.default_rng(2)
  n, shadows = 400, 16
  base = rng.normal(0, 3, n)  # per-example difficulty
  member = rng.random(n) < 0.5
  shadow_in = rng.random((shadows, n)) < 0.5
  shadow = base + 1.0 * shadow_in + rng.normal(0, 0.5, (shadows, n))
  target = base + 1.0 * member + rng.normal(0, 0.5, n)
  raw = audit.auc(target[member], target[~member])
  for online in (True, False):
    s = audit.lira_scores(target, shadow, shadow_in, online=online)
    assert audit.auc(s[member], s[~member]) > raw + 0.2
  s = audit.lira_scores(target, shadow, shadow_in, global_variance=True)
  assert audit.auc(s[member], s[~member]) > raw + 0.2
  with pytest.raises(ValueError, match="at least one 'in' shadow"):
    audit.lira_scores(target, shadow, np.zeros_like(shadow_in))
  assert np.array_equal(audit.loss_threshold_scores([0.1, 2.0]), [-0.1, -2.0])


# -- epsilon lower bounds --------------------------------------------------------------------

# The epsilon that m canaries can certify with every guess right, in one run (delta 1e-5,
# 95% confidence; Steinke, Nasr & Jagielski 2023, Fig. 1's curve at m = 100, 1,000, 10,000).
CEILINGS = {100: 3.490, 1000: 5.782, 10_000: 7.834}


@pytest.mark.parametrize("m", sorted(CEILINGS))
def test_one_run_ceiling_with_perfect_guesses(m):
  assert audit.one_run_ceiling(m, 1e-5) == pytest.approx(CEILINGS[m], abs=2e-3)
  # With delta = 0 and all m guesses right the bound has a closed form: p_eps^m = 0.05.
  closed = -math.log(0.05 ** (-1 / m) - 1)
  assert audit.one_run_epsilon(m, m, m, 0.0) == pytest.approx(closed, rel=1e-9)


def test_one_run_p_value_is_the_randomized_response_tail():
  m, r, v, eps = 1000, 200, 150, 1.0
  p = 1 / (1 + math.exp(-eps))
  assert audit.one_run_p_value(m, r, v, eps, 0.0) == pytest.approx(stats.binom.sf(v - 1, r, p))
  # delta adds 2 m delta alpha with alpha = max_i P[v - i <= Bin < v] / i.
  i = np.arange(1, v + 1)
  alpha = max(np.cumsum(stats.binom.pmf(v - i, r, p)) / i)
  want = stats.binom.sf(v - 1, r, p) + 2 * m * 1e-4 * alpha
  assert audit.one_run_p_value(m, r, v, eps, 1e-4) == pytest.approx(want)
  with pytest.raises(ValueError, match="0 <= v <= r <= m"):
    audit.one_run_p_value(10, 20, 5, 1.0, 0.0)


def test_one_run_bound_holds_for_an_epsilon_dp_mechanism():
  """Randomized response is exactly eps-DP: its certified epsilon exceeds eps in at most
  about 5% of audits at 95% confidence."""
  rng = np.random.default_rng(3)
  eps, m, r = 1.0, 1000, 400
  right = rng.binomial(r, 1 / (1 + math.exp(-eps)), size=200)
  bounds = np.array([audit.one_run_epsilon(m, r, int(v), 1e-5) for v in right])
  assert np.mean(bounds > eps) <= 0.08
  assert np.median(bounds) > 0.4 * eps  # and it is not vacuous


def test_gdp_epsilon_is_the_gaussian_mechanism_epsilon():
  for mu in (0.5, 1.0, 2.0):
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    pld.compose(dp_accounting.GaussianDpEvent(1 / mu))
    assert audit.gdp_epsilon(mu, 1e-5) == pytest.approx(pld.get_epsilon(1e-5), rel=5e-3)
  assert audit.gdp_epsilon(0.0, 1e-5) == 0.0


def test_gdp_one_run_audit_holds_and_is_tight_on_a_gaussian_mechanism():
  """Scores of a mu-GDP mechanism (one Gaussian shift per canary): the certified mu stays at
  or below mu in every seed and reaches about half of it (m = 1,000)."""
  mu, m = 2.0, 1000
  got = []
  for seed in range(3):
    rng = np.random.default_rng(10 + seed)
    included = rng.random(m) < 0.5
    scores = mu * included + rng.normal(size=m)
    res = audit.audit_scores(scores, included, 1e-5)
    assert res["gdp_mu"] <= mu and res["epsilon"] <= audit.gdp_epsilon(mu, 1e-5)
    got.append(res["gdp_mu"])
  assert min(got) > 0.4 * mu  # 0.96-1.12 of 2.0 measured
  # Random guesses certify nothing.
  rng = np.random.default_rng(0)
  res = audit.audit_scores(rng.normal(size=m), rng.random(m) < 0.5, 1e-5)
  assert res["epsilon"] == 0.0 and res["gdp_mu"] < 0.3


def test_clopper_pearson_bound_of_a_perfect_attack():
  n, delta = 1000, 1e-5
  fnr_hi = 1 - 0.025 ** (1 / n)  # Clopper-Pearson upper bound of 0 errors in n
  want = math.log((1 - delta - fnr_hi) / fnr_hi)
  assert audit.clopper_pearson_epsilon(0, n, 0, n, delta) == pytest.approx(want, rel=1e-6)
  assert audit.clopper_pearson_epsilon(n // 2, n, n // 2, n, delta) == 0.0
  with pytest.raises(ValueError, match="false_positives"):
    audit.clopper_pearson_epsilon(5, 3, 0, 3, delta)


# -- white-box one-run audit of DP-SGD -------------------------------------------------------


def _tiny_problem():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 8)).astype(np.float32)
  data = {"x": x, "y": (x[:, 0] > 0).astype(np.int32)}

  def loss_fn(p, ex, rng):
    z = ex["x"] @ p["w"] + p["b"]
    return optax.softmax_cross_entropy_with_integer_labels(z, ex["y"])

  return loss_fn, {"w": jnp.zeros((8, 2)), "b": jnp.zeros(2)}, data


def _audit(mechanism: str, engine: str, seed: int, eps: float = 2.0, m: int = 400) -> dict:
  loss_fn, params, data = _tiny_problem()
  q, steps = 0.25, 60
  sigma = accounting.calibrate_noise_multiplier(eps, 1e-5, q, steps)
  return audit.white_box_audit(
    loss_fn,
    params,
    data,
    num_canaries=m,
    privacy=DPConfig(l2_norm_clip=1.0, noise_multiplier=sigma, engine=engine),
    sampling_prob=q,
    steps=steps,
    model_optimizer=optax.sgd(0.1),
    delta=1e-5,
    mechanism=mechanism,
    keys=KeySource(insecure_seed=seed),
  )


@pytest.mark.parametrize("mechanism", audit.BROKEN_MECHANISMS)
@pytest.mark.parametrize(("eps", "m"), [(2.0, 400), (4.0, 1000)])
def test_white_box_audit_flags_a_broken_mechanism(mechanism, eps, m):
  """At a claim near what m canaries can certify too: the guess count that is tightest for
  the correct mechanism caps the bound below 4 for m = 1,000 (3.81 at 100 guesses), so the
  audit also guesses on all m canaries."""
  res = _audit(mechanism, "fast", seed=1, eps=eps, m=m)
  assert res["flagged"] and res["epsilon"] > res["claimed_epsilon"], res
  assert res["ceiling"] > res["claimed_epsilon"]  # the audit could see it


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_white_box_audit_never_flags_the_correct_mechanism(engine):
  res = _audit("correct", engine, seed=2)
  assert not res["flagged"] and res["epsilon"] <= res["claimed_epsilon"], res
  assert res["gdp_epsilon"] <= res["claimed_epsilon"]


def test_canaries_add_nothing_to_the_model_and_clip_to_c():
  """A canary's gradient is amplitude * e_j on the audit vector and zero on the model; the
  correct step clips it to exactly C."""
  import jax

  loss_fn, params, data = _tiny_problem()
  loss = audit.canary_loss(loss_fn, amplitude=10.0)
  full = {"model": params, "audit": jnp.zeros(5)}
  ex = {"x": jnp.zeros(8), "y": jnp.int32(0), "canary": jnp.int32(3)}
  g = jax.grad(loss)(full, ex, jax.random.key(0))
  assert np.array_equal(np.asarray(g["audit"]), [0, 0, 0, 10.0, 0])
  assert all(not np.any(np.asarray(x)) for x in jax.tree_util.tree_leaves(g["model"]))
  real = {"x": jnp.asarray(data["x"][0]), "y": jnp.asarray(data["y"][0]), "canary": jnp.int32(-1)}
  g = jax.grad(loss)(full, real, jax.random.key(0))
  assert not np.any(np.asarray(g["audit"]))
  with pytest.raises(ValueError, match="mechanism"):
    audit.white_box_audit(
      loss_fn,
      params,
      data,
      num_canaries=4,
      privacy=DPConfig(l2_norm_clip=1.0, noise_multiplier=1.0),
      sampling_prob=0.1,
      steps=1,
      model_optimizer=optax.sgd(0.1),
      delta=1e-5,
      mechanism="nope",
    )
