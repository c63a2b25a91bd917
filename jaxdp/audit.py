"""Empirical privacy: membership-inference attacks and their metrics, lower bounds on epsilon
from attack outcomes, and white-box gradient canaries for one-run audits of DP-SGD.

A DP guarantee is an upper bound on what any attacker can learn about one example. An audit
runs a concrete attacker and turns its success into a LOWER bound: "with confidence 1 - p,
the mechanism is not (epsilon, delta)-DP for any epsilon below this". A correct mechanism's
lower bound stays at or below its claimed epsilon (up to the 1 - confidence chance that the
statistics mislead); a lower bound above the claim exposes a broken mechanism (no clipping,
noise too small, a wrong sampling rate in the accountant).

Scores follow one convention throughout: a higher score means "more likely a member".

Pieces (pure functions of numpy arrays unless noted):

* Metrics: :func:`roc_curve`, :func:`auc`, :func:`tpr_at_fpr`.
* Attacks: :func:`loss_threshold_scores` (Yeom et al. 2018), :func:`logit_confidence` and
  :func:`lira_scores` (LiRA, Carlini et al. 2022, online and offline).
* Bounds: :func:`one_run_epsilon` (Steinke, Nasr & Jagielski 2023: m canaries in ONE
  training run, each included with probability 1/2), :func:`one_run_ceiling` (the most
  that m canaries can certify), :func:`gdp_one_run_mu` (the f-DP one-run audit of
  Mahloujifar, Melis & Chaudhuri 2024, with the Gaussian-DP family), :func:`audit_scores`
  (guesses from scores, both bounds, corrected for the guess counts tried), and
  :func:`clopper_pearson_epsilon` (the classic two-world bound for audits of many runs).
* White-box canaries for DP-SGD: :func:`canary_loss` puts m "Dirac" canaries beside a
  model, :func:`canary_observations` and :func:`canary_llr_scores` turn the released
  iterates into per-canary likelihood-ratio scores, and :func:`make_broken_step` builds the
  two deliberately broken mechanisms an audit must flag. They are for audits and their
  tests only: nothing in the library trains with them.

References:
  Yeom, Giacomelli, Fredrikson, Jha, "Privacy risk in machine learning", CSF 2018.
  Carlini, Chien, Nasr, Song, Terzis, Tramer, "Membership inference attacks from first
  principles", S&P 2022, arXiv:2112.03570.
  Jagielski, Ullman, Oprea, "Auditing differentially private machine learning: how private
  is private SGD?", NeurIPS 2020, arXiv:2006.07709.
  Nasr, Hayes, Steinke, Balle, Tramer, Jagielski, Carlini, Terzis, "Tight auditing of
  differentially private machine learning", USENIX Security 2023, arXiv:2302.07956.
  Steinke, Nasr, Jagielski, "Privacy auditing with one (1) training run", NeurIPS 2023,
  arXiv:2305.08846.
  Mahloujifar, Melis, Chaudhuri, "Auditing f-differential privacy in one run", ICML 2025,
  arXiv:2410.22235.
  Dong, Roth, Su, "Gaussian differential privacy", JRSS-B 2022, arXiv:1905.02383.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import optimize, special, stats

from jaxdp import _validate, accounting, parallel, sampling
from jaxdp.clipping import reference
from jaxdp.clipping._common import ClippedSum
from jaxdp.keys import KeySource
from jaxdp.noise import privatize, sensitivity
from jaxdp.step import DPConfig, Step, init_state, make_step

__all__ = [
  "BROKEN_MECHANISMS",
  "auc",
  "audit_scores",
  "canary_llr_scores",
  "canary_loss",
  "canary_observations",
  "canary_optimizer",
  "clopper_pearson_epsilon",
  "gdp_epsilon",
  "gdp_one_run_mu",
  "lira_scores",
  "logit_confidence",
  "loss_threshold_scores",
  "make_broken_step",
  "observe_canaries",
  "one_run_ceiling",
  "one_run_epsilon",
  "one_run_p_value",
  "plan_guess_count",
  "roc_curve",
  "tpr_at_fpr",
  "white_box_audit",
]

PyTree = Any


def _scores(name: str, x: Any) -> np.ndarray:
  a = np.asarray(x, np.float64).ravel()
  if a.size == 0:
    raise ValueError(f"{name} must hold at least one score")
  if not np.all(np.isfinite(a)):
    raise ValueError(f"{name} must be finite")
  return a


# -- membership-inference metrics ------------------------------------------------------------


def roc_curve(member_scores: Any, nonmember_scores: Any) -> tuple[np.ndarray, np.ndarray]:
  """The ROC curve of "member if score >= t" over every threshold t.

  Returns:
    ``(fpr, tpr)``, non-decreasing, from (0, 0) to (1, 1): one point per distinct score
    (ties move both rates at once).
  """
  pos = _scores("member_scores", member_scores)
  neg = _scores("nonmember_scores", nonmember_scores)
  thresholds = np.unique(np.concatenate([pos, neg]))[::-1]
  pos_sorted, neg_sorted = np.sort(pos), np.sort(neg)
  tp = len(pos) - np.searchsorted(pos_sorted, thresholds, side="left")
  fp = len(neg) - np.searchsorted(neg_sorted, thresholds, side="left")
  fpr = np.concatenate([[0.0], fp / len(neg)])
  tpr = np.concatenate([[0.0], tp / len(pos)])
  return fpr, tpr


def auc(member_scores: Any, nonmember_scores: Any) -> float:
  """Area under the ROC curve: P[member score > non-member score] + P[tie] / 2 (the
  Mann-Whitney statistic; 0.5 is chance)."""
  pos = _scores("member_scores", member_scores)
  neg = _scores("nonmember_scores", nonmember_scores)
  ranks = stats.rankdata(np.concatenate([pos, neg]))  # average ranks for ties
  u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
  return float(u / (len(pos) * len(neg)))


def tpr_at_fpr(member_scores: Any, nonmember_scores: Any, fpr: float) -> float:
  """The highest true-positive rate over thresholds whose false-positive rate is <= ``fpr``
  (no interpolation between thresholds: what a real attacker could pick)."""
  _validate.probability("fpr", fpr, low_open=False, high_open=False)
  f, t = roc_curve(member_scores, nonmember_scores)
  return float(t[f <= fpr + 1e-12].max())


# -- attacks ---------------------------------------------------------------------------------


def loss_threshold_scores(losses: Any) -> np.ndarray:
  """The loss-threshold attack (Yeom et al. 2018): score = -loss (members are fitted
  better, so a low loss means "member")."""
  return -np.asarray(losses, np.float64)


def logit_confidence(logits: Any, labels: Any) -> np.ndarray:
  """LiRA's statistic: the logit of the true class's probability,
  ``phi = log p_y - log(1 - p_y) = z_y - logsumexp_{j != y} z_j`` (computed from the
  logits, so it stays finite when p_y rounds to 1). Roughly Gaussian across training runs,
  which LiRA's test assumes."""
  z = np.asarray(logits, np.float64)
  y = np.asarray(labels, np.int64)
  zy = np.take_along_axis(z, y[..., None], axis=-1)[..., 0]
  others = np.where(np.arange(z.shape[-1]) == y[..., None], -np.inf, z)
  return zy - special.logsumexp(others, axis=-1)


