"""Privacy accounting for DP-SGD: a thin wrapper on Google's ``dp_accounting``.

One DP-SGD step on a dataset of ``N`` examples includes every example independently with
probability ``q`` (Poisson sampling, expected batch ``q * N``), clips each per-example
gradient to L2 norm ``C`` and adds ``N(0, (sigma * C)^2 I)`` to the sum. Per step this is the
*Poisson-subsampled Gaussian mechanism* with sampling probability ``q`` and noise multiplier
``sigma`` (noise standard deviation over L2 sensitivity); ``T`` steps are its ``T``-fold
adaptive composition. In ``dp_accounting`` terms::

  SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), T)

Neighbouring datasets differ by adding or removing one example (``ADD_OR_REMOVE_ONE``), the
relation under which Poisson sampling is analysed. Two accountants turn such an event into
``(epsilon, delta)``:

* ``"rdp"`` (Rényi DP). With ``mu_0 = N(0, sigma^2)`` and ``mu_1 = N(1, sigma^2)``, the
  subsampled mechanism at order ``alpha`` has RDP
  ``eps_alpha = log E_{z ~ mu_0}[((1 - q) + q mu_1(z) / mu_0(z))^alpha] / (alpha - 1)``
  (Mironov, Talwar & Zhang 2019), which ``dp_accounting`` evaluates exactly for integer and
  fractional orders. RDP composes by addition, ``eps_alpha(T) = T * eps_alpha(1)``, and converts
  to approximate DP by ``eps = min_alpha eps_alpha + log1p(-1/alpha) - log(delta * alpha) /
  (alpha - 1)`` (Balle et al. 2020, Prop. 12; Mironov 2017 for the simpler bound). Fast, and an
  upper bound that is typically 5-15% loose for DP-SGD.
* ``"pld"`` (privacy loss distributions). The privacy loss random variable of one step is
  discretised on a grid of width ``PLD_VALUE_DISCRETIZATION_INTERVAL`` (pessimistically,
  so the result is still an upper bound); composition is the convolution of the
  distributions (done with FFTs), and ``delta(eps) = E[(1 - exp(eps - L))_+]`` is inverted for
  ``eps`` (Koskela et al. 2020; Doroshenko et al. 2022, "Connect the dots"). Tight up to the
  discretisation; this is the number a run should report.

Different private uses of the same dataset (a VAE, then a classifier, noisy label counts)
compose the same way: ``PrivacyLedger`` collects them and hands the composed event to either
accountant. ``EpsilonTracker`` gives a cheap RDP epsilon-so-far for progress bars.

Example:

  >>> from jaxdp import accounting
  >>> eps = accounting.epsilon(
  ...     accounting.dpsgd_event(sampling_prob=256 / 60000, noise_multiplier=1.1, steps=14062),
  ...     delta=1e-5, accountant="rdp")
  >>> round(eps, 3)
  2.597
  >>> sigma = accounting.calibrate_noise_multiplier(
  ...     target_epsilon=3.0, delta=1e-5, sampling_prob=0.01, steps=1000, accountant="rdp")
  >>> 0.99 * 3.0 <= accounting.epsilon(
  ...     accounting.dpsgd_event(0.01, sigma, 1000), delta=1e-5, accountant="rdp") <= 3.0
  True

References:
  Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar, Zhang. "Deep Learning with Differential
  Privacy", CCS 2016. https://arxiv.org/abs/1607.00133

  Mironov. "Rényi Differential Privacy", CSF 2017. https://arxiv.org/abs/1702.07476

  Mironov, Talwar, Zhang. "Rényi Differential Privacy of the Sampled Gaussian Mechanism", 2019.
  https://arxiv.org/abs/1908.10530

  Balle, Barthe, Gaboardi, Hsu, Sato. "Hypothesis Testing Interpretations and Renyi
  Differential Privacy", AISTATS 2020. https://arxiv.org/abs/1905.09982

  Koskela, Jälkö, Honkela. "Computing Tight Differential Privacy Guarantees Using FFT",
  AISTATS 2020. https://arxiv.org/abs/1906.03049

  Doroshenko, Ghazi, Kamath, Kumar, Manurangsi. "Connect the Dots: Tighter Discrete
  Approximations of Privacy Loss Distributions", PETS 2022. https://arxiv.org/abs/2207.04380
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import dp_accounting
import numpy as np
from dp_accounting import dp_event as dp_event_lib
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from jaxdp import _validate

__all__ = [
  "ACCOUNTANTS",
  "PLD_VALUE_DISCRETIZATION_INTERVAL",
  "RDP_ORDERS",
  "EpsilonTracker",
  "PrivacyLedger",
  "calibrate_noise_multiplier",
  "dpsgd_event",
  "epsilon",
]

ACCOUNTANTS = ("rdp", "pld")

# dp_accounting's default orders: 1.1..10.9 in steps of 0.1, 11..63, 128, 256, 512, 1024.
RDP_ORDERS: tuple[float, ...] = tuple(rdp_privacy_accountant.DEFAULT_RDP_ORDERS)

# dp_accounting's default grid. 1e-4 gives 2.3817 for the Abadi et al. MNIST setting in about
# 0.3 s; 1e-3 gives 2.3905 (coarser grids are pessimistic, never optimistic).
PLD_VALUE_DISCRETIZATION_INTERVAL = 1e-4

# Search range of calibrate_noise_multiplier.
_NOISE_BRACKET = (1e-2, 1e3)


def _make_accountant(accountant: str) -> dp_accounting.PrivacyAccountant:
  """A fresh accountant of the given kind with this module's settings."""
  if accountant == "rdp":
    return rdp_privacy_accountant.RdpAccountant(orders=RDP_ORDERS)
  return pld_privacy_accountant.PLDAccountant(
    value_discretization_interval=PLD_VALUE_DISCRETIZATION_INTERVAL
  )


