"""Tests for jaxdp.accounting: agreement with dp_accounting, published figures, calibration."""

from __future__ import annotations

import doctest
import itertools
import json
import math

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from jaxdp import accounting
from jaxdp.accounting import EpsilonTracker, PrivacyLedger

# Abadi et al. 2016 MNIST setting: batch 256 of 60000, sigma 1.1, 60 epochs, delta 1e-5.
MNIST_Q = 256 / 60000
MNIST_SIGMA = 1.1
MNIST_STEPS = 14062
DELTA = 1e-5


def _rdp_by_hand(*events: dp_accounting.DpEvent) -> float:
  acc = rdp_privacy_accountant.RdpAccountant()
  for e in events:
    acc.compose(e)
  return acc.get_epsilon(DELTA)


def _pld_by_hand(*events: dp_accounting.DpEvent) -> float:
  acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
  for e in events:
    acc.compose(e)
  return acc.get_epsilon(DELTA)


def _raw_dpsgd(q: float, sigma: float, steps: int) -> dp_accounting.DpEvent:
  return dp_accounting.SelfComposedDpEvent(
    dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
  )


def test_docstring_examples():
  result = doctest.testmod(accounting)
  assert result.attempted > 0 and result.failed == 0


def test_dpsgd_event_structure():
  event = accounting.dpsgd_event(0.01, 1.3, 77)
  assert event == _raw_dpsgd(0.01, 1.3, 77)


@pytest.mark.parametrize("q, sigma, steps", [(0.01, 1.0, 500), (0.1, 2.0, 50), (1.0, 5.0, 3)])
def test_epsilon_matches_dp_accounting_directly(q, sigma, steps):
  event = accounting.dpsgd_event(q, sigma, steps)
  raw = _raw_dpsgd(q, sigma, steps)
  assert accounting.epsilon(event, DELTA, "rdp") == pytest.approx(_rdp_by_hand(raw), rel=1e-12)
  assert accounting.epsilon(event, DELTA, "pld") == pytest.approx(_pld_by_hand(raw), rel=1e-12)


def test_epsilon_of_a_list_is_the_composition():
  e1, e2 = accounting.dpsgd_event(0.02, 1.0, 100), dp_accounting.GaussianDpEvent(10.0)
  for acc in accounting.ACCOUNTANTS:
    assert accounting.epsilon([e1, e2], DELTA, acc) == pytest.approx(
      accounting.epsilon(dp_accounting.ComposedDpEvent([e1, e2]), DELTA, acc), rel=1e-12
    )
  assert accounting.epsilon([e1, e2], DELTA, "rdp") == pytest.approx(
    _rdp_by_hand(e1, e2), rel=1e-12
  )


def test_published_mnist_figures():
  event = accounting.dpsgd_event(MNIST_Q, MNIST_SIGMA, MNIST_STEPS)
  assert accounting.epsilon(event, DELTA, "rdp") == pytest.approx(2.597, abs=1e-3)
  assert accounting.epsilon(event, DELTA, "pld") == pytest.approx(2.38, abs=0.01)
  assert accounting.epsilon(event, DELTA) == accounting.epsilon(event, DELTA, "pld")


def test_wrong_sampling_rate_would_show():
  # If q reached the accountant doubled (or halved), epsilon would move clearly.
  eps = accounting.epsilon(accounting.dpsgd_event(MNIST_Q, MNIST_SIGMA, MNIST_STEPS), DELTA, "rdp")
  eps_2q = accounting.epsilon(
    accounting.dpsgd_event(2 * MNIST_Q, MNIST_SIGMA, MNIST_STEPS), DELTA, "rdp"
  )
  eps_half = accounting.epsilon(
    accounting.dpsgd_event(MNIST_Q / 2, MNIST_SIGMA, MNIST_STEPS), DELTA, "rdp"
  )
  assert eps_2q > 1.5 * eps
  assert eps_half < eps / 1.5
  ledger = PrivacyLedger()
  ledger.add_dpsgd("classifier", sampling_prob=MNIST_Q, noise_multiplier=MNIST_SIGMA, steps=10)
  (entry,) = ledger.entries()
  assert entry["sampling_prob"] == MNIST_Q  # exactly, not rounded
  assert entry["noise_multiplier"] == MNIST_SIGMA
  (phase,) = ledger.event().events
  assert phase.event.sampling_probability == MNIST_Q
  assert phase.event.event.noise_multiplier == MNIST_SIGMA


def test_no_noise_is_infinite_and_no_steps_is_zero():
  for acc in accounting.ACCOUNTANTS:
    assert accounting.epsilon(accounting.dpsgd_event(0.01, 0.0, 10), DELTA, acc) == math.inf
    assert accounting.epsilon(accounting.dpsgd_event(0.01, 1.0, 0), DELTA, acc) == 0.0
    assert PrivacyLedger().epsilon(DELTA, acc) == 0.0


