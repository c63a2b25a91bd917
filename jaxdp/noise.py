"""Gaussian noise on the sum of clipped gradients, and its normalisation.

The Gaussian mechanism of DP-SGD (Abadi et al. 2016, arXiv:1607.00133, Algorithm 1):

    g_noisy = (sum_i clip_C(g_i) + N(0, (sigma * S)^2 I)) / B_norm

where S is the L2 sensitivity of the clipped sum (C for global clipping, sqrt(sum_k C_k^2)
for per-layer bounds C_k), sigma the noise multiplier, and B_norm a PUBLIC constant: the
expected batch size q*N under Poisson sampling (dividing by the realised batch size would
leak it), the fixed size for fixed-size batches.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def sensitivity(l2_norm_clip: float | PyTree) -> float:
  """L2 sensitivity of the clipped sum: C, or sqrt(sum_k C_k^2) for per-layer bounds."""
  bounds = jax.tree_util.tree_leaves(l2_norm_clip)
  return math.sqrt(sum(float(c) ** 2 for c in bounds))


def add_gaussian_noise(tree: PyTree, key: jax.Array, stddev: float) -> PyTree:
  """Adds i.i.d. N(0, stddev^2) to every coordinate of every leaf.

  Each leaf gets its own key split from ``key``, so no two coordinates share noise.

  Args:
    tree: pytree of float arrays.
    key: PRNG key; must never be reused across steps.
    stddev: standard deviation, >= 0.

  Returns:
    The noised pytree, same structure and dtypes.
  """
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(key, len(leaves))
  noised = [
    x + (stddev * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
    for x, k in zip(leaves, keys, strict=True)
  ]
  return jax.tree_util.tree_unflatten(treedef, noised)


def privatize(
  sum_of_clipped_grads: PyTree,
  key: jax.Array,
  *,
  l2_norm_clip: float | PyTree,
  noise_multiplier: float,
  normalizer: float,
) -> PyTree:
  """(sum + N(0, (noise_multiplier * sensitivity)^2)) / normalizer.

  Formal guarantees:
    With ``noise_multiplier = 0`` this is exactly the clipped mean; the noise's standard
    deviation per coordinate is ``noise_multiplier * sensitivity(l2_norm_clip) / normalizer``
    after normalisation.
  """
  stddev = noise_multiplier * sensitivity(l2_norm_clip)
  noised = (
    add_gaussian_noise(sum_of_clipped_grads, key, stddev) if stddev > 0 else sum_of_clipped_grads
  )
  return jax.tree_util.tree_map(lambda x: x / normalizer, noised)