def _drop_empty(event: dp_accounting.DpEvent) -> dp_accounting.DpEvent:
  """Replaces zero-count self-compositions by NoOp (the PLD accountant refuses count 0)."""
  if isinstance(event, dp_accounting.SelfComposedDpEvent):
    if event.count == 0:
      return dp_accounting.NoOpDpEvent()
    return dp_accounting.SelfComposedDpEvent(_drop_empty(event.event), event.count)
  if isinstance(event, dp_accounting.ComposedDpEvent):
    return dp_accounting.ComposedDpEvent([_drop_empty(e) for e in event.events])
  return event


def _rdp_vector(event: dp_accounting.DpEvent) -> np.ndarray:
  """Per-order RDP of ``event`` at ``RDP_ORDERS``, exactly as the RdpAccountant stores it."""
  accountant = _make_accountant("rdp").compose(_drop_empty(event))
  # dp_accounting has no public getter for the RDP curve; `_rdp` is the accountant's own sum.
  return np.array(accountant._rdp, dtype=np.float64)


def dpsgd_event(sampling_prob: float, noise_multiplier: float, steps: int) -> dp_accounting.DpEvent:
  """The DpEvent of ``steps`` DP-SGD steps with Poisson sampling and Gaussian noise.

  Args:
    sampling_prob: probability ``q`` that each example is in a batch, in (0, 1]; for Poisson
      sampling with expected batch size ``B`` on ``N`` examples, ``q = B / N``.
    noise_multiplier: ``sigma``, the noise standard deviation divided by the L2 clip norm,
      >= 0. ``0`` is a non-private mechanism (infinite epsilon).
    steps: number of steps ``T``, an integer >= 0.

  Returns:
    ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), T)``.

  Raises:
    ValueError: if an argument is outside its range.
  """
  _validate.probability("sampling_prob", sampling_prob)
  _validate.non_negative("noise_multiplier", noise_multiplier)
  _validate.non_negative_int("steps", steps)
  step = dp_accounting.PoissonSampledDpEvent(
    float(sampling_prob), dp_accounting.GaussianDpEvent(float(noise_multiplier))
  )
  return dp_accounting.SelfComposedDpEvent(step, steps)


