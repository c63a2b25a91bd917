"""Secret randomness for the privacy mechanism: noise keys and sampling seeds from the OS.

DP-SGD's guarantee assumes that the Gaussian noise and the Poisson batches are unknown to
whoever sees the released model. A key derived from a seed that is written down (a
``--seed`` flag in ``config.json``) lets anyone regenerate every noise draw and subtract it.
So the mechanism's randomness is drawn here from the operating system's secure source
(:func:`secrets.randbits`, i.e. ``os.urandom``) and is never written anywhere; a seed governs
only what is public (initialisation, data splits, the order of synthetic labels).

    state = jaxdp.init_state(params, optimizer, jaxdp.secure_key())
    sampler = jaxdp.PoissonSampler(n, expected_batch_size=256)      # seeded from the OS

:class:`KeySource` hands out one independent key (or sampler seed) per named use, so the jobs
of a sweep never share a noise draw. Its reproducible mode derives them from a seed instead,
for debugging and tests only: it is the opposite of a secure mode and says so.

Note: the secret is the seed. The generators it seeds (JAX's Threefry-2x32, NumPy's PCG64)
are statistical generators, not certified cryptographic ones, as in Opacus's default mode.
"""

from __future__ import annotations

import hashlib
import secrets

import jax
import numpy as np

from jaxdp import _validate

__all__ = ["KeySource", "secure_key", "secure_seed"]

# Keeps the reproducible noise apart from anything else derived from the same public seed.
_NOISE_DOMAIN = 0x6A617864  # "jaxd"


def _entropy_128() -> int:
  """128 bits from the OS's secure source; with several JAX processes (hosts), process 0's
  bits on every process, so that all draw the same batches and the same noise."""
  bits = secrets.randbits(128)
  if jax.process_count() == 1:
    return bits
  from jax.experimental import multihost_utils

  words = np.array([(bits >> (32 * i)) & 0xFFFFFFFF for i in range(4)], np.uint32)
  words = np.asarray(multihost_utils.broadcast_one_to_all(words))
  return sum(int(w) << (32 * i) for i, w in enumerate(words))


def secure_seed() -> np.random.SeedSequence:
  """A NumPy seed of 128 bits from the OS's secure source (for a sampler's generator)."""
  return np.random.SeedSequence(_entropy_128())


def _key_from(seq: np.random.SeedSequence) -> jax.Array:
  """A Threefry key holding 64 bits of ``seq`` (all of its key space)."""
  return jax.random.wrap_key_data(seq.generate_state(2, np.uint32), impl="threefry2x32")


def secure_key() -> jax.Array:
  """A fresh JAX PRNG key (Threefry-2x32, 64 bits) from the OS's secure source.

  Use it for everything the privacy mechanism draws: ``init_state(params, opt,
  secure_key())`` seeds the step's noise and per-example keys. Never derive it from, or
  write it next to, a seed that is released.
  """
  return _key_from(secure_seed())


def _path_words(name: str) -> tuple[int, ...]:
  """A stable tuple of 32-bit words for a use's name (its SHA-256, first 128 bits)."""
  digest = hashlib.sha256(name.encode()).digest()[:16]
  return tuple(int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4))


class KeySource:
  """Independent secret keys and sampler seeds, one per named use.

  Args:
    insecure_seed: None (the default) draws 128 bits of entropy from the OS, so every run
      draws different noise and batches, and nothing written down can regenerate them. An
      integer >= 0 derives everything from it instead (``--insecure-reproducible-noise``):
      two runs with the same seed draw the same noise. For debugging, tests and training on
      public data only: with the seed written down, the noise is public and a run on
      private data has no DP guarantee.

  Every use is named (e.g. ``"DP-SGD eps=2/noise"``); different names give independent
  streams (``SeedSequence`` children keyed by the name's hash), in both modes.

  Formal guarantees:
    In the default mode the keys are a function of OS entropy alone, which is never
    stored. In both modes two different names never share a key or a sampler seed.
  """

  def __init__(self, insecure_seed: int | None = None) -> None:
    if insecure_seed is None:
      self._entropy: int | list[int] = _entropy_128()
    else:
      _validate.non_negative_int("insecure_seed", insecure_seed)
      self._entropy = [insecure_seed, _NOISE_DOMAIN]
    self.secure = insecure_seed is None
    self._names: set[str] = set()

  def _seq(self, name: str) -> np.random.SeedSequence:
    if not isinstance(name, str) or not name:
      raise ValueError(f"name must be a non-empty string, got {name!r}")
    if name in self._names:
      raise ValueError(f"name {name!r} was already used: every use gets its own name")
    self._names.add(name)
    return np.random.SeedSequence(self._entropy, spawn_key=_path_words(name))

  def key(self, name: str) -> jax.Array:
    """The JAX key of use ``name`` (e.g. a training state's noise and per-example keys)."""
    return _key_from(self._seq(name))

  def seed(self, name: str) -> np.random.SeedSequence:
    """The NumPy seed of use ``name`` (e.g. ``PoissonSampler(..., seed=source.seed(n))``)."""
    return self._seq(name)
