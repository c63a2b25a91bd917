"""Evaluation metrics: classifier accuracy, and FID / IS analogues on a feature network.

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
import numpy as np
import optax

from jaxdp import _validate
from jaxdp.data import Dataset

__all__ = [
  "classifier_outputs",
  "evaluate_classifier",
  "feature_scores",
  "feature_statistics",
  "frechet_distance",
  "inception_score",
  "mode_coverage",
  "per_class_accuracy",
]

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


# -- generative metrics on a feature network ---------------------------------------------
#
# FID (Heusel et al. 2017) and IS (Salimans et al. 2016) are defined on an ImageNet Inception
# network. For MNIST-like data jaxdp computes the same formulas on a small classifier trained
# on the real data: its penultimate-layer activations are the features and its softmax the
# class posterior. The numbers rank generators against each other under one fixed feature
# network; they are NOT Inception FID / IS and are not comparable to values in papers.


def _head_input_and_logits(model: nn.Module, params: PyTree, images: jax.Array):
  """(input of the last Dense layer called, flattened; logits) for a batch of images."""
  seen: list[jax.Array] = []

  def interceptor(next_fun, args, kwargs, ctx):
    if isinstance(ctx.module, nn.Dense) and ctx.method_name == "__call__":
      seen.append(args[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    logits = model.apply({"params": params}, images)
  if not seen:
    raise ValueError(f"{type(model).__name__} calls no Dense layer: no penultimate features")
  return seen[-1].reshape(images.shape[0], -1), logits


@functools.lru_cache(maxsize=32)
def _output_extractor(model: nn.Module, chunk_size: int):
  """The jitted ``(params, images) -> (features, logits)`` for ``model``, chunk by chunk."""

  @jax.jit
  def extract(params, images):
    n = images.shape[0]
    chunk = min(chunk_size, n)
    n_chunks = -(-n // chunk)
    images = jnp.pad(images, [(0, n_chunks * chunk - n)] + [(0, 0)] * (images.ndim - 1))
    chunks = images.reshape(n_chunks, chunk, *images.shape[1:])
    feats, logits = jax.lax.map(lambda c: _head_input_and_logits(model, params, c), chunks)
    flat = lambda a: a.reshape(n_chunks * chunk, *a.shape[2:])[:n]
    return flat(feats), flat(logits)

  return extract


def classifier_outputs(
  model: nn.Module, params: PyTree, images: np.ndarray | jax.Array, *, chunk_size: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
  """Penultimate features and logits of a classifier on a set of images.

  The features are the input of the last ``Dense`` layer the model calls (its classifier
  head), flattened: for the TF-Privacy CNN the 32 hidden units after their activation.

  Args:
    model: a Flax classifier ``(B, H, W, C) -> (B, K)`` ending in a ``Dense`` layer.
    params: its parameters.
    images: ``(N, H, W, C)``.
    chunk_size: images per forward pass, >= 1.

  Returns:
    ``(features (N, D), logits (N, K))`` as float numpy arrays.
  """
  _validate.positive_int("chunk_size", chunk_size)
  if images.shape[0] == 0:
    raise ValueError("images must hold at least one image")
  feats, logits = _output_extractor(model, chunk_size)(params, jnp.asarray(images))
  return np.asarray(feats), np.asarray(logits)


def per_class_accuracy(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> list[float]:
  """Accuracy on the examples of each class (NaN for a class with no example)."""
  _validate.positive_int("num_classes", num_classes)
  pred = np.argmax(np.asarray(logits), axis=-1)
  labels = np.asarray(labels)
  out = []
  for c in range(num_classes):
    sel = labels == c
    out.append(float(np.mean(pred[sel] == c)) if sel.any() else float("nan"))
  return out


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean ``(D,)`` and covariance ``(D, D)`` (unbiased, float64) of ``(N, D)`` features."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"features must be (N, D) with N >= 2, got shape {f.shape}")
  return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric PSD matrix (negative eigenvalues set to 0)."""
  w, v = np.linalg.eigh((a + a.T) / 2)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
  """Frechet (2-Wasserstein) distance between N(mu1, cov1) and N(mu2, cov2).

      d^2 = ||mu1 - mu2||^2 + tr(cov1) + tr(cov2) - 2 tr((cov1 cov2)^{1/2})

  computed without a general matrix square root: ``cov1 cov2`` is similar to the symmetric
  PSD matrix ``M = cov1^{1/2} cov2 cov1^{1/2}``, so ``tr((cov1 cov2)^{1/2}) = sum_i
  sqrt(lambda_i(M))``, from ``eigh`` (stable where ``scipy.linalg.sqrtm`` can turn complex).

  Returns:
    ``d^2`` (the quantity FID reports), a float >= 0 up to rounding.

  Formal guarantees:
    0 (to rounding) for identical statistics; symmetric in its two Gaussians.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
  if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != mu1.shape * 2:
    raise ValueError(
      f"shapes must be mu (D,), cov (D, D) for both; got {mu1.shape}, {cov1.shape}, "
      f"{mu2.shape}, {cov2.shape}"
    )
  root1 = _sqrtm_psd(cov1)
  eig = np.linalg.eigvalsh(root1 @ cov2 @ root1)
  tr_sqrt = float(np.sum(np.sqrt(np.clip(eig, 0.0, None))))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_sqrt)


def inception_score(logits: np.ndarray) -> float:
  """``exp(E_x KL(p(y | x) || p(y)))`` of a classifier's logits, with ``p(y) = E_x p(y | x)``.

  Between 1 (every image gets the same posterior) and K (confident and class-balanced).
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or logits.shape[0] == 0:
    raise ValueError(f"logits must be (N, K) with N >= 1, got shape {logits.shape}")
  log_p = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
  p = np.exp(log_p)
  log_py = np.log(np.maximum(p.mean(axis=0), 1e-300))
  kl = np.sum(p * (log_p - log_py), axis=1)
  return float(np.exp(kl.mean()))