def epsilon(
  event_or_events: dp_accounting.DpEvent | Sequence[dp_accounting.DpEvent],
  delta: float,
  accountant: str = "pld",
) -> float:
  """Epsilon at ``delta`` of a DpEvent (or the composition of several).

  Args:
    event_or_events: one ``dp_accounting.DpEvent`` or a sequence of them, composed.
    delta: target delta, in (0, 1); usually below ``1 / N``.
    accountant: ``"pld"`` (tight, the number to report) or ``"rdp"`` (fast, looser).

  Returns:
    The epsilon as a float; ``float('inf')`` when a component is non-private (e.g.
    ``noise_multiplier == 0``), ``0.0`` for an empty composition.

  Raises:
    ValueError: if ``delta`` or ``accountant`` is outside its range.
    dp_accounting.UnsupportedEventError: if the accountant cannot handle the event.

  Formal guarantees:
    The result upper-bounds the (epsilon, delta)-DP of the described mechanism under the
    add-or-remove-one relation; for the same event, the value equals a fresh
    ``RdpAccountant(RDP_ORDERS)`` or ``PLDAccountant(PLD_VALUE_DISCRETIZATION_INTERVAL)`` composed
    with it.
  """
  _validate.probability("delta", delta, high_open=True)
  _validate.one_of("accountant", accountant, ACCOUNTANTS)
  if isinstance(event_or_events, dp_accounting.DpEvent):
    event = event_or_events
  else:
    events = list(event_or_events)
    for e in events:
      if not isinstance(e, dp_accounting.DpEvent):
        raise TypeError(f"event_or_events must hold dp_accounting.DpEvent, got {type(e).__name__}")
    event = dp_accounting.ComposedDpEvent(events)
  return _epsilon_of(repr(event), event, float(delta), accountant)


_EPSILONS: dict[tuple[str, float, str], float] = {}  # remembered epsilons, see _epsilon_of


def _epsilon_of(key: str, event: Any, delta: float, accountant: str) -> float:
  """The accountant's epsilon, remembered by the event's description (``key``, its repr,
  which names every field): a PLD evaluation takes 0.2-2 s, and a run asks for the same
  event more than once (its last epoch, its run folder's ledger)."""
  if (key, delta, accountant) not in _EPSILONS:
    if len(_EPSILONS) >= 1024:
      _EPSILONS.clear()
    eps = _make_accountant(accountant).compose(_drop_empty(event)).get_epsilon(delta)
    _EPSILONS[key, delta, accountant] = float(eps)
  return _EPSILONS[key, delta, accountant]


def _search_noise(
  eps_of: Callable[[float], float],
  target: float,
  tolerance: float,
  lo: float,
  hi: float,
  guess: float | None = None,
) -> float:
  """Smallest sigma in [lo, hi] with (1 - tolerance) * target <= eps(sigma) <= target."""
  e_top = eps_of(hi)
  if e_top > target:
    raise ValueError(
      f"target_epsilon={target} is unreachable: even noise_multiplier={hi:g} gives "
      f"epsilon={e_top:.4g}; raise target_epsilon, or lower sampling_prob or steps"
    )
  # Bracket: eps(b_lo) > target >= eps(b_hi), walking from the guess by factors of 1.25.
  if guess is None:
    b_lo, e_lo, b_hi, e_hi = lo, eps_of(lo), hi, e_top
    if e_lo <= target:
      b_hi = None
  else:
    b_hi, e_hi = hi, e_top
    x = min(max(guess, lo), hi)
    e = eps_of(x)
    if e <= target:
      b_hi, e_hi = x, e
      b_lo = None
      while b_lo is None:
        x = max(x / 1.25, lo)
        e = eps_of(x)
        if e > target:
          b_lo, e_lo = x, e
        elif x == lo:
          b_hi = None
          break
        else:
          b_hi, e_hi = x, e
    else:
      b_lo, e_lo = x, e
      while True:
        x = min(x * 1.25, hi)
        e = eps_of(x)
        if e <= target:
          b_hi, e_hi = x, e
          break
        b_lo, e_lo = x, e
  if b_hi is None:
    raise ValueError(
      f"target_epsilon={target} is so large that noise_multiplier={lo:g} already meets it; "
      "use a smaller target_epsilon"
    )
  # Shrink the bracket in log-log space, aiming at the middle of the accepted window; every
  # third step is a plain geometric bisection so the bracket at least halves (in log) often.
  aim = target * (1.0 - tolerance / 2)
  for it in range(200):
    if e_hi >= target * (1.0 - tolerance) or b_hi / b_lo - 1.0 < 1e-9:
      break
    log_lo, log_hi = math.log(b_lo), math.log(b_hi)
    frac = 0.5
    if it % 3 != 2 and math.isfinite(e_lo) and e_lo > 0 and e_hi > 0:
      frac = (math.log(e_lo) - math.log(aim)) / (math.log(e_lo) - math.log(e_hi))
      frac = min(max(frac, 0.05), 0.95)
    x = math.exp(log_lo + frac * (log_hi - log_lo))
    e = eps_of(x)
    if e <= target:
      b_hi, e_hi = x, e
    else:
      b_lo, e_lo = x, e
  return b_hi


