"""The JAX peers: optax's DP aggregate (``vmap(grad)``) and JAX-Privacy 2.0's ``clipped_grad``."""

from __future__ import annotations

from typing import Any

from benchmarks.workers.common import L2_NORM_CLIP, LEARNING_RATE, NOISE_MULTIPLIER
from benchmarks.workers.jax_setup import JaxSetup


def optax_dp(s: JaxSetup) -> tuple[Any, Any, Any]:
  """``(fn, call, state)``: per-example gradients by ``vmap(grad)`` and
  ``optax.contrib.differentially_private_aggregate``, jitted."""
  import jax
  import optax

  tx = optax.chain(
    optax.contrib.differentially_private_aggregate(
      l2_norm_clip=L2_NORM_CLIP, noise_multiplier=NOISE_MULTIPLIER, key=jax.random.key(1)
    ),
    optax.sgd(LEARNING_RATE),
  )
  keyed = s.keyed

  def one_grad(p, *rows):  # the example's columns, then its key if keyed
    cols = [r[None] for r in rows[: len(rows) - keyed]]
    return jax.grad(s.batch_loss)(p, *cols, *rows[len(rows) - keyed :])

  per_example_grads = jax.vmap(one_grad, in_axes=(None,) + (0,) * (len(s.columns) + keyed))

  @jax.jit
  def fn(st, d, i, m):
    del m  # optax's aggregate takes no padding mask; every row is real here
    p, opt_state, *key = st
    keys = ()
    if keyed:
      key[0], sub = jax.random.split(key[0])
      keys = (jax.random.split(sub, i.shape[0]),)
    grads = per_example_grads(p, *s.gather(d, i), *keys)
    updates, opt_state = tx.update(grads, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state, *key), None

  return fn, fn, (s.params, tx.init(s.params), *[jax.random.key(2)] * keyed)


def jax_privacy(s: JaxSetup) -> tuple[Any, Any, Any]:
  """``(fn, call, state)``: JAX-Privacy's ``clipped_grad`` (normalised by the batch size)
  and its Gaussian privatizer, jitted."""
  import jax
  import jax_privacy as jp
  import optax
  from jax_privacy import noise_addition

  s.info["jax_privacy"] = jp.__version__
  keyed = s.keyed
  # Sum of clipped per-example gradients divided by the public batch size; its sensitivity
  # (clip / batch) scales the Gaussian privatizer's noise.
  # For the VAE JAX-Privacy splits the key into one per example (prng_argnum).
  n = len(s.columns)
  grad_fn = jp.clipped_grad(
    s.batch_loss,
    l2_clip_norm=L2_NORM_CLIP,
    batch_argnums=tuple(range(1, 1 + n)),
    normalize_by=s.batch,
    prng_argnum=1 + n if keyed else None,
  )
  privatizer = noise_addition.gaussian_privatizer(
    stddev=grad_fn.sensitivity() * NOISE_MULTIPLIER, prng_key=jax.random.key(1)
  )
  sgd = optax.sgd(LEARNING_RATE)

  @jax.jit
  def fn(st, d, i, m):
    p, noise_state, opt_state, *key = st
    keys = ()
    if keyed:
      key[0], sub = jax.random.split(key[0])
      keys = (sub,)
    grads = grad_fn(p, *s.gather(d, i), *keys, is_padding_example=~m)
    grads, noise_state = privatizer.update(grads, noise_state)
    updates, opt_state = sgd.update(grads, opt_state, p)
    return (optax.apply_updates(p, updates), noise_state, opt_state, *key), None

  state = (s.params, privatizer.init(s.params), sgd.init(s.params), *[jax.random.key(2)] * keyed)
  return fn, fn, state