def lira_scores(
  target: Any,
  shadow: Any,
  shadow_in: Any,
  *,
  online: bool = True,
  global_variance: bool = False,
  shadow_used: Any = None,
  min_std: float = 1e-3,
) -> np.ndarray:
  """Likelihood-ratio attack (LiRA, Carlini et al. 2022) from shadow models.

  For each candidate example x, the shadow models trained with x ("in") and without it
  ("out") give Gaussian fits N(mu_in, s_in^2), N(mu_out, s_out^2) of its statistic ``phi``
  (:func:`logit_confidence`). The target model's ``phi`` is scored as

    online:  log N(phi; mu_in, s_in^2) - log N(phi; mu_out, s_out^2)
    offline: log Phi((phi - mu_out) / s_out)   (one-sided: "phi is unusually high")

  Args:
    target: (n,) the target model's statistic on n candidates.
    shadow: (S, n) each shadow model's statistic on the same candidates.
    shadow_in: (S, n) bool, whether the candidate was in that shadow model's training set.
    online: the two-sided test (needs "in" shadows); else the offline one (only "out").
    global_variance: one variance per side pooled over all candidates (Carlini et al.
      recommend it with few shadow models).
    shadow_used: optional (S, n) bool, which shadow models score each candidate (default
      all). With few shadows, give members and non-members as many "in" as "out" shadows:
      unequal counts bias the scores (the mean fitted from fewer models is further from
      any model's statistic), which with no signal pushes the AUC below 0.5.
    min_std: floor on the fitted standard deviations.

  Returns:
    (n,) scores, higher = more likely a member.

  Raises:
    ValueError: if a candidate lacks the shadow models its test needs.
  """
  phi = np.asarray(target, np.float64)
  s = np.asarray(shadow, np.float64)
  inn = np.asarray(shadow_in, bool)
  used = np.ones_like(inn) if shadow_used is None else np.asarray(shadow_used, bool)
  if s.ndim != 2 or not (s.shape == inn.shape == used.shape) or s.shape[1] != phi.shape[0]:
    raise ValueError(
      f"shadow, shadow_in and shadow_used must be (S, n) with n = len(target) = "
      f"{phi.shape[0]}, got {s.shape}, {inn.shape} and {used.shape}"
    )

  def fit(which: np.ndarray, side: str) -> tuple[np.ndarray, np.ndarray]:
    count = which.sum(0)
    if np.any(count < 1):
      raise ValueError(f"lira_scores: every candidate needs at least one '{side}' shadow model")
    mu = np.where(which, s, 0.0).sum(0) / count
    dev = np.where(which, (s - mu) ** 2, 0.0)
    if global_variance:
      var = np.full_like(mu, dev.sum() / max(which.sum() - 1, 1))
    else:
      var = dev.sum(0) / np.maximum(count - 1, 1)
    return mu, np.maximum(np.sqrt(var), min_std)

  mu_out, sd_out = fit(~inn & used, "out")
  if not online:
    return stats.norm.logcdf((phi - mu_out) / sd_out)
  mu_in, sd_in = fit(inn & used, "in")
  return stats.norm.logpdf(phi, mu_in, sd_in) - stats.norm.logpdf(phi, mu_out, sd_out)