def calibrate_noise_multiplier(
  target_epsilon: float,
  delta: float,
  sampling_prob: float,
  steps: int,
  accountant: str = "pld",
  tolerance: float = 0.01,
  *,
  ledger: PrivacyLedger | None = None,
) -> float:
  """The smallest noise multiplier whose DP-SGD epsilon stays within ``target_epsilon``.

  Searches ``noise_multiplier`` in [0.01, 1000] for the event
  ``dpsgd_event(sampling_prob, noise_multiplier, steps)``, composed after the uses already in
  ``ledger`` when one is given (so the whole pipeline meets the target). With ``"pld"`` the
  search starts from the (cheap) RDP answer, so only a handful of PLD evaluations are needed.

  Args:
    target_epsilon: the epsilon budget, > 0.
    delta: target delta, in (0, 1).
    sampling_prob: Poisson sampling probability ``q``, in (0, 1].
    steps: number of DP-SGD steps, an integer >= 1.
    accountant: ``"pld"`` or ``"rdp"``; the calibrated sigma is only guaranteed under this one.
    tolerance: relative slack on epsilon, in (0, 1).
    ledger: earlier private uses of the same data (e.g. noisy label counts), included in
      every epsilon of the search; it is read, not changed.

  Returns:
    ``sigma`` with ``epsilon(sigma) <= target_epsilon`` under ``accountant`` and (unless
    epsilon jumps in sigma, which only PLD discretisation could cause)
    ``epsilon(sigma) >= (1 - tolerance) * target_epsilon``.

  Raises:
    ValueError: if an argument is outside its range, or ``target_epsilon`` cannot be met
      inside the search range (too small even for ``sigma = 1000``, or so large that
      ``sigma = 0.01`` already meets it).

  Formal guarantees:
    ``epsilon(dpsgd_event(sampling_prob, result, steps), delta, accountant) <=
    target_epsilon`` always holds for the returned value (the search keeps an upper end that
    meets the budget and returns it); with a ledger, ``epsilon([ledger.event(),
    dpsgd_event(sampling_prob, result, steps)], delta, accountant) <= target_epsilon``.
  """
  _validate.positive("target_epsilon", target_epsilon)
  _validate.probability("delta", delta, high_open=True)
  _validate.probability("sampling_prob", sampling_prob)
  _validate.positive_int("steps", steps)
  _validate.one_of("accountant", accountant, ACCOUNTANTS)
  _validate.probability("tolerance", tolerance, high_open=True)
  lo, hi = _NOISE_BRACKET

  earlier = [] if ledger is None or not len(ledger) else [ledger.event()]

  def event(sigma: float) -> Any:
    step_event = dpsgd_event(sampling_prob, sigma, steps)
    return [*earlier, step_event] if earlier else step_event

  def eps_of(acc: str) -> Callable[[float], float]:
    return lambda sigma: epsilon(event(sigma), delta, acc)

  rdp_of = eps_of("rdp")
  if accountant == "rdp":
    return _search_noise(rdp_of, target_epsilon, tolerance, lo, hi)
  # PLD is tighter than RDP, so its sigma is usually a little below the RDP one: start there.
  # (Never let PLD walk far down blindly: at sigma ~ 0.01 one PLD evaluation takes minutes.)
  if rdp_of(hi) > target_epsilon:
    guess = hi
  else:
    guess = _search_noise(rdp_of, target_epsilon, tolerance, lo, hi)
  return _search_noise(eps_of("pld"), target_epsilon, tolerance, lo, hi, guess=guess)