def test_ledger_two_phases_equals_composition_by_hand():
  ledger = PrivacyLedger()
  ledger.add_gaussian("label_counts", noise_multiplier=50.0)
  ledger.add_dpsgd("vae", sampling_prob=0.02, noise_multiplier=1.2, steps=300)
  ledger.add_dpsgd("classifier", sampling_prob=0.005, noise_multiplier=0.9, steps=800)
  by_hand = (
    dp_accounting.GaussianDpEvent(50.0),
    _raw_dpsgd(0.02, 1.2, 300),
    _raw_dpsgd(0.005, 0.9, 800),
  )
  assert ledger.epsilon(DELTA, "rdp") == pytest.approx(_rdp_by_hand(*by_hand), rel=1e-12)
  assert ledger.epsilon(DELTA, "pld") == pytest.approx(_pld_by_hand(*by_hand), rel=1e-9)
  # The composition costs more than either phase alone.
  assert ledger.epsilon(DELTA, "rdp") > _rdp_by_hand(by_hand[1])
  assert ledger.epsilon(DELTA, "rdp") > _rdp_by_hand(by_hand[2])
  assert len(ledger) == 3
  assert [e["name"] for e in ledger.entries()] == ["label_counts", "vae", "classifier"]


def test_ledger_incremental_steps_and_conflicts():
  a, b = PrivacyLedger(), PrivacyLedger()
  a.add_dpsgd("clf", 0.01, 1.0, 100)
  a.add_dpsgd("clf", 0.01, 1.0, 150)
  b.add_dpsgd("clf", 0.01, 1.0, 250)
  assert a.entries() == b.entries()
  assert a.epsilon(DELTA, "rdp") == b.epsilon(DELTA, "rdp")
  with pytest.raises(ValueError, match="name 'clf'"):
    a.add_dpsgd("clf", 0.02, 1.0, 10)
  with pytest.raises(ValueError, match="name 'clf'"):
    a.add_gaussian("clf", 1.0)
  a.add_gaussian("counts", 10.0)
  a.add_gaussian("counts", 10.0, count=2)
  assert a.entries()[-1]["count"] == 3
  a.add_event("custom", dp_accounting.LaplaceDpEvent(2.0))
  with pytest.raises(ValueError, match="name 'custom'"):
    a.add_event("custom", dp_accounting.LaplaceDpEvent(2.0))
  with pytest.raises(TypeError, match="event"):
    a.add_event("bad", 3.0)
  with pytest.raises(ValueError, match="name"):
    a.add_dpsgd("", 0.01, 1.0, 1)


def test_ledger_serialises_and_round_trips():
  ledger = PrivacyLedger()
  ledger.add_dpsgd("vae", 0.01, 1.1, 200)
  ledger.add_gaussian("counts", 20.0, count=2)
  ledger.add_event("extra", accounting.dpsgd_event(0.05, 3.0, 10))
  text = json.dumps(ledger.to_dict())
  restored = PrivacyLedger.from_dict(json.loads(text))
  assert restored.entries() == ledger.entries()
  assert restored.event() == ledger.event()
  assert restored.epsilon(DELTA, "rdp") == ledger.epsilon(DELTA, "rdp")


def test_calibration_rdp_meets_target_within_one_percent():
  target = 2.0
  sigma = accounting.calibrate_noise_multiplier(target, DELTA, MNIST_Q, MNIST_STEPS, "rdp")
  eps = accounting.epsilon(accounting.dpsgd_event(MNIST_Q, sigma, MNIST_STEPS), DELTA, "rdp")
  assert 0.99 * target <= eps <= target


def test_calibration_pld_meets_target_within_one_percent():
  target, q, steps = 1.5, 0.01, 1000
  sigma = accounting.calibrate_noise_multiplier(target, DELTA, q, steps)  # PLD by default
  eps = accounting.epsilon(accounting.dpsgd_event(q, sigma, steps), DELTA, "pld")
  assert 0.99 * target <= eps <= target
  # PLD is tighter than RDP, so it needs less noise for the same budget.
  assert sigma < accounting.calibrate_noise_multiplier(target, DELTA, q, steps, "rdp")


def test_calibrate_then_recompute_returns_the_noise():
  target = accounting.epsilon(
    accounting.dpsgd_event(MNIST_Q, MNIST_SIGMA, MNIST_STEPS), DELTA, "rdp"
  )
  sigma = accounting.calibrate_noise_multiplier(target, DELTA, MNIST_Q, MNIST_STEPS, "rdp")
  assert MNIST_SIGMA - 1e-6 <= sigma <= MNIST_SIGMA * 1.02
  tight = accounting.calibrate_noise_multiplier(
    target, DELTA, MNIST_Q, MNIST_STEPS, "rdp", tolerance=1e-4
  )
  assert tight == pytest.approx(MNIST_SIGMA, rel=1e-3)


