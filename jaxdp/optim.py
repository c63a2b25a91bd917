"""Optimisers for the step: a name-to-optax factory and parameter averaging (EMA).

:func:`param_ema` wraps any optax transformation and keeps, in its state, an exponential
moving average of the parameters the wrapped optimiser produces:

    t       = t + 1
    decay_t = min(decay, (1 + t) / (10 + t))          (warm-up, when ``warmup=True``)
    ema_t   = decay_t * ema_{t-1} + (1 - decay_t) * params_t

The updates themselves pass through unchanged, so training follows exactly the same DP
iterates; the average is read with :func:`ema_params` and used for evaluation and release.
Averaging the iterates of DP-SGD is post-processing of its output and costs no privacy
(De et al. 2022 report it as one of the cheapest gains of DP training). Because the average
lives in the optimiser state, it is updated inside the jitted step and travels with the
``TrainState`` (checkpoints, the training loop) without any extra plumbing.

References:
  De, Berrada, Hayes, Smith, Balle. "Unlocking High-Accuracy Differentially Private Image
  Classification through Scale", 2022. https://arxiv.org/abs/2204.13650

  Polyak, Juditsky. "Acceleration of stochastic approximation by averaging", SIAM J. Control
  Optim. 1992.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxdp import _validate

__all__ = ["OPTIMIZERS", "ParamEMAState", "ema_params", "make_optimizer", "param_ema"]

PyTree = Any
OPTIMIZERS = ("sgd", "adam")


class ParamEMAState(NamedTuple):
  """State of :func:`param_ema`: the wrapped optimiser's state, the average and its count."""

  inner_state: optax.OptState
  ema: PyTree
  count: jax.Array


def param_ema(
  inner: optax.GradientTransformation, decay: float, *, warmup: bool = True
) -> optax.GradientTransformation:
  """Wraps ``inner`` to also keep an exponential moving average of the parameters.

  Args:
    inner: the optimiser whose iterates are averaged; its updates are returned unchanged.
    decay: EMA decay in [0, 1); 0 keeps the last iterate. Over ``T`` steps the average
      spans roughly the last ``1 / (1 - decay)`` iterates, so ``decay`` should leave that
      well below ``T``.
    warmup: use ``min(decay, (1 + t) / (10 + t))`` at step ``t`` so early iterates (and the
      initialisation) are forgotten quickly.

  Returns:
    An optax transformation whose ``update`` needs ``params``; read the average with
    :func:`ema_params` on its state.

  Formal guarantees:
    The updates equal ``inner``'s exactly; the average is a fixed function of the iterates
    (post-processing), so it has the privacy of the iterates.
  """
  _validate.probability("decay", decay, low_open=False, high_open=True)

  def init_fn(params: PyTree) -> ParamEMAState:
    ema = jax.tree_util.tree_map(jnp.array, params)  # a copy, not an alias of params
    return ParamEMAState(inner.init(params), ema, jnp.zeros((), jnp.int32))

  def update_fn(
    updates: PyTree, state: ParamEMAState, params: PyTree | None = None
  ) -> tuple[PyTree, ParamEMAState]:
    if params is None:
      raise ValueError("param_ema needs params in update(updates, state, params)")
    updates, inner_state = inner.update(updates, state.inner_state, params)
    new_params = optax.apply_updates(params, updates)
    count = state.count + 1
    d = jnp.asarray(decay, jnp.float32)
    if warmup:
      t = count.astype(jnp.float32)
      d = jnp.minimum(d, (1.0 + t) / (10.0 + t))
    ema = jax.tree_util.tree_map(
      lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), state.ema, new_params
    )
    return updates, ParamEMAState(inner_state, ema, count)

  return optax.GradientTransformation(init_fn, update_fn)


def ema_params(opt_state: optax.OptState) -> PyTree | None:
  """The parameter average held by a :func:`param_ema` state, or None for any other state."""
  return opt_state.ema if isinstance(opt_state, ParamEMAState) else None


def clip_weights(bound: float) -> optax.GradientTransformation:
  """An optax transform, chained last, that keeps every parameter in ``[-bound, bound]``
  (the WGAN critic's weight clipping): the update becomes ``clip(p + u) - p``."""
  if not bound > 0:
    raise ValueError(f"bound must be > 0, got {bound}")

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("clip_weights needs the params")
    new = jax.tree_util.tree_map(lambda p, u: jnp.clip(p + u, -bound, bound) - p, params, updates)
    return new, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(
  name: str,
  learning_rate: float,
  *,
  momentum: float | None = None,
  ema_decay: float | None = None,
  weight_clip: float | None = None,
) -> optax.GradientTransformation:
  """An optax optimiser by name, optionally with parameter averaging.

  Args:
    name: ``"sgd"`` (with optional heavy-ball ``momentum``) or ``"adam"``.
    learning_rate: step size, > 0.
    momentum: SGD momentum in [0, 1); None means plain SGD. Not accepted for Adam.
    ema_decay: if given (in [0, 1)), wrap the optimiser in :func:`param_ema`.
    weight_clip: if given, keep every parameter in ``[-weight_clip, weight_clip]``
      (:func:`clip_weights`, a WGAN critic's constraint).

  Returns:
    The optax transformation.

  Raises:
    ValueError: if an argument is outside its range.
  """
  _validate.one_of("optimizer", name, OPTIMIZERS)
  _validate.positive("learning_rate", learning_rate)
  if momentum is not None:
    if name != "sgd":
      raise ValueError(f"momentum applies to optimizer 'sgd' only, got optimizer {name!r}")
    _validate.probability("momentum", momentum, low_open=False, high_open=True)
  if name == "sgd":
    opt = optax.sgd(learning_rate, momentum=momentum or None)
  else:
    opt = optax.adam(learning_rate)
  if weight_clip is not None:
    opt = optax.chain(opt, clip_weights(weight_clip))
  return opt if ema_decay is None else param_ema(opt, ema_decay)