def _event_to_json(event: Any) -> Any:
  """JSON-able description of a DpEvent (class name plus fields, recursively)."""
  if isinstance(event, dp_accounting.DpEvent):
    event = event.to_named_tuple()
  if isinstance(event, tuple) and hasattr(event, "_fields") and hasattr(event, "class_name"):
    out: dict[str, Any] = {"class_name": event.class_name}
    for field in event._fields:
      if field not in ("module_name", "class_name"):
        out[field] = _event_to_json(getattr(event, field))
    return out
  if isinstance(event, (list, tuple)):
    return [_event_to_json(e) for e in event]
  if isinstance(event, np.generic):
    return event.item()
  return event


def _event_from_json(obj: Any) -> Any:
  """Inverse of ``_event_to_json``."""
  if isinstance(obj, dict) and "class_name" in obj:
    cls = getattr(dp_event_lib, obj["class_name"], None)
    if not (isinstance(cls, type) and issubclass(cls, dp_accounting.DpEvent)):
      raise ValueError(f"class_name must name a dp_accounting DpEvent, got {obj['class_name']!r}")
    return cls(**{k: _event_from_json(v) for k, v in obj.items() if k != "class_name"})
  if isinstance(obj, list):
    return [_event_from_json(e) for e in obj]
  return obj