@pytest.mark.parametrize("target", [1e-4, 0.0, -1.0, 1e12])
def test_unreachable_target_raises(target):
  with pytest.raises(ValueError, match="target_epsilon"):
    accounting.calibrate_noise_multiplier(target, DELTA, 0.5, 10000, "rdp")


def test_unreachable_target_raises_for_pld():
  with pytest.raises(ValueError, match="target_epsilon"):
    accounting.calibrate_noise_multiplier(1e-4, DELTA, 0.5, 10000, "pld")


@pytest.mark.parametrize("q", [0.0, -0.1, 1.5, math.nan, "0.1"])
def test_bad_sampling_prob(q):
  with pytest.raises(ValueError, match="sampling_prob"):
    accounting.dpsgd_event(q, 1.0, 10)
  with pytest.raises(ValueError, match="sampling_prob"):
    accounting.calibrate_noise_multiplier(1.0, DELTA, q, 10)
  with pytest.raises(ValueError, match="sampling_prob"):
    PrivacyLedger().add_dpsgd("x", q, 1.0, 10)
  with pytest.raises(ValueError, match="sampling_prob"):
    EpsilonTracker(q, 1.0, DELTA)


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 2.0, math.nan])
def test_bad_delta(delta):
  event = accounting.dpsgd_event(0.01, 1.0, 10)
  for acc in accounting.ACCOUNTANTS:
    with pytest.raises(ValueError, match="delta"):
      accounting.epsilon(event, delta, acc)
  with pytest.raises(ValueError, match="delta"):
    accounting.calibrate_noise_multiplier(1.0, delta, 0.01, 10)
  with pytest.raises(ValueError, match="delta"):
    EpsilonTracker(0.01, 1.0, delta)
  with pytest.raises(ValueError, match="delta"):
    PrivacyLedger().epsilon(delta)


@pytest.mark.parametrize("sigma", [-1.0, -1e-9, math.inf, math.nan])
def test_bad_noise_multiplier(sigma):
  with pytest.raises(ValueError, match="noise_multiplier"):
    accounting.dpsgd_event(0.01, sigma, 10)
  with pytest.raises(ValueError, match="noise_multiplier"):
    PrivacyLedger().add_gaussian("x", sigma)
  with pytest.raises(ValueError, match="noise_multiplier"):
    EpsilonTracker(0.01, sigma, DELTA)


@pytest.mark.parametrize("steps", [-1, 1.5, True, "3"])
def test_bad_steps(steps):
  with pytest.raises(ValueError, match="steps"):
    accounting.dpsgd_event(0.01, 1.0, steps)
  with pytest.raises(ValueError, match="steps"):
    EpsilonTracker(0.01, 1.0, DELTA).epsilon(steps)


def test_bad_accountant_and_tolerance():
  event = accounting.dpsgd_event(0.01, 1.0, 10)
  with pytest.raises(ValueError, match="accountant"):
    accounting.epsilon(event, DELTA, "gdp")
  with pytest.raises(ValueError, match="tolerance"):
    accounting.calibrate_noise_multiplier(1.0, DELTA, 0.01, 10, tolerance=0.0)
  with pytest.raises(ValueError, match="steps"):
    accounting.calibrate_noise_multiplier(1.0, DELTA, 0.01, 0)


@pytest.mark.parametrize("q, sigma", [(MNIST_Q, MNIST_SIGMA), (0.1, 0.7), (1.0, 4.0)])
def test_tracker_equals_rdp_accountant(q, sigma):
  tracker = EpsilonTracker(q, sigma, DELTA)
  for steps in (0, 1, 10, 1000, MNIST_STEPS):
    expected = _rdp_by_hand(_raw_dpsgd(q, sigma, steps)) if steps else 0.0
    assert tracker.epsilon(steps) == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_tracker_is_monotone_and_includes_ledger():
  tracker = EpsilonTracker(MNIST_Q, MNIST_SIGMA, DELTA)
  values = [tracker.epsilon(t) for t in range(0, 20001, 500)]
  assert all(b >= a for a, b in itertools.pairwise(values))
  assert values[-1] > values[1] > 0
  ledger = PrivacyLedger()
  ledger.add_dpsgd("vae", 0.02, 1.0, 400)
  ledger.add_gaussian("counts", 30.0)
  with_ledger = EpsilonTracker(MNIST_Q, MNIST_SIGMA, DELTA, ledger=ledger)
  for steps in (1, 5000):
    expected = _rdp_by_hand(ledger.event(), _raw_dpsgd(MNIST_Q, MNIST_SIGMA, steps))
    assert with_ledger.epsilon(steps) == pytest.approx(expected, rel=1e-6)
    assert with_ledger.epsilon(steps) > tracker.epsilon(steps)
  # The final number comes from PLD on the same event, and is tighter.
  final = accounting.epsilon(tracker.event(MNIST_STEPS), DELTA, "pld")
  assert final == pytest.approx(2.38, abs=0.01)
  assert final < tracker.epsilon(MNIST_STEPS)
