"""Poisson batches: right inclusion rate, constant shapes, independence, reproducibility."""

from __future__ import annotations

import numpy as np
import pytest

from jaxdp.sampling import PoissonSampler, ShuffledSampler


def draw(sampler, steps):
  inc = np.zeros((steps, sampler.num_examples), bool)
  for s in range(steps):
    for b in sampler.sample():
      assert b.indices.shape == (sampler.physical_batch_size,)
      assert b.mask.shape == (sampler.physical_batch_size,)
      assert b.indices.dtype == np.int32
      inc[s, b.indices[b.mask]] = True
      # padding rows carry mask False and a valid index
      assert np.all(b.indices[~b.mask] == 0)
  return inc


def test_inclusion_rate_matches_q():
  n, q, steps = 500, 0.06, 4000
  inc = draw(PoissonSampler(n, sampling_prob=q, seed=0), steps)
  rate = inc.mean(axis=0)
  se = np.sqrt(q * (1 - q) / steps)
  assert abs(rate.mean() - q) < 5 * se / np.sqrt(n)
  assert np.all(np.abs(rate - q) < 5 * se)  # every example, not just on average


def test_inclusions_are_independent():
  n, q, steps = 200, 0.1, 5000
  inc = draw(PoissonSampler(n, sampling_prob=q, seed=1), steps).astype(float)
  corr = np.corrcoef(inc.T)
  off = corr[~np.eye(n, dtype=bool)]
  # Under independence off-diagonal correlations are ~N(0, 1/steps). A fixed-size sampler
  # would make them all negative (-1/(n-1) on average), which this also rules out.
  assert abs(off.mean()) < 3 / np.sqrt(steps * len(off) / n)
  assert np.abs(off).max() < 6 / np.sqrt(steps)
  # Consecutive steps are independent too.
  lag = np.mean([np.corrcoef(inc[:-1, j], inc[1:, j])[0, 1] for j in range(n)])
  assert abs(lag) < 4 / np.sqrt(steps * n)


def test_overflow_goes_to_extra_physical_batches_not_dropped():
  n = 1000
  s = PoissonSampler(n, sampling_prob=0.5, physical_batch_size=64, seed=2)
  batches = s.sample()
  assert len(batches) > 1
  idx = np.concatenate([b.indices[b.mask] for b in batches])
  assert len(idx) == len(set(idx.tolist()))
  assert 400 < len(idx) < 600


def test_same_seed_same_batches():
  a = PoissonSampler(300, expected_batch_size=30, seed=5)
  b = PoissonSampler(300, expected_batch_size=30, seed=5)
  for _ in range(5):
    for x, y in zip(a.sample(), b.sample(), strict=True):
      np.testing.assert_array_equal(x.indices, y.indices)


def test_default_physical_size_rarely_overflows():
  s = PoissonSampler(60000, expected_batch_size=256)
  assert s.physical_batch_size >= 256 + 4 * 15
  assert s.steps_per_epoch == 234


def test_shuffled_sampler_warns_and_covers_epoch():
  with pytest.warns(UserWarning, match="assumes Poisson"):
    s = ShuffledSampler(100, batch_size=10, seed=0)
  seen = np.concatenate([s.sample()[0].indices for _ in range(10)])
  assert sorted(seen.tolist()) == list(range(100))


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(sampling_prob=0.0), "sampling_prob"),
    (dict(sampling_prob=1.5), "sampling_prob"),
    (dict(expected_batch_size=0), "expected_batch_size"),
    (dict(expected_batch_size=1000), "expected_batch_size"),
    (dict(sampling_prob=0.1, physical_batch_size=0), "physical_batch_size"),
  ],
)
def test_bad_inputs(kwargs, match):
  with pytest.raises(ValueError, match=match):
    PoissonSampler(100, **kwargs)