# -- epsilon lower bounds: one run ---------------------------------------------------------


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
  """P[at least v of r guesses correct] under the hypothesis "(epsilon, delta)-DP"
  (Steinke, Nasr & Jagielski 2023, Theorem 5.2).

  m canaries are each included independently with probability 1/2; after ONE run the
  auditor guesses "in" or "out" for r of them (abstaining on the rest) and v guesses are
  right. Under (epsilon, 0)-DP the count of right guesses is stochastically dominated by
  Binomial(r, p_eps) with ``p_eps = e^eps / (1 + e^eps)`` (randomized response). With
  delta > 0 the tail gains ``2 m delta alpha``, where
  ``alpha = max_{1 <= i <= v} P[v - i <= Binomial(r, p_eps) < v] / i``.

  Returns:
    The p-value, in [0, 1].
  """
  if not (0 <= v <= r <= m):
    raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
  _validate.non_negative("epsilon", epsilon)
  _validate.probability("delta", delta, low_open=False, high_open=False)
  p = special.expit(epsilon)
  tail = stats.binom.sf(v - 1, r, p)
  if v == 0 or delta == 0:
    return float(min(1.0, tail))
  i = np.arange(1, v + 1)
  alpha = np.max(np.cumsum(stats.binom.pmf(v - i, r, p)) / i)
  return float(min(1.0, tail + 2.0 * m * delta * alpha))