class PrivacyLedger:
  """Every private use of one dataset, composed into one DpEvent.

  Each use is a named entry: a DP-SGD phase (``add_dpsgd``), a one-off Gaussian mechanism
  (``add_gaussian``) or any ``dp_accounting.DpEvent`` (``add_event``). Adding steps to an
  existing DP-SGD phase name with the same ``sampling_prob`` and ``noise_multiplier`` extends it
  (incremental training); different settings need a new name.

  Example:

    >>> from jaxdp.accounting import PrivacyLedger
    >>> ledger = PrivacyLedger()
    >>> ledger.add_gaussian("label_counts", noise_multiplier=20.0)
    >>> ledger.add_dpsgd("vae", sampling_prob=0.01, noise_multiplier=1.0, steps=1000)
    >>> ledger.add_dpsgd("vae", sampling_prob=0.01, noise_multiplier=1.0, steps=500)
    >>> [e["steps"] for e in ledger.entries() if e["kind"] == "dpsgd"]
    [1500]
    >>> round(ledger.epsilon(1e-5, accountant="rdp"), 2) > 0
    True

  Formal guarantees:
    ``ledger.epsilon(delta, acc)`` equals ``epsilon([e_1, ..., e_k], delta, acc)`` for the
    entries' events ``e_i`` in insertion order; ``entries()`` records ``sampling_prob`` and
    ``noise_multiplier`` exactly as passed to the accountant.
  """

  def __init__(self) -> None:
    self._entries: list[dict[str, Any]] = []
    self._events: dict[str, dp_accounting.DpEvent] = {}

  def _find(self, name: str) -> dict[str, Any] | None:
    for entry in self._entries:
      if entry["name"] == name:
        return entry
    return None

  @staticmethod
  def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name:
      raise ValueError(f"name must be a non-empty string, got {name!r}")
    return name

  def add_dpsgd(self, name: str, sampling_prob: float, noise_multiplier: float, steps: int) -> None:
    """Records ``steps`` DP-SGD steps with Poisson sampling ``q`` and noise ``sigma``.

    Args:
      name: phase name, e.g. ``"vae"`` or ``"classifier"``.
      sampling_prob: Poisson sampling probability, in (0, 1].
      noise_multiplier: noise std over clip norm, >= 0.
      steps: steps taken, an integer >= 0.

    Raises:
      ValueError: if an argument is outside its range, or ``name`` is taken by an entry of
        another kind or with other ``sampling_prob`` / ``noise_multiplier``.
    """
    self._check_name(name)
    dpsgd_event(sampling_prob, noise_multiplier, steps)  # validates the arguments
    q, sigma = float(sampling_prob), float(noise_multiplier)
    entry = self._find(name)
    if entry is None:
      entry = {
        "name": name,
        "kind": "dpsgd",
        "sampling_prob": q,
        "noise_multiplier": sigma,
        "steps": 0,
      }
      self._entries.append(entry)
    elif (
      entry["kind"] != "dpsgd"
      or entry["sampling_prob"] != q
      or (entry["noise_multiplier"] != sigma)
    ):
      raise ValueError(
        f"name {name!r} is already used by a different entry ({self._describe(entry)}); "
        "use a new name for a phase with other settings"
      )
    entry["steps"] += steps
    self._events[name] = dpsgd_event(q, sigma, entry["steps"])

  def add_gaussian(self, name: str, noise_multiplier: float, count: int = 1) -> None:
    """Records ``count`` releases of a Gaussian mechanism (no subsampling).

    For a query of L2 sensitivity ``S`` released with noise ``N(0, s^2)`` (e.g. per-class label
    counts, ``S = 1`` under add-or-remove-one), pass ``noise_multiplier = s / S``.

    Args:
      name: entry name, e.g. ``"label_counts"``.
      noise_multiplier: noise std over L2 sensitivity, >= 0 (0 is non-private).
      count: number of releases, an integer >= 1; adds to an existing entry of the same name
        and noise multiplier.

    Raises:
      ValueError: if an argument is outside its range, or ``name`` is taken by an entry of
        another kind or noise multiplier.
    """
    self._check_name(name)
    _validate.non_negative("noise_multiplier", noise_multiplier)
    _validate.positive_int("count", count)
    sigma = float(noise_multiplier)
    entry = self._find(name)
    if entry is None:
      entry = {"name": name, "kind": "gaussian", "noise_multiplier": sigma, "count": 0}
      self._entries.append(entry)
    elif entry["kind"] != "gaussian" or entry["noise_multiplier"] != sigma:
      raise ValueError(
        f"name {name!r} is already used by a different entry ({self._describe(entry)}); "
        "use a new name"
      )
    entry["count"] += count
    self._events[name] = dp_accounting.SelfComposedDpEvent(
      dp_accounting.GaussianDpEvent(sigma), entry["count"]
    )

  def add_event(self, name: str, event: dp_accounting.DpEvent) -> None:
    """Records an arbitrary ``dp_accounting.DpEvent`` under a new name.

    Args:
      name: entry name, not used before.
      event: the event; it must be supported by the accountant later asked for epsilon.

    Raises:
      ValueError: if ``name`` is already used.
      TypeError: if ``event`` is not a DpEvent.
    """
    self._check_name(name)
    if not isinstance(event, dp_accounting.DpEvent):
      raise TypeError(f"event must be a dp_accounting.DpEvent, got {type(event).__name__}")
    if self._find(name) is not None:
      raise ValueError(f"name {name!r} is already used; use a new name for each event")
    self._entries.append({"name": name, "kind": "event", "event": _event_to_json(event)})
    self._events[name] = event

  @staticmethod
  def _describe(entry: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in entry.items() if k not in ("name", "event"))

  def __len__(self) -> int:
    return len(self._entries)

  def event(self) -> dp_accounting.DpEvent:
    """Returns the composition of all entries (``NoOpDpEvent`` when empty)."""
    if not self._entries:
      return dp_accounting.NoOpDpEvent()
    return dp_accounting.ComposedDpEvent([self._events[e["name"]] for e in self._entries])

  def epsilon(self, delta: float, accountant: str = "pld") -> float:
    """Epsilon at ``delta`` of everything recorded; see :func:`epsilon`."""
    return epsilon(self.event(), delta, accountant)

  def entries(self) -> list[dict[str, Any]]:
    """A JSON-serialisable list describing each use, in insertion order (copies)."""
    return [dict(e) for e in self._entries]

  def to_dict(self) -> dict[str, Any]:
    """JSON-serialisable state: ``{"neighboring_relation": ..., "entries": [...]}``."""
    return {"neighboring_relation": "add_or_remove_one", "entries": self.entries()}

  @classmethod
  def from_dict(cls, data: dict[str, Any]) -> PrivacyLedger:
    """Rebuilds a ledger written by :meth:`to_dict` (e.g. to resume training)."""
    ledger = cls()
    for entry in data["entries"]:
      kind = entry.get("kind")
      if kind == "dpsgd":
        ledger.add_dpsgd(
          entry["name"], entry["sampling_prob"], entry["noise_multiplier"], entry["steps"]
        )
      elif kind == "gaussian":
        ledger.add_gaussian(entry["name"], entry["noise_multiplier"], entry["count"])
      elif kind == "event":
        ledger.add_event(entry["name"], _event_from_json(entry["event"]))
      else:
        raise ValueError(f"entry kind must be one of dpsgd, gaussian, event; got {kind!r}")
    return ledger


