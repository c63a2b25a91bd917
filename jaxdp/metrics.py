"""Evaluation metrics; for now, classifier accuracy and mean loss on a whole dataset.

:func:`evaluate_classifier` runs one jitted program per (model, chunk size, dataset shape):
the dataset is padded to a whole number of chunks and mapped over chunk by chunk with
``lax.map``, so memory stays bounded by one chunk's activations and the host never loops.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxdp import _validate
from jaxdp.data import Dataset

__all__ = ["evaluate_classifier"]

PyTree = Any


@functools.lru_cache(maxsize=32)
def _classifier_evaluator(model: nn.Module, chunk_size: int):
  """The jitted ``(params, images, labels) -> (correct, loss sum)`` for ``model``."""

  def chunk_stats(params, chunk):
    images, labels, mask = chunk
    logits = model.apply({"params": params}, images)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = jnp.argmax(logits, -1) == labels
    return jnp.sum(jnp.where(mask, correct, 0)), jnp.sum(jnp.where(mask, losses, 0.0))

  @jax.jit
  def evaluate(params, images, labels):
    n = images.shape[0]
    chunk = min(chunk_size, n)
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    mask = jnp.arange(n + pad) < n
    images = jnp.pad(images, [(0, pad)] + [(0, 0)] * (images.ndim - 1))
    labels = jnp.pad(labels, (0, pad))
    chunks = (
      images.reshape(n_chunks, chunk, *images.shape[1:]),
      labels.reshape(n_chunks, chunk),
      mask.reshape(n_chunks, chunk),
    )
    correct, loss = jax.lax.map(functools.partial(chunk_stats, params), chunks)
    return jnp.sum(correct), jnp.sum(loss)

  return evaluate


def evaluate_classifier(
  model: nn.Module,
  params: PyTree,
  data: Dataset | dict[str, jax.Array],
  *,
  chunk_size: int = 1000,
) -> dict[str, float]:
  """Accuracy and mean softmax cross-entropy of a classifier on a whole dataset.

  Args:
    model: a Flax module mapping images ``(B, H, W, C)`` to logits ``(B, num_classes)``; it
      must be hashable (Linen modules are), since the jitted evaluator is cached per model.
    params: the model's parameters (e.g. ``state.params`` or an EMA of them).
    data: a :class:`~jaxdp.data.Dataset` or a dict with ``"image"`` and ``"label"`` arrays.
    chunk_size: examples per forward pass, >= 1.

  Returns:
    ``{"accuracy": ..., "loss": ...}`` as floats, averaged over all examples.

  Raises:
    ValueError: if ``chunk_size`` is out of range or ``data`` is empty.
  """
  _validate.positive_int("chunk_size", chunk_size)
  if isinstance(data, Dataset):
    images, labels = data.images, data.labels
  else:
    images, labels = data["image"], data["label"]
  n = int(labels.shape[0])
  if n == 0:
    raise ValueError("data must hold at least one example")
  correct, loss = _classifier_evaluator(model, chunk_size)(
    params, jnp.asarray(images), jnp.asarray(labels)
  )
  return {"accuracy": float(correct) / n, "loss": float(loss) / n}
