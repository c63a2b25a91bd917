"""DP-SGD's gradient as a function transform: ``private_grad``, and the plan that accounts it.

For users who own their training loop, in the manner of ``jax.grad``::

    plan = PrivacyPlan.calibrate(num_examples=N, expected_batch_size=256, epochs=10,
                                 target_epsilon=3.0, l2_norm_clip=1.0)
    grad_fn = jax.jit(plan.private_grad(loss_fn))        # loss_fn(params, example, rng)
    sampler, key = plan.sampler(), jaxdp.secure_key()    # Poisson batches; both secret
    for _ in range(plan.steps):
      indices, mask = one_batch(sampler.sample())        # its physical pieces, concatenated
      key, sub = jax.random.split(key)
      grads, info = grad_fn(params, take(data, indices), mask, sub)
      updates, opt_state = optimizer.update(grads, opt_state, params)   # any optax optimiser
      params = optax.apply_updates(params, updates)
    plan.epsilon()                                       # dp-accounting, PLD

``docs/library.md`` ("Any JAX model") has it whole, with a Flax NNX model beside it.

The gradient is

    g = (sum_i mask_i clip_C(grad loss(params, x_i, rng_i)) + N(0, (sigma C)^2 I)) / B

with ``B`` the expected batch size (public), the per-example gradients clipped by the fast
per-layer engine or ``vmap(grad)`` (:mod:`jaxdp.clipping`), and the noise drawn once from
the key's own noise half. :class:`PrivateGradient` is that mechanism; jaxdp's own
:class:`jaxdp.step.Step` is a ``PrivateGradient`` with an optimiser, a device mesh and
gradient accumulation around it, so both run one path. Without privacy (``privacy=None``,
only through the step) the gradient is the plain mean over the real rows.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import dp_accounting
import jax
import jax.numpy as jnp

from jaxdp import _validate, accounting
from jaxdp.clipping import fast, reference
from jaxdp.clipping._common import (
  ClippedSum,
  PerExampleLoss,
  after,
  nonfinite_rows,
  split_loss,
  stack_rngs,
)
from jaxdp.noise import privatize
from jaxdp.sampling import PoissonSampler

__all__ = [
  "DPConfig",
  "PrivacyPlan",
  "PrivateGradient",
  "check_microbatch_size",
  "microbatch_rows",
  "parse_microbatch_size",
  "private_grad",
]

PyTree = Any
ENGINES = ("auto", "fast", "reference")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPConfig:
  """The privacy settings of the step.

  Attributes:
    l2_norm_clip: clipping bound C > 0 on each example's global gradient norm, or a pytree
      of bounds that is a prefix of the params (per-layer clipping; sensitivity
      sqrt(sum C_k^2)).
    noise_multiplier: sigma >= 0; the noise std on the summed gradient is sigma * sensitivity.
    engine: "auto" (fast engine for global clipping, reference for per-layer), "fast" or
      "reference" (``vmap(grad)``).
  """

  l2_norm_clip: float | PyTree
  noise_multiplier: float
  engine: str = "auto"

  def __post_init__(self) -> None:
    for c in jax.tree_util.tree_leaves(self.l2_norm_clip):
      _validate.positive("l2_norm_clip", c)
    if not jax.tree_util.tree_leaves(self.l2_norm_clip):
      raise ValueError("l2_norm_clip must be a number > 0 or a non-empty pytree of them")
    _validate.non_negative("noise_multiplier", self.noise_multiplier)
    _validate.one_of("engine", self.engine, ENGINES)
    if self.engine == "fast" and not self.global_clipping:
      raise ValueError("engine='fast' supports a single float l2_norm_clip; use 'reference'")

  @property
  def global_clipping(self) -> bool:
    """True when one bound applies to the whole gradient."""
    return isinstance(self.l2_norm_clip, (int, float))

  @property
  def resolved_engine(self) -> str:
    """The engine the step runs: 'fast' or 'reference'."""
    if self.engine == "auto":
      return "fast" if self.global_clipping else "reference"
    return self.engine


# "auto" microbatch sizes per JAX backend. On the 2-core CPU the TF-Privacy CNN at batch 1024
# runs about 1.1x faster in microbatches of 256 than in one piece, with a quarter of the
# working memory; 128 is no faster. GPUs want the whole batch at once. Each microbatch is
# its own copy of the program (a loop would run XLA's CPU fusions on one thread), so "auto"
# takes at most MAX_AUTO_MICROBATCHES of them: compile time grows with their number.
AUTO_MICROBATCH: dict[str, int] = {"cpu": 256}
MAX_AUTO_MICROBATCHES = 8


def check_microbatch_size(
  microbatch_size: int | str | None, name: str = "microbatch_size"
) -> int | str | None:
  """Returns a valid ``microbatch_size`` (an int >= 1, None or "auto"), else raises."""
  if microbatch_size is None:
    return None
  if isinstance(microbatch_size, str):
    return _validate.one_of(name, microbatch_size, ("auto",))
  return _validate.positive_int(name, microbatch_size)


def parse_microbatch_size(text: str, name: str = "microbatch_size") -> int | str | None:
  """A command-line value: "auto", "none" (no split) or an integer >= 1."""
  word = text.strip().lower()
  if word in ("auto", "none"):
    return None if word == "none" else "auto"
  try:
    value = int(word)
  except ValueError:
    raise ValueError(f"{name} must be auto, none or an integer >= 1; got {text!r}") from None
  return check_microbatch_size(value, name)


def microbatch_rows(
  microbatch_size: int | str | None, batch_size: int, backend: str | None = None
) -> int | None:
  """Rows per microbatch for a physical batch of ``batch_size`` (None: no split)."""
  if microbatch_size != "auto":
    return microbatch_size
  rows = AUTO_MICROBATCH.get(backend or jax.default_backend())
  if rows is None:
    return None
  return max(rows, -(-batch_size // MAX_AUTO_MICROBATCHES))


def batch_stats(cs: ClippedSum, mask: jax.Array, private: bool) -> dict[str, jax.Array]:
  """Batch means of the step's statistics (non-DP diagnostics of the batch).

  Private steps: the loss and norm statistics are over the real rows with a finite gradient
  norm; ``clip_fraction`` counts every real row with a factor below 1 (those with a
  non-finite norm included, their factor is 0) and ``nonfinite_fraction`` those alone.
  """
  n = jnp.sum(mask)
  denom = jnp.maximum(n, 1)
  if not private:
    return {"loss": jnp.sum(cs.losses) / denom, "batch_size": n}
  norms = cs.per_example_norms
  bad = nonfinite_rows(norms, mask)
  ok = mask & ~bad
  finite = jnp.maximum(jnp.sum(ok), 1)
  return {
    "loss": jnp.sum(jnp.where(ok, cs.losses, 0.0)) / finite,
    "batch_size": n,
    "grad_norm_mean": jnp.sum(jnp.where(ok, norms, 0.0)) / finite,
    "grad_norm_median": jnp.nanmedian(jnp.where(ok, norms, jnp.nan)),
    "clip_fraction": jnp.sum(mask & (cs.clip_factors < 1.0)) / denom,
    "nonfinite_fraction": jnp.sum(bad) / denom,
    "grad_norms": norms,
  }


class PrivateGradient:
  """The clipped, noised, normalised gradient of a batch: the DP-SGD mechanism of one step.

  Build it with :func:`private_grad` (or :meth:`PrivacyPlan.private_grad`); call it as
  ``grad_fn(params, batch, mask, key) -> (gradient, info)``. ``privacy=None`` gives the
  plain mean gradient over the real rows (jaxdp's non-private step).

  Args:
    loss_fn: ``loss_fn(params, example, rng) -> loss`` (or ``(loss, aux)``) for ONE example:
      a Flax (Linen) model called inside it, or any plain JAX function of a params pytree.
    privacy: the :class:`DPConfig`, or None.
    expected_batch_size: the public normaliser B of the noisy sum (required when private).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    microbatch_size: rows per sequential microbatch (same numbers, less memory), None or
      "auto" (see :func:`microbatch_rows`).
  """

  def __init__(
    self,
    loss_fn: PerExampleLoss,
    privacy: DPConfig | None,
    expected_batch_size: float | None,
    has_aux: bool = False,
    microbatch_size: int | str | None = "auto",
  ) -> None:
    self.loss_fn = loss_fn
    self.privacy = privacy
    self.has_aux = has_aux
    if privacy is not None:
      if expected_batch_size is None:
        raise ValueError(
          "expected_batch_size is required for a private step (it normalises the noisy sum)"
        )
      _validate.positive("expected_batch_size", expected_batch_size)
    self.expected_batch_size = expected_batch_size
    self.microbatch_size = check_microbatch_size(microbatch_size)

  @property
  def engine(self) -> str:
    """'fast', 'reference', or 'none' without privacy."""
    return "none" if self.privacy is None else self.privacy.resolved_engine

  def __call__(
    self, params: PyTree, batch: PyTree, mask: jax.Array, key: jax.Array
  ) -> tuple[PyTree, dict[str, Any]]:
    """The private gradient of one batch; jittable.

    Args:
      params: the parameters.
      batch: pytree of (P, ...) arrays, one row per example (padding rows included).
      mask: (P,) bool, False on padding rows (they contribute exactly nothing).
      key: a SECRET key (e.g. from :func:`jaxdp.keys.secure_key`), fresh every call: it
        seeds the per-example keys and the noise. Split as ``jaxdp.step.Step`` splits its
        state's key, so ``grad_fn(params, ..., state.rng)`` is the gradient that step uses.

    Returns:
      ``(gradient, info)``: the gradient has the params' structure and dtypes; ``info``
      holds the batch statistics of the step's metrics (loss, batch_size, grad_norm_mean,
      grad_norm_median, clip_fraction, nonfinite_fraction, the (P,) grad_norms) and, with
      ``has_aux``, the per-example ``aux``. ``info`` is computed without noise from the
      private batch: diagnostics, never to be released.

    Formal guarantees:
      The gradient depends on the batch only through the clipped sum, whose sensitivity to
      adding or removing one example is ``l2_norm_clip``; the noise has std
      ``noise_multiplier * l2_norm_clip`` on every coordinate before the division by B.
    """
    _, example_key, noise_key = self.split_key(key)
    mask = jnp.asarray(mask).astype(bool)
    cs = self.clipped_sum(params, batch, mask, jax.random.fold_in(example_key, 0))
    grads = self.noised_gradient(cs.sum_of_clipped_grads, jnp.sum(mask), noise_key, params)
    return grads, self.batch_info(cs, mask)

  @staticmethod
  def split_key(key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(next key, example key, noise key)``: one step's keys from one key, never reused
    (the example key's ``fold_in(., k)`` seeds the rows of physical batch k)."""
    return tuple(jax.random.split(key, 3))  # type: ignore[return-value]

  def batch_info(self, cs: ClippedSum, mask: jax.Array) -> dict[str, Any]:
    """:func:`batch_stats` of one batch, with the per-example ``aux`` under ``has_aux``."""
    info = batch_stats(cs, mask, self.privacy is not None)
    if self.has_aux:
      info["aux"] = cs.aux
    return info

  def clipped_sum(
    self, params: PyTree, batch: PyTree, mask: jax.Array, rng: jax.Array
  ) -> ClippedSum:
    """Sum of (clipped, if private) per-example gradients of one physical batch; jittable.

    With a ``microbatch_size`` smaller than the batch, the rows are taken in sequential
    microbatches (the last padded with masked rows) whose sums are added: the same numbers
    up to the order of float additions, with the working memory of one microbatch. Every
    row keeps the key it has without microbatching.
    """
    mask = jnp.asarray(mask).astype(bool)
    return self._clipped_rows(params, batch, mask, stack_rngs(rng, mask.shape[0]))

  def _clipped_rows(self, params, batch, mask, rngs) -> ClippedSum:
    """:meth:`clipped_sum` with one given key per row."""
    p = mask.shape[0]
    m = microbatch_rows(self.microbatch_size, p)
    if m is None or p <= m:
      return self._sum_rows(params, batch, mask, rngs)
    n = -(-p // m)
    size = -(-p // n)  # n near-equal microbatches of at most m rows
    pad = n * size - p
    if pad:
      # Padding rows repeat the first rows (any valid input) and are masked out.
      grow = lambda x: jnp.concatenate([x, x[:pad]], axis=0)
      batch = jax.tree_util.tree_map(grow, batch)
      rngs = grow(rngs)
      mask = jnp.concatenate([mask, jnp.zeros((pad,), bool)])
    parts: list[ClippedSum] = []
    total = None
    for c in range(n):
      rows = slice(c * size, (c + 1) * size)
      params_c, batch_c = params, jax.tree_util.tree_map(lambda x, r=rows: x[r], batch)
      if total is not None:
        params_c, batch_c = after(total, (params_c, batch_c))
      cs = self._sum_rows(params_c, batch_c, mask[rows], rngs[rows])
      g = cs.sum_of_clipped_grads
      total = g if total is None else jax.tree_util.tree_map(jnp.add, total, g)
      parts.append(cs)
    cat = lambda *xs: jnp.concatenate(xs, axis=0)[:p]
    return ClippedSum(
      total,
      cat(*[cs.per_example_norms for cs in parts]),
      cat(*[cs.clip_factors for cs in parts]),
      cat(*[cs.losses for cs in parts]),
      jax.tree_util.tree_map(cat, *[cs.aux for cs in parts]),
    )

  def _sum_rows(self, params, batch, mask, rngs) -> ClippedSum:
    if self.privacy is None:
      return self._plain_sum(params, batch, mask, rngs)
    if self.engine == "fast":
      return fast.clipped_sum(
        self.loss_fn,
        params,
        batch,
        mask,
        rngs,
        float(self.privacy.l2_norm_clip),
        has_aux=self.has_aux,
      )
    return reference.clipped_sum(
      self.loss_fn, params, batch, mask, rngs, self.privacy.l2_norm_clip, has_aux=self.has_aux
    )

  def _plain_sum(self, params, batch, mask, rngs) -> ClippedSum:
    def total(p):
      out = jax.vmap(
        lambda ex, r: split_loss(self.loss_fn(p, ex, r), self.has_aux), in_axes=(0, 0)
      )(batch, rngs)
      losses, aux = out
      losses = jnp.where(mask, losses, 0.0)
      return jnp.sum(losses), (losses, aux)

    grads, (losses, aux) = jax.grad(total, has_aux=True)(params)
    ones = mask.astype(jnp.float32)
    return ClippedSum(grads, jnp.zeros_like(ones), ones, losses, aux)

  def noised_gradient(
    self, summed: PyTree, n_real: jax.Array, noise_key: jax.Array, params: PyTree
  ) -> PyTree:
    """The clipped sum noised once and divided by the expected batch size, in the params'
    dtypes (without privacy: the sum over the mean's ``n_real`` real rows)."""
    if self.privacy is None:
      return jax.tree_util.tree_map(lambda g: g / jnp.maximum(n_real, 1), summed)
    grads = privatize(
      summed,
      noise_key,
      l2_norm_clip=self.privacy.l2_norm_clip,
      noise_multiplier=self.privacy.noise_multiplier,
      normalizer=float(self.expected_batch_size),
    )
    # The clipped sum and its noise are float32 whatever the parameters' dtype; rounding
    # the noised gradient to it is post-processing.
    return jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, params)


def private_grad(
  loss_fn: PerExampleLoss,
  *,
  l2_norm_clip: float | PyTree,
  noise_multiplier: float,
  expected_batch_size: float,
  engine: str = "auto",
  has_aux: bool = False,
  microbatch_size: int | str | None = "auto",
) -> PrivateGradient:
  """``jax.grad`` for DP-SGD: ``grad_fn(params, batch, mask, key) -> (gradient, info)``.

  Per-example gradients of ``loss_fn(params, example, rng)`` clipped to ``l2_norm_clip``
  (the fast per-layer engine for a float bound and a Flax Linen model, ``vmap(grad)`` for
  what it does not cover or with ``engine="reference"``), summed over the real rows, noised
  once with std ``noise_multiplier * l2_norm_clip`` and divided by ``expected_batch_size``.
  Use the gradient with any optax optimiser; account it with :class:`PrivacyPlan` (or
  :func:`jaxdp.accounting.dpsgd_event` for the sampler you use). The key of every call
  must be secret and fresh (:func:`jaxdp.keys.secure_key`, then split).

  Returns:
    A :class:`PrivateGradient` (callable, jittable with ``jax.jit``); see its ``__call__``.
  """
  privacy = DPConfig(l2_norm_clip=l2_norm_clip, noise_multiplier=noise_multiplier, engine=engine)
  return PrivateGradient(loss_fn, privacy, expected_batch_size, has_aux, microbatch_size)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrivacyPlan:
  """A private training run's mechanism and its accounting, in one object.

  Poisson sampling with rate ``q = expected_batch_size / num_examples``, ``steps`` steps of
  the Gaussian mechanism with std ``noise_multiplier * l2_norm_clip`` on each clipped sum:
  its :meth:`sampler` draws the batches, its :meth:`private_grad` computes each step's
  gradient, its :meth:`epsilon` is what ``dp-accounting`` says of the steps taken.

  Attributes:
    num_examples: N, the private dataset's size.
    expected_batch_size: B = q N (public).
    noise_multiplier: sigma.
    l2_norm_clip: C.
    steps: the planned number of steps.
    delta: the delta of :meth:`epsilon`.
  """

  num_examples: int
  expected_batch_size: float
  noise_multiplier: float
  l2_norm_clip: float
  steps: int
  delta: float = 1e-5

  def __post_init__(self) -> None:
    _validate.positive_int("num_examples", self.num_examples)
    _validate.positive("expected_batch_size", self.expected_batch_size)
    if self.expected_batch_size > self.num_examples:
      raise ValueError(
        f"expected_batch_size must be <= num_examples ({self.num_examples}), "
        f"got {self.expected_batch_size}"
      )
    _validate.non_negative("noise_multiplier", self.noise_multiplier)
    _validate.positive("l2_norm_clip", self.l2_norm_clip)
    _validate.positive_int("steps", self.steps)
    _validate.probability("delta", self.delta, high_open=True)

  @classmethod
  def calibrate(
    cls,
    *,
    num_examples: int,
    expected_batch_size: float,
    target_epsilon: float,
    l2_norm_clip: float,
    epochs: float | None = None,
    steps: int | None = None,
    delta: float = 1e-5,
    accountant: str = "pld",
  ) -> PrivacyPlan:
    """The plan whose noise is the smallest that keeps ``steps`` (or ``epochs`` x N / B)
    steps within ``(target_epsilon, delta)`` under ``accountant``."""
    if (epochs is None) == (steps is None):
      raise ValueError("give exactly one of epochs and steps")
    if steps is None:
      _validate.positive("epochs", epochs)
      steps = max(1, math.ceil(epochs * num_examples / expected_batch_size))
    q = expected_batch_size / num_examples
    sigma = accounting.calibrate_noise_multiplier(target_epsilon, delta, q, steps, accountant)
    return cls(num_examples=num_examples, expected_batch_size=expected_batch_size,
               noise_multiplier=sigma, l2_norm_clip=l2_norm_clip, steps=steps,
               delta=delta)  # fmt: skip

  @property
  def sampling_prob(self) -> float:
    """q = B / N."""
    return self.expected_batch_size / self.num_examples

  def sampler(self, **kwargs: Any) -> PoissonSampler:
    """The plan's Poisson sampler (secret seed unless ``seed=`` is given; ``kwargs`` go to
    :class:`jaxdp.sampling.PoissonSampler`, e.g. ``physical_batch_size``)."""
    return PoissonSampler(self.num_examples, sampling_prob=self.sampling_prob, **kwargs)

  def private_grad(
    self,
    loss_fn: PerExampleLoss,
    *,
    engine: str = "auto",
    has_aux: bool = False,
    microbatch_size: int | str | None = "auto",
  ) -> PrivateGradient:
    """:func:`private_grad` with the plan's clip, noise and expected batch size."""
    return private_grad(
      loss_fn, l2_norm_clip=self.l2_norm_clip, noise_multiplier=self.noise_multiplier,
      expected_batch_size=self.expected_batch_size, engine=engine, has_aux=has_aux,
      microbatch_size=microbatch_size,
    )  # fmt: skip

  def config(self, engine: str = "auto") -> DPConfig:
    """The plan's :class:`DPConfig` (for :func:`jaxdp.step.make_step`)."""
    return DPConfig(l2_norm_clip=self.l2_norm_clip, noise_multiplier=self.noise_multiplier,
                    engine=engine)  # fmt: skip

  def event(self, steps: int | None = None) -> dp_accounting.DpEvent:
    """The DP event of ``steps`` steps (default: the plan's)."""
    n = self.steps if steps is None else steps
    return accounting.dpsgd_event(self.sampling_prob, self.noise_multiplier, n)

  def epsilon(self, steps: int | None = None, accountant: str = "pld") -> float:
    """Epsilon at the plan's delta after ``steps`` steps (default: the plan's)."""
    return accounting.epsilon(self.event(steps), self.delta, accountant)