class EpsilonTracker:
  """Cheap RDP epsilon-so-far of a DP-SGD run, for progress bars and logs.

  The per-order RDP of one Poisson-sampled Gaussian step (and of any earlier uses in
  ``ledger``) is computed once; ``epsilon(steps)`` scales it by ``steps`` (RDP composes by
  addition) and converts to epsilon with the RdpAccountant's own conversion, in microseconds.
  The number to report at the end should come from PLD:
  ``epsilon(tracker.event(steps), delta, "pld")``, which is tighter.

  Args:
    sampling_prob: Poisson sampling probability, in (0, 1].
    noise_multiplier: noise std over clip norm, >= 0.
    delta: target delta, in (0, 1).
    ledger: optional earlier uses of the same dataset, included in every epsilon. The ledger
      is read once, at construction.

  Formal guarantees:
    ``tracker.epsilon(T)`` equals ``RdpAccountant(RDP_ORDERS)`` composed with
    ``ledger.event()`` and ``dpsgd_event(q, sigma, T)`` (to float rounding), and is
    non-decreasing in ``T``.
  """

  def __init__(
    self,
    sampling_prob: float,
    noise_multiplier: float,
    delta: float,
    ledger: PrivacyLedger | None = None,
  ) -> None:
    step = dpsgd_event(sampling_prob, noise_multiplier, 1)
    _validate.probability("delta", delta, high_open=True)
    self.sampling_prob = float(sampling_prob)
    self.noise_multiplier = float(noise_multiplier)
    self.delta = float(delta)
    self._ledger_event = ledger.event() if ledger is not None else dp_accounting.NoOpDpEvent()
    self._base_rdp = _rdp_vector(self._ledger_event)
    self._step_rdp = _rdp_vector(step)

  def epsilon(self, steps: int) -> float:
    """RDP epsilon after ``steps`` steps (an integer >= 0), earlier ledger uses included."""
    _validate.non_negative_int("steps", steps)
    # Skip the product at 0 steps: 0 * inf (an order where one step is unbounded) is nan.
    rdp = self._base_rdp + steps * self._step_rdp if steps else self._base_rdp
    eps, _ = rdp_privacy_accountant.compute_epsilon(RDP_ORDERS, rdp, self.delta)
    return float(eps)

  def event(self, steps: int) -> dp_accounting.DpEvent:
    """The full DpEvent after ``steps`` steps (ledger uses first), for a final PLD epsilon."""
    return dp_accounting.ComposedDpEvent(
      [self._ledger_event, dpsgd_event(self.sampling_prob, self.noise_multiplier, steps)]
    )
