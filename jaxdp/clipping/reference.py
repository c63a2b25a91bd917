"""The reference clipping engine: per-example gradients by ``jax.vmap(jax.grad(loss_fn))``.

Every per-example gradient is materialised, its global L2 norm taken over the whole pytree,
scaled by ``min(1, C / norm)`` and summed over the real rows of the batch:

    g_i = grad_params loss(params, x_i, rng_i)
    sum_i mask_i * g_i * min(1, C / ||g_i||_2).

It is the definition the fast engine is tested against and the path every model can take.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdp.clipping._common import (
  ClippedSum,
  PerExampleLoss,
  PyTree,
  accumulation_dtype,
  clip_factors,
  split_loss,
  tree_masked_weighted_sum,
)


def per_example_grads(
  loss_fn: PerExampleLoss,
  params: PyTree,
  batch: PyTree,
  rngs: jax.Array,
  *,
  has_aux: bool = False,
) -> tuple[PyTree, jax.Array, PyTree]:
  """Materialised per-example gradients.

  Args:
    loss_fn: ``loss_fn(params, example, rng)`` for ONE example.
    params: model parameters (any pytree).
    batch: pytree of arrays with a leading batch axis B.
    rngs: (B,) keys, one per example.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    ``(grads, losses, aux)``: grads has a leading axis B on every leaf.
  """

  def one(p, ex, rng):
    return split_loss(loss_fn(p, ex, rng), has_aux)

  vg = jax.value_and_grad(one, has_aux=True)
  (losses, aux), grads = jax.vmap(vg, in_axes=(None, 0, 0))(params, batch, rngs)
  return grads, losses, aux


def _tree_sq_norms(grads: PyTree) -> jax.Array:
  leaves = jax.tree_util.tree_leaves(grads)
  sq = lambda g: jnp.square(g.astype(accumulation_dtype(g.dtype))).reshape(g.shape[0], -1)
  return sum(jnp.sum(sq(g), axis=1) for g in leaves)


def clipped_sum(
  loss_fn: PerExampleLoss,
  params: PyTree,
  batch: PyTree,
  mask: jax.Array,
  rngs: jax.Array,
  l2_norm_clip: float | PyTree,
  *,
  has_aux: bool = False,
) -> ClippedSum:
  """Sum of per-example clipped gradients by the vmap reference engine.

  Args:
    loss_fn: ``loss_fn(params, example, rng)`` for ONE example.
    params: parameters.
    batch: pytree of (B, ...) arrays.
    mask: (B,) bool, False on padding rows.
    rngs: (B,) per-example keys.
    l2_norm_clip: a float C (global clipping) or a pytree of floats that is a prefix of
      ``params`` (per-layer clipping: group k clipped to C_k; the total sensitivity is
      sqrt(sum_k C_k^2)).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    A :class:`ClippedSum`. Under per-layer clipping ``clip_factors`` holds the smallest
    factor any group of the example received, and ``per_example_norms`` the global norm.

  Formal guarantees:
    For every real row i the contribution has L2 norm <= C (global) or <= C_k on group k
    (per-layer), computed and summed in float32 whatever the parameters' dtype; padding
    rows, and real rows whose gradient (of a group, under per-layer clipping) holds a NaN or
    an inf, contribute exactly zero (their clip factor is 0).
  """
  mask = mask.astype(bool)
  grads, losses, aux = per_example_grads(loss_fn, params, batch, rngs, has_aux=has_aux)
  # Padding rows may hold NaN gradients: zero them before any norm is formed.
  grads = jax.tree_util.tree_map(
    lambda g: jnp.where(mask.reshape((-1,) + (1,) * (g.ndim - 1)), g, 0), grads
  )
  norms = jnp.sqrt(_tree_sq_norms(grads))
  losses = jnp.where(mask, losses, 0.0)
  if isinstance(l2_norm_clip, (int, float)):
    factors = clip_factors(norms, float(l2_norm_clip), mask)
    summed = tree_masked_weighted_sum(grads, factors)
    return ClippedSum(summed, norms, factors, losses, aux)

  # Per-layer clipping: l2_norm_clip is a prefix tree of params; clip each group on its own.
  # An example with a NaN or inf anywhere in its gradient contributes to no group.
  bounds, bounds_def = jax.tree_util.tree_flatten(l2_norm_clip)
  finite = mask & jnp.isfinite(norms)
  sums, group_factors = [], []
  for bound, sub in zip(bounds, bounds_def.flatten_up_to(grads), strict=True):
    f = clip_factors(jnp.sqrt(_tree_sq_norms(sub)), float(bound), finite)
    sums.append(tree_masked_weighted_sum(sub, f))
    group_factors.append(f)
  factors = jnp.min(jnp.stack(group_factors), axis=0)
  return ClippedSum(bounds_def.unflatten(sums), norms, factors, losses, aux)