def _class_spread(features: np.ndarray) -> float:
  """``sqrt(tr Cov)``: the root-mean-square distance of features from their mean."""
  f = np.asarray(features, np.float64)
  return float(np.sqrt(np.mean(np.sum((f - f.mean(axis=0)) ** 2, axis=1))))


def mode_coverage(
  features: np.ndarray,
  logits: np.ndarray,
  labels: np.ndarray,
  reference_features: np.ndarray,
  reference_labels: np.ndarray,
  num_classes: int,
) -> dict[str, float]:
  """How much of the data a class-conditional generator covers, seen by a real-data classifier.

  On the generated images (features and logits of a classifier trained on REAL data, labels
  the ones each image was generated for):

  * ``classes_predicted``: how many distinct classes the classifier ever predicts (a
    generator that collapsed onto a few modes makes it predict few);
  * ``label_agreement``: the fraction whose prediction is the label it was generated for;
  * ``diversity`` / ``diversity_min``: per class ``c``, the spread ``sqrt(tr Cov)`` of the
    generated images' features over the spread of the reference images of ``c`` (1: as
    varied as real data; near 0: one image per class), averaged over classes / the worst
    class. Classes with fewer than 2 images on either side are skipped (NaN if none is left).

  Returns:
    ``{"classes_predicted", "label_agreement", "diversity", "diversity_min"}`` as floats.
  """
  _validate.positive_int("num_classes", num_classes)
  labels, reference_labels = np.asarray(labels), np.asarray(reference_labels)
  if len(labels) != len(features) or len(reference_labels) != len(reference_features):
    raise ValueError("features and labels must have one row per image, on both sides")
  pred = np.argmax(np.asarray(logits), axis=-1)
  ratios = []
  for c in range(num_classes):
    gen, ref = features[labels == c], reference_features[reference_labels == c]
    if len(gen) >= 2 and len(ref) >= 2:
      ratios.append(_class_spread(gen) / max(_class_spread(ref), 1e-12))
  return {
    "classes_predicted": float(len(np.unique(pred))),
    "label_agreement": float(np.mean(pred == labels)),
    "diversity": float(np.mean(ratios)) if ratios else float("nan"),
    "diversity_min": float(np.min(ratios)) if ratios else float("nan"),
  }


def feature_scores(
  model: nn.Module,
  params: PyTree,
  reference_images: np.ndarray,
  images: np.ndarray,
  *,
  reference_labels: np.ndarray | None = None,
  labels: np.ndarray | None = None,
  chunk_size: int = 1000,
) -> dict[str, float]:
  """Feature-network FID of ``images`` against ``reference_images``, and IS of both.

  ``model`` is a classifier trained on REAL data (e.g. the real training set) and used only
  as a fixed feature extractor; it is an evaluation tool and no part of any released
  artefact. Reading private data for it is evaluation, outside the privacy guarantee of
  what is released, exactly like computing the test accuracy.

  Warning:
    These are the formulas of FID and IS on this feature network, NOT Inception FID / IS:
    the values are comparable only between runs that use the same feature network, never
    to values reported in papers.

  Args:
    model: the feature classifier (its last layer a ``Dense`` head).
    params: its parameters.
    reference_images: ``(N1, H, W, C)``, e.g. the real test set.
    images: ``(N2, H, W, C)``, e.g. the synthetic set.
    reference_labels, labels: the two sets' labels; given both, the result also holds
      :func:`mode_coverage` of ``images``.
    chunk_size: images per forward pass.

  Returns:
    ``{"fid": d^2 between the two feature Gaussians, "inception_score": IS of images,
    "inception_score_reference": IS of reference_images}``, plus the mode coverage.

  References:
    Heusel, Ramsauer, Unterthiner, Nessler, Hochreiter. "GANs Trained by a Two Time-Scale
    Update Rule Converge to a Local Nash Equilibrium", NeurIPS 2017. arXiv:1706.08500
    Salimans, Goodfellow, Zaremba, Cheung, Radford, Chen. "Improved Techniques for Training
    GANs", NeurIPS 2016. arXiv:1606.03498
  """
  f_ref, l_ref = classifier_outputs(model, params, reference_images, chunk_size=chunk_size)
  f_gen, l_gen = classifier_outputs(model, params, images, chunk_size=chunk_size)
  fid = frechet_distance(*feature_statistics(f_ref), *feature_statistics(f_gen))
  out = {
    "fid": fid,
    "inception_score": inception_score(l_gen),
    "inception_score_reference": inception_score(l_ref),
  }
  if labels is not None and reference_labels is not None:
    out.update(mode_coverage(f_gen, l_gen, labels, f_ref, reference_labels, l_ref.shape[-1]))
  return out
