"""Batch selection on the host: Poisson subsampling into fixed-shape padded batches.

Poisson sampling includes every example independently with probability q at every step;
the privacy amplification of DP-SGD's accountant (the Poisson-subsampled Gaussian) assumes
exactly that. The batch size is then random, Binomial(N, q), while a jitted step wants a
fixed shape. :class:`PoissonSampler` draws the subset and returns it as one or more
physical batches of a fixed size ``physical_batch_size`` with a mask (False on padding):
nothing is truncated, so what runs is what the accountant describes. Only a draw larger
than the physical size (rare with the default size, about mean + 4 std) needs a second
physical batch, whose clipped sum is accumulated before the noise (``Step.run``).

Drawing a Binomial(N, q) size and then a uniform subset of that size without replacement
is the same distribution over subsets as N independent Bernoulli(q) coins.

:class:`ShuffledSampler` gives shuffled fixed-size batches (each epoch a permutation,
split into consecutive batches). It is an explicit opt-in: DP-SGD's usual accounting for it
is only a heuristic, and the epsilon jaxdp reports for it assumes Poisson sampling.

References:
  Abadi et al., "Deep learning with differential privacy", CCS 2016, arXiv:1607.00133.
  Chua et al., "How private are DP-SGD implementations?", ICML 2024, arXiv:2403.17673
  (shuffling is not Poisson sampling).
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np

from jaxdp import _validate
from jaxdp.keys import secure_seed


class PhysicalBatch(NamedTuple):
  """Indices into the dataset and a mask; padding rows point at index 0 with mask False."""

  indices: np.ndarray  # (P,) int32
  mask: np.ndarray  # (P,) bool


def default_physical_batch_size(expected_batch_size: float, sampling_prob: float) -> int:
  """mean + 4 std of Binomial(N, q), rounded up to a multiple of 8."""
  std = math.sqrt(expected_batch_size * (1.0 - sampling_prob))
  return max(8, math.ceil((expected_batch_size + 4.0 * std) / 8.0) * 8)


def _pad(indices: np.ndarray, size: int) -> list[PhysicalBatch]:
  """Splits ``indices`` into padded physical batches of ``size`` (at least one batch)."""
  out = []
  for start in range(0, max(len(indices), 1), size):
    part = indices[start : start + size]
    idx = np.zeros(size, np.int32)
    idx[: len(part)] = part
    mask = np.zeros(size, bool)
    mask[: len(part)] = True
    out.append(PhysicalBatch(idx, mask))
  return out


class PoissonSampler:
  """Poisson subsampling with fixed-shape padded batches.

  Args:
    num_examples: N, the size of the private dataset.
    expected_batch_size: q * N; give this or ``sampling_prob``.
    sampling_prob: q in (0, 1]; give this or ``expected_batch_size``.
    physical_batch_size: the fixed shape the step sees; default mean + 4 std.
    row_multiple: the physical batch size is rounded up to a multiple of this (the devices
      a sharded step splits its rows over; :func:`jaxdp.parallel.row_multiple`).
    seed: seeds the host generator. None (the default) draws a secret seed from the OS
      (:func:`jaxdp.keys.secure_seed`): which examples a step used is part of the privacy
      mechanism and must not be derivable from anything released. An int or a
      ``numpy.random.SeedSequence`` reproduces the same batches (tests, debugging).

  Formal guarantees:
    Each example is included at each step independently of every other example and of
    every other step, with probability exactly ``sampling_prob``; every included example is
    in exactly one physical batch and nothing else is (padding rows have mask False).
  """

  poisson = True

  def __init__(
    self,
    num_examples: int,
    *,
    expected_batch_size: float | None = None,
    sampling_prob: float | None = None,
    physical_batch_size: int | None = None,
    row_multiple: int = 1,
    seed: int | np.random.SeedSequence | None = None,
  ) -> None:
    _validate.positive_int("num_examples", num_examples)
    _validate.positive_int("row_multiple", row_multiple)
    if (expected_batch_size is None) == (sampling_prob is None):
      raise ValueError("give exactly one of expected_batch_size and sampling_prob")
    if sampling_prob is None:
      _validate.positive("expected_batch_size", expected_batch_size)
      if expected_batch_size > num_examples:
        raise ValueError(
          f"expected_batch_size must be <= the dataset size {num_examples}, "
          f"got {expected_batch_size}"
        )
      sampling_prob = expected_batch_size / num_examples
    _validate.probability("sampling_prob", sampling_prob)
    self.num_examples = num_examples
    self.sampling_prob = float(sampling_prob)
    self.expected_batch_size = self.sampling_prob * num_examples
    if physical_batch_size is None:
      physical_batch_size = min(
        default_physical_batch_size(self.expected_batch_size, self.sampling_prob),
        max(8, math.ceil(num_examples / 8) * 8),
      )
    _validate.positive_int("physical_batch_size", physical_batch_size)
    self.physical_batch_size = -(-physical_batch_size // row_multiple) * row_multiple
    self._rng = np.random.default_rng(secure_seed() if seed is None else seed)

  @property
  def steps_per_epoch(self) -> int:
    """round(1 / q): the number of steps that sees N examples in expectation."""
    return max(1, round(1.0 / self.sampling_prob))

  def sample(self) -> list[PhysicalBatch]:
    """Draws one logical batch; returns its physical batches (usually one)."""
    size = self._rng.binomial(self.num_examples, self.sampling_prob)
    chosen = self._rng.choice(self.num_examples, size=size, replace=False).astype(np.int32)
    return _pad(chosen, self.physical_batch_size)


class ShuffledSampler:
  """Shuffled fixed-size batches (an explicit opt-in, NOT Poisson sampling).

  Each epoch draws a permutation and cuts it into ``batch_size`` batches; the last partial
  batch is dropped. The epsilon jaxdp reports for such a run is computed as if the batches
  were Poisson sampled with q = batch_size / N, which is not what ran: a warning says so.
  ``seed``: as for :class:`PoissonSampler` (None: a secret seed from the OS).
  """

  poisson = False

  def __init__(
    self,
    num_examples: int,
    *,
    batch_size: int,
    seed: int | np.random.SeedSequence | None = None,
  ) -> None:
    _validate.positive_int("num_examples", num_examples)
    _validate.positive_int("batch_size", batch_size)
    if batch_size > num_examples:
      raise ValueError(f"batch_size must be <= the dataset size {num_examples}, got {batch_size}")
    warnings.warn(
      "ShuffledSampler: fixed-size shuffled batches are not Poisson sampling; the reported "
      "epsilon assumes Poisson sampling and may understate the privacy loss.",
      stacklevel=2,
    )
    self.num_examples = num_examples
    self.physical_batch_size = batch_size
    self.expected_batch_size = float(batch_size)
    self.sampling_prob = batch_size / num_examples
    self._rng = np.random.default_rng(secure_seed() if seed is None else seed)
    self._queue: list[np.ndarray] = []

  @property
  def steps_per_epoch(self) -> int:
    """Number of full batches in one pass."""
    return self.num_examples // self.physical_batch_size

  def sample(self) -> list[PhysicalBatch]:
    """The next batch of the current epoch (a new permutation when one runs out)."""
    if not self._queue:
      perm = self._rng.permutation(self.num_examples).astype(np.int32)
      b = self.physical_batch_size
      self._queue = [perm[i : i + b] for i in range(0, self.steps_per_epoch * b, b)]
    idx = self._queue.pop(0)
    return [PhysicalBatch(idx, np.ones(len(idx), bool))]