def one_run_epsilon(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
  """The largest epsilon that v right guesses of r (of m canaries) rule out: the mechanism
  is not (epsilon', delta)-DP for any epsilon' below it, with probability >= ``confidence``
  (bisection on :func:`one_run_p_value`, which grows with epsilon: a larger epsilon makes
  right guesses likelier). 0 when nothing is ruled out."""
  _validate.probability("confidence", confidence)
  p = 1.0 - confidence
  if one_run_p_value(m, r, v, 0.0, delta) >= p:
    return 0.0
  lo, hi = 0.0, 1.0
  while one_run_p_value(m, r, v, hi, delta) < p:
    lo, hi = hi, 2.0 * hi
    if hi > 1e3:
      return math.inf
  for _ in range(60):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if one_run_p_value(m, r, v, mid, delta) < p else (lo, mid)
  return lo


def _guess_counts(m: int) -> list[int]:
  """Guess counts tried for the ceiling: a log grid of r in [1, m] with m itself."""
  return sorted({*np.unique(np.geomspace(1, m, 48).astype(int)).tolist(), m})


def one_run_ceiling(m: int, delta: float, confidence: float = 0.95) -> float:
  """The most m canaries can certify in one run: :func:`one_run_epsilon` with every guess
  right, at the best number of guesses (e.g. 3.49 / 5.78 / 7.83 for m = 100 / 1,000 /
  10,000 at delta 1e-5, 95% confidence)."""
  return max(one_run_epsilon(m, r, r, delta, confidence) for r in _guess_counts(m))


def _gdp_consistent(mu: float, m: int, c: int, guesses: int, p: float) -> bool:
  """Whether c right of ``guesses`` guesses (of m canaries) has probability >= p under some
  mu-GDP mechanism: the recursion of Mahloujifar et al. (2024, Algorithm 3, abstentions),
  run from the top count down with the inverse of ``x -> 1 - f_mu(x)``,
  ``x -> Phi(Phi^{-1}(x) - mu)``; infeasible (False) when the mass it needs exceeds the
  guessed fraction ``guesses / m``."""
  tau = p * guesses / m
  r, h = tau * c / guesses, tau * (guesses - c) / guesses
  for i in range(c - 1, -1, -1):
    h_next = max(h, float(special.ndtr(special.ndtri(r) - mu)))
    r += i / (guesses - i) * (h_next - h)
    h = h_next
  return r + h <= guesses / m


def gdp_one_run_mu(m: int, c: int, guesses: int, confidence: float = 0.95) -> float:
  """The f-DP one-run audit with the Gaussian-DP family (Mahloujifar, Melis & Chaudhuri
  2024): the largest mu such that no mu'-GDP mechanism (mu' < mu) makes c right guesses of
  ``guesses`` (of m canaries, each included with probability 1/2) likely at the
  ``1 - confidence`` level. 0 when nothing is ruled out.

  mu-GDP is the privacy of one Gaussian mechanism with sensitivity / noise = mu, and, by
  the central limit theorem of Dong, Roth & Su, close to that of many steps of DP-SGD. The
  epsilon of mu-GDP at delta is :func:`gdp_epsilon`; it is a lower bound on the mechanism's
  epsilon under the assumption that its trade-off curve is Gaussian (DP-SGD's nearly is),
  which :func:`one_run_epsilon` does not need.
  """
  _validate.probability("confidence", confidence)
  if not (0 <= c <= guesses <= m) or guesses == 0:
    raise ValueError(f"need 0 <= c <= guesses <= m and guesses > 0, got m={m}, {c}, {guesses}")
  p = 1.0 - confidence
  lo, hi = 0.0, 1.0
  if _gdp_consistent(lo, m, c, guesses, p):
    return 0.0
  while not _gdp_consistent(hi, m, c, guesses, p):
    lo, hi = hi, 2.0 * hi
    if hi > 64:
      return math.inf
  for _ in range(40):
    mid = 0.5 * (lo + hi)
    lo, hi = (lo, mid) if _gdp_consistent(mid, m, c, guesses, p) else (mid, hi)
  return lo


def gdp_epsilon(mu: float, delta: float) -> float:
  """The epsilon of mu-GDP at delta (Dong, Roth & Su, Corollary 2.13): the root of
  ``Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) = delta``."""
  _validate.non_negative("mu", mu)
  _validate.probability("delta", delta)
  if mu == 0:
    return 0.0
  if math.isinf(mu):
    return math.inf
  f = lambda e: (
    stats.norm.cdf(-e / mu + mu / 2) - math.exp(e) * stats.norm.cdf(-e / mu - mu / 2) - delta
  )
  if f(0.0) <= 0:
    return 0.0
  hi = 1.0
  while f(hi) > 0:
    hi *= 2.0
  return float(optimize.brentq(f, 0.0, hi, xtol=1e-10))


def audit_scores(
  scores: Any,
  included: Any,
  delta: float,
  *,
  confidence: float = 0.95,
  guess_counts: Sequence[int] | None = None,
) -> dict[str, Any]:
  """A one-run audit from per-canary scores: guess "in" for the k highest scores and "out"
  for the k lowest, abstain on the rest, and turn the right guesses into lower bounds.

  Every k in ``guess_counts`` is tried, and the best bound reported; each is computed at
  confidence ``1 - (1 - confidence) / len(guess_counts)`` (Bonferroni), so the reported
  bound holds at ``confidence`` despite the choice of k.

  Args:
    scores: (m,) one score per canary, higher = "in".
    included: (m,) bool, which canaries were in the training run (each with probability
      1/2, drawn independently of everything else).
    delta: the delta of the bound.
    confidence: the confidence of the reported bounds.
    guess_counts: the k to try (each 2k <= m); default a grid from m/100 to m/2.

  Returns:
    ``epsilon`` (Steinke et al., valid for any mechanism), ``gdp_mu`` and ``gdp_epsilon``
    (Mahloujifar et al. with the GDP family), the ``k``, ``guesses`` and ``correct`` of
    each, the ``ceiling`` (:func:`one_run_ceiling`: the most m canaries can certify), the
    ``ceiling_at_k`` and ``gdp_ceiling_at_k`` (both bounds with every guess right at the
    guess counts tried) and ``m``.
  """
  s = _scores("scores", scores)
  inc = np.asarray(included, bool).ravel()
  if inc.shape != s.shape:
    raise ValueError(f"included must have one flag per score ({s.shape[0]}), got {inc.shape}")
  m = s.shape[0]
  if guess_counts is None:
    guess_counts = sorted({max(1, round(m * f)) for f in (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)})
    guess_counts = [k for k in guess_counts if 2 * k <= m] or [m // 2]
  ks = [int(k) for k in guess_counts]
  if any(k < 1 or 2 * k > m for k in ks):
    raise ValueError(f"guess_counts must be in [1, m/2] = [1, {m // 2}], got {ks}")
  conf = 1.0 - (1.0 - confidence) / len(ks)
  order = np.argsort(-s, kind="stable")
  best: dict[str, Any] = {"epsilon": 0.0, "gdp_mu": 0.0}
  for k in ks:
    right = int(inc[order[:k]].sum() + (~inc[order[m - k :]]).sum())
    eps = one_run_epsilon(m, 2 * k, right, delta, conf)
    mu = gdp_one_run_mu(m, right, 2 * k, conf)
    if eps > best["epsilon"] or "k" not in best:
      best.update(epsilon=eps, k=k, guesses=2 * k, correct=right)
    if mu > best["gdp_mu"] or "gdp_k" not in best:
      best.update(gdp_mu=mu, gdp_k=k, gdp_correct=right)
  best["gdp_epsilon"] = gdp_epsilon(best["gdp_mu"], delta)
  best["ceiling"] = one_run_ceiling(m, delta, confidence)
  best["ceiling_at_k"] = max(one_run_epsilon(m, 2 * k, 2 * k, delta, conf) for k in ks)
  best["gdp_ceiling_at_k"] = gdp_epsilon(
    max(gdp_one_run_mu(m, 2 * k, 2 * k, conf) for k in ks), delta
  )
  best.update(m=m, delta=delta, confidence=confidence, guess_counts=ks)
  return best


def plan_guess_count(
  num_canaries: int,
  sampling_prob: float,
  noise_multiplier: float,
  steps: int,
  delta: float,
  *,
  confidence: float = 0.95,
  candidates: Sequence[int] | None = None,
  trials: int = 20,
  seed: int = 0,
) -> int:
  """The number of guesses per side k for a white-box canary audit, chosen BEFORE the run
  by simulating the claimed mechanism (public: m, q, sigma, T) with a public seed: the k
  whose median Gaussian-DP bound over ``trials`` simulated runs is highest. Fixing k in
  advance spares :func:`audit_scores` the Bonferroni correction of trying several.
  """
  m = num_canaries
  if candidates is None:
    fractions = (0.01, 0.02, 0.03, 0.04, 0.05, 0.07, 0.1, 0.15, 0.2)
    candidates = sorted({max(1, round(m * f)) for f in fractions if 2 * round(m * f) <= m})
  rng = np.random.default_rng(seed)
  results: dict[int, list[float]] = {k: [] for k in candidates}
  for _ in range(trials):
    included = rng.random(m) < 0.5
    x = (rng.random((steps, m)) < sampling_prob) & included
    x = x + noise_multiplier * rng.standard_normal((steps, m))
    order = np.argsort(-canary_llr_scores(x, sampling_prob, noise_multiplier))
    for k in candidates:
      right = int(included[order[:k]].sum() + (~included[order[m - k :]]).sum())
      results[k].append(gdp_one_run_mu(m, right, 2 * k, confidence))
  return max(candidates, key=lambda k: (np.median(results[k]), -k))


# -- epsilon lower bounds: many runs -------------------------------------------------------


def clopper_pearson_epsilon(
  false_positives: int,
  negatives: int,
  false_negatives: int,
  positives: int,
  delta: float,
  confidence: float = 0.95,
) -> float:
  """The two-world lower bound (Jagielski et al. 2020; Nasr et al. 2021) for an attack run
  on many independent trainings, ``positives`` with the target and ``negatives`` without.

  (epsilon, delta)-DP forces ``FPR + e^eps FNR >= 1 - delta`` and
  ``FNR + e^eps FPR >= 1 - delta``. With Clopper-Pearson upper bounds on both rates (each
  at ``(1 - confidence) / 2``):
  ``eps >= max(log((1 - delta - FPR_hi) / FNR_hi), log((1 - delta - FNR_hi) / FPR_hi))``.
  """
  for name, k, n in (
    ("false_positives", false_positives, negatives),
    ("false_negatives", false_negatives, positives),
  ):
    if not (0 <= k <= n) or n < 1:
      raise ValueError(f"{name} must be in [0, n] with n >= 1, got {k} of {n}")
  alpha = (1.0 - confidence) / 2

  def upper(k: int, n: int) -> float:
    return 1.0 if k == n else float(stats.beta.ppf(1 - alpha, k + 1, n - k))

  fpr, fnr = upper(false_positives, negatives), upper(false_negatives, positives)
  bounds = [0.0]
  for a, b in ((fpr, fnr), (fnr, fpr)):
    if 1 - delta - a > 0 and b > 0:
      bounds.append(math.log((1 - delta - a) / b))
  return max(bounds)


# -- white-box gradient canaries -----------------------------------------------------------


def canary_loss(
  loss_fn: Callable[..., Any], amplitude: float, *, has_aux: bool = False
) -> Callable[..., Any]:
  """Adds m white-box "Dirac" canaries to a per-example loss.

  The wrapped loss takes ``params = {"model": model_params, "audit": a}`` with ``a`` a
  vector of m zeros, and examples with an int field ``"canary"``: -1 for a real example
  (its loss is ``loss_fn``'s, with no gradient on ``a``), j >= 0 for canary j, whose loss is
  ``amplitude * a[j]``: a gradient of norm ``amplitude`` on coordinate j of ``a`` alone and
  none on the model. With ``amplitude >= C`` a correct step clips each canary to exactly
  C, the worst case of the sensitivity; a step without clipping lets ``amplitude`` through.
  The model never reads ``a``, so the canaries change nothing else of the run.
  """
  _validate.positive("amplitude", amplitude)

  def wrapped(params: PyTree, example: PyTree, rng: jax.Array) -> Any:
    j = example["canary"]
    out = loss_fn(params["model"], example, rng)
    real, aux = out if has_aux else (out, None)
    canary = amplitude * params["audit"][jnp.maximum(j, 0)]
    loss = jnp.where(j >= 0, canary.astype(real.dtype), real)
    return (loss, aux) if has_aux else loss

  return wrapped


def canary_optimizer(model_optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
  """The model's optimiser on ``params["model"]`` and plain SGD with step 1 on the canary
  coordinates ``params["audit"]``, whose change per step is then exactly minus the released
  (noisy, normalised) gradient there: what a white-box auditor sees of each step."""
  labels = lambda params: {
    "model": jax.tree_util.tree_map(lambda _: "model", params["model"]),
    "audit": "audit",
  }
  return optax.multi_transform({"model": model_optimizer, "audit": optax.sgd(1.0)}, labels)


def canary_observations(
  audit_iterates: Any, expected_batch_size: float, l2_norm_clip: float
) -> np.ndarray:
  """Each step's released gradient on the canary coordinates, in units of the clip bound.

  Args:
    audit_iterates: (T + 1, m) the canary coordinates ``params["audit"]`` before the first
      step and after each of T steps (with :func:`canary_optimizer`).
    expected_batch_size: the step's normaliser (the noisy sum is divided by it).
    l2_norm_clip: C.

  Returns:
    (T, m) ``x[t, j] = s[t, j] + sigma z`` for a correct step: ``s`` is 1 when canary j was
    in the step's batch (0 otherwise) and z a standard normal.
  """
  a = np.asarray(audit_iterates, np.float64)
  return -np.diff(a, axis=0) * expected_batch_size / l2_norm_clip


def canary_llr_scores(
  observations: Any, sampling_prob: float, noise_multiplier: float
) -> np.ndarray:
  """Per-canary log-likelihood ratio of "in the dataset" against "not", from every step:

    score_j = sum_t log(1 - q + q exp((2 x_tj - 1) / (2 sigma^2)))

  the Neyman-Pearson statistic for one canary of a Poisson-subsampled Gaussian mechanism
  (each step: N(1, sigma^2) with probability q, else N(0, sigma^2), against N(0, sigma^2)),
  the tightest test of the claimed mechanism.
  """
  x = np.asarray(observations, np.float64)
  _validate.probability("sampling_prob", sampling_prob)
  _validate.positive("noise_multiplier", noise_multiplier)
  s2 = noise_multiplier**2
  per_step = np.logaddexp(
    math.log1p(-sampling_prob) if sampling_prob < 1 else -np.inf,
    math.log(sampling_prob) + (2.0 * x - 1.0) / (2.0 * s2),
  )
  return per_step.sum(axis=0)


# -- deliberately broken mechanisms (audits and their tests only) --------------------------

BROKEN_MECHANISMS = ("no_clipping", "noise_divided_by_batch")


class _BrokenStep(Step):
  """A DP step with one deliberate bug (see :func:`make_broken_step`)."""

  def __init__(self, kind: str, *args: Any, **kwargs: Any) -> None:
    super().__init__(*args, **kwargs)
    self.kind = kind

  def _sum_rows(self, params, batch, mask, rngs) -> ClippedSum:
    if self.kind != "no_clipping":
      return super()._sum_rows(params, batch, mask, rngs)
    # Per-example gradients summed with factor 1 (a bound no gradient reaches).
    return reference.clipped_sum(
      self.loss_fn, params, batch, mask, rngs, 1e30, has_aux=self.has_aux
    )

  def _update(self, state, summed, n_real, noise_key):
    if self.kind != "noise_divided_by_batch":
      return super()._update(state, summed, n_real, noise_key)
    # The noise std as if the clipped sum were already the mean: sigma C / B, not sigma C.
    b = float(self.expected_batch_size)
    grads = privatize(
      summed,
      noise_key,
      l2_norm_clip=self.privacy.l2_norm_clip,
      noise_multiplier=self.privacy.noise_multiplier / b,
      normalizer=b,
    )
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    return optax.apply_updates(state.params, updates), opt_state


def make_broken_step(
  kind: str,
  loss_fn: Callable[..., Any],
  optimizer: optax.GradientTransformation,
  privacy: DPConfig,
  *,
  expected_batch_size: float,
  has_aux: bool = False,
  mesh: jax.sharding.Mesh | None = None,
) -> Step:
  """A private step with a deliberate bug, for audits and their tests: ``"no_clipping"``
  (per-example gradients summed unclipped; the noise still calibrated to C) or
  ``"noise_divided_by_batch"`` (noise std sigma C / B, as if the clipped SUM were already the
  mean). Both still claim the epsilon of ``privacy``; an audit must flag them."""
  _validate.one_of("kind", kind, BROKEN_MECHANISMS)
  if sensitivity(privacy.l2_norm_clip) <= 0:
    raise ValueError("privacy.l2_norm_clip must be > 0")
  return _BrokenStep(
    kind, loss_fn, optimizer, privacy, expected_batch_size, has_aux, microbatch_size=None, mesh=mesh
  )


def observe_canaries(
  step: Step,
  state: Any,
  data: PyTree,
  batches: Iterable[Sequence[Any]],
) -> tuple[Any, np.ndarray]:
  """Runs ``step`` over ``batches`` (one logical batch per item, e.g. a sampler's draws)
  and records the canary coordinates after every step (the white-box auditor's view).

  Returns:
    ``(final_state, iterates)`` with ``iterates`` (T + 1, m) for :func:`canary_observations`.
  """
  seen = [np.asarray(state.params["audit"])]
  for batch in batches:
    state, _ = step.run(state, data, batch)
    seen.append(np.asarray(state.params["audit"]))
  return state, np.stack(seen)


def white_box_audit(
  loss_fn: Callable[..., Any],
  model_params: PyTree,
  train_data: PyTree,
  *,
  num_canaries: int,
  privacy: DPConfig,
  sampling_prob: float,
  steps: int,
  model_optimizer: optax.GradientTransformation,
  delta: float,
  mechanism: str = "correct",
  amplitude: float | None = None,
  has_aux: bool = False,
  confidence: float = 0.95,
  keys: KeySource | None = None,
  label: str = "white-box audit",
  mesh: jax.sharding.Mesh | None = None,
) -> dict[str, Any]:
  """A one-run white-box audit of DP-SGD: one training run with m gradient canaries.

  Each of ``num_canaries`` Dirac canaries (:func:`canary_loss`, amplitude ``amplitude``,
  default 10 C) joins the training set independently with probability 1/2; the run is
  Poisson-sampled at ``sampling_prob`` over real examples and included canaries, for
  ``steps`` steps of the ``mechanism`` ("correct": jaxdp's step; or one of
  ``BROKEN_MECHANISMS``); every step's release on the canary coordinates is observed,
  scored with :func:`canary_llr_scores` under the CLAIMED mechanism, and audited with
  :func:`audit_scores` at two guess counts fixed in advance: :func:`plan_guess_count`'s
  and nearly m / 2.

  Args:
    loss_fn: the model's per-example loss ``loss_fn(model_params, example, rng)``.
    model_params: initial model parameters.
    train_data: the real training examples (dict of arrays with a leading example axis).
    num_canaries: m.
    privacy: the claimed mechanism (clip C, noise multiplier sigma).
    sampling_prob: q of the Poisson sampler.
    steps: T.
    model_optimizer: the model's optimiser.
    delta: delta of the claimed epsilon and of the bounds.
    mechanism: "correct" or a broken one.
    amplitude: each canary gradient's norm before clipping (>= C).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    confidence: confidence of the bounds.
    keys: the run's key source (the canaries' inclusion, the batches and the noise); None
      draws them from the OS.
    label: the run's name in ``keys`` (each run of one key source needs its own).
    mesh: the devices each step's rows are split over (:func:`jaxdp.parallel.data_mesh`).

  Returns:
    :func:`audit_scores`'s result plus ``claimed_epsilon`` (PLD), ``mechanism``,
    ``flagged`` (the lower bound above the claim), ``scores`` and ``included``.
  """
  _validate.one_of("mechanism", mechanism, ("correct", *BROKEN_MECHANISMS))
  _validate.positive_int("num_canaries", num_canaries)
  clip = float(privacy.l2_norm_clip)
  amplitude = 10.0 * clip if amplitude is None else amplitude
  if amplitude < clip:
    raise ValueError(f"amplitude must be >= l2_norm_clip = {clip}, got {amplitude}")
  source = KeySource() if keys is None else keys
  rng = np.random.default_rng(source.seed(f"{label}/inclusion"))
  included = rng.random(num_canaries) < 0.5
  real = jax.tree_util.tree_map(np.asarray, train_data)
  n_real = len(jax.tree_util.tree_leaves(real)[0])
  chosen = np.flatnonzero(included)
  canary_rows = jax.tree_util.tree_map(
    lambda x: np.zeros((len(chosen), *x.shape[1:]), x.dtype), real
  )
  data = jax.tree_util.tree_map(lambda a, b: np.concatenate([a, b]), real, canary_rows)
  data["canary"] = np.concatenate([np.full(n_real, -1, np.int32), chosen.astype(np.int32)])
  n = n_real + len(chosen)
  sampler = sampling.PoissonSampler(
    n,
    sampling_prob=sampling_prob,
    row_multiple=parallel.row_multiple(mesh),
    seed=source.seed(f"{label}/batches"),
  )
  b = sampler.expected_batch_size
  loss = canary_loss(loss_fn, amplitude, has_aux=has_aux)
  opt = canary_optimizer(model_optimizer)
  if mechanism == "correct":
    step = make_step(loss, opt, privacy, expected_batch_size=b, has_aux=has_aux, mesh=mesh)
  else:
    step = make_broken_step(
      mechanism, loss, opt, privacy, expected_batch_size=b, has_aux=has_aux, mesh=mesh
    )
  params = {"model": model_params, "audit": jnp.zeros((num_canaries,), jnp.float32)}
  state = init_state(params, opt, source.key(f"{label}/noise"))
  _, iterates = observe_canaries(
    step, state, jax.device_put(data), (sampler.sample() for _ in range(steps))
  )
  obs = canary_observations(iterates, b, clip)
  scores = canary_llr_scores(obs, sampling_prob, privacy.noise_multiplier)
  # Two guess counts fixed in advance (Bonferroni over the two): the one that makes the
  # tightest bound for the claimed mechanism, and nearly m / 2, whose ceiling is near the
  # highest: a broken mechanism separates the canaries perfectly, and only many guesses
  # certify more than the claim (at the first count the ceiling can sit below it). It
  # stays 3 std below m / 2 so that both sides hold that many canaries.
  k = plan_guess_count(
    num_canaries, sampling_prob, privacy.noise_multiplier, steps, delta, confidence=confidence
  )
  wide = max(1, num_canaries // 2 - 3 * math.ceil(math.sqrt(num_canaries) / 2) - 1)
  counts = sorted({k, wide})
  out = audit_scores(scores, included, delta, confidence=confidence, guess_counts=counts)
  claimed = accounting.epsilon(
    accounting.dpsgd_event(sampling_prob, privacy.noise_multiplier, steps), delta
  )
  out.update(
    claimed_epsilon=claimed,
    mechanism=mechanism,
    flagged=bool(out["epsilon"] > claimed),
    scores=scores,
    included=included,
  )
  return out
