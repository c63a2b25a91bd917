"""Labelled synthetic datasets from trained class-conditional generators.

A synthetic dataset is ``N`` pairs ``(x, y)``: the labels are fixed first, then a
conditional generator draws one image per label. Both parts must be private:

* the images are a function of the generator's parameters (DP when trained with DP-SGD)
  and of fresh randomness, so they are post-processing and cost nothing more;
* the label proportions are either public (equal proportions, the default) or a DP
  statistic of the private labels, :func:`dp_label_proportions`: the Gaussian mechanism on
  the label histogram, entered into the same :class:`~jaxdp.accounting.PrivacyLedger` as
  the generator's training, so the pipeline's epsilon covers it.

Using any un-noised statistic of the private data during sampling (the real class counts,
per-class latent means of the training images) would leak and is not offered here.

    labels = balanced_labels(60_000, 10, seed=0)
    images = sample_images(vae, params, labels, key)       # any conditional generator
    ds = labelled_dataset(images, labels, 10, "vae/eps10")
    save_npz("synthetic.npz", ds)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from jaxdp import _validate
from jaxdp.accounting import PrivacyLedger
from jaxdp.data import Dataset

__all__ = [
  "Generator",
  "class_counts",
  "dp_label_proportions",
  "labels_for_counts",
  "load_npz",
  "sample_dataset",
  "save_npz",
]

# generator(labels (N,) int32, key) -> images (N, H, W, C) float in [0, 1]
Generator = Callable[[np.ndarray, jax.Array], jax.Array]


def class_counts(
  num_samples: int, num_classes: int, proportions: np.ndarray | None = None
) -> np.ndarray:
  """How many samples of each class: ``num_samples`` split by ``proportions``.

  Rounds by largest remainder (Hamilton's method): each class gets ``floor(N p_c)`` and the
  ``N - sum floor(N p_c)`` classes with the largest remainders get one more, so the counts
  add up to ``N`` exactly and each is within one of ``N p_c``.

  Args:
    num_samples: N, >= 1.
    num_classes: K, >= 1.
    proportions: K non-negative numbers with a positive sum (normalised here); None for
      equal proportions.

  Returns:
    ``(K,)`` int64 counts summing to ``num_samples``.

  Raises:
    ValueError: if an argument is outside its range.
  """
  _validate.positive_int("num_samples", num_samples)
  _validate.positive_int("num_classes", num_classes)
  if proportions is None:
    p = np.full(num_classes, 1.0 / num_classes)
  else:
    p = np.asarray(proportions, np.float64)
    if p.shape != (num_classes,) or not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
      raise ValueError(
        f"proportions must be {num_classes} finite numbers >= 0 with a positive sum, got {p}"
      )
    p = p / p.sum()
  exact = num_samples * p
  counts = np.floor(exact).astype(np.int64)
  short = num_samples - int(counts.sum())
  if short:
    counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
  return counts


def labels_for_counts(counts: np.ndarray, seed: int = 0) -> np.ndarray:
  """A shuffled int32 label vector holding ``counts[c]`` copies of each class ``c``."""
  counts = np.asarray(counts)
  labels = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
  return np.random.default_rng(seed).permutation(labels).astype(np.int32)


def dp_label_proportions(
  labels: np.ndarray,
  num_classes: int,
  noise_multiplier: float,
  ledger: PrivacyLedger,
  *,
  seed: int,
  name: str = "label_counts",
) -> tuple[np.ndarray, np.ndarray]:
  """Class proportions of private labels by the Gaussian mechanism, recorded in ``ledger``.

  Releases ``h~ = h + N(0, sigma^2 I_K)`` for the label histogram ``h`` (``h_c`` = number of
  examples of class ``c``) and returns ``p_c = max(h~_c, 0) / sum_k max(h~_k, 0)`` (equal
  proportions if every noisy count is <= 0). Adding or removing one example changes one
  count by one, so the L2 sensitivity of ``h`` is 1 and ``sigma`` is the noise multiplier:
  ``ledger.add_gaussian(name, sigma)``.

  Args:
    labels: the private labels, ``(N,)`` ints in ``[0, num_classes)``.
    num_classes: K, >= 1.
    noise_multiplier: sigma, the noise std on each count, > 0.
    ledger: the pipeline's privacy ledger; this release is added to it.
    seed: seed of the noise (use a fresh one per release).
    name: ledger entry name.

  Returns:
    ``(proportions, noisy_counts)``: both ``(K,)`` float64; only these noised values (and
    functions of them) may be used downstream.

  Formal guarantees:
    The output depends on ``labels`` only through ``h + N(0, sigma^2 I)``: a Gaussian
    mechanism of sensitivity 1 under add-or-remove-one, i.e. ``GaussianDpEvent(sigma)``,
    which is what ``ledger`` records. The clipping at 0 and the normalisation are
    post-processing.
  """
  _validate.positive_int("num_classes", num_classes)
  _validate.positive("noise_multiplier", noise_multiplier)
  labels = np.asarray(labels)
  if labels.ndim != 1 or (labels.size and (labels.min() < 0 or labels.max() >= num_classes)):
    raise ValueError(f"labels must be a 1-D array of ints in [0, {num_classes - 1}]")
  histogram = np.bincount(labels, minlength=num_classes).astype(np.float64)
  noisy = histogram + noise_multiplier * np.random.default_rng(seed).standard_normal(num_classes)
  ledger.add_gaussian(name, noise_multiplier)
  positive = np.maximum(noisy, 0.0)
  if positive.sum() <= 0:
    return np.full(num_classes, 1.0 / num_classes), noisy
  return positive / positive.sum(), noisy


def sample_dataset(
  generator: Generator,
  num_samples: int,
  num_classes: int,
  key: jax.Array,
  *,
  proportions: np.ndarray | None = None,
  seed: int = 0,
  name: str = "synthetic",
) -> Dataset:
  """``num_samples`` labelled images from a class-conditional generator.

  Args:
    generator: ``generator(labels, key) -> images`` in [0, 1], e.g.
      ``functools.partial(jaxdp.models.sample_images, vae, params)``.
    num_samples: N, >= 1.
    num_classes: K, >= 1.
    key: PRNG key of the generator's randomness.
    proportions: class proportions (public, or from :func:`dp_label_proportions`); None for
      equal proportions.
    seed: seed of the label order.
    name: the dataset's name.

  Returns:
    A :class:`~jaxdp.data.Dataset` with float32 images in [0, 1] and int32 labels whose
    class counts are :func:`class_counts` of ``proportions``.

  Formal guarantees:
    The result is a function of the generator, ``key``, ``seed`` and ``proportions`` only,
    i.e. post-processing of them: it is as private as they are.
  """
  counts = class_counts(num_samples, num_classes, proportions)
  labels = labels_for_counts(counts, seed)
  images = np.asarray(jax.device_get(generator(labels, key)), np.float32)
  if images.shape[0] != num_samples or images.ndim != 4:
    raise ValueError(
      f"generator must return (N, H, W, C) images for N = {num_samples} labels, "
      f"got shape {images.shape}"
    )
  return Dataset(np.clip(images, 0.0, 1.0), labels, num_classes, name)


def save_npz(path: str | os.PathLike[str], dataset: Dataset) -> Path:
  """Writes ``images`` (float32, [0, 1], ``(N, H, W, C)``), ``labels`` (int32) and
  ``num_classes`` to a compressed ``.npz``; returns the path."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(
    path,
    images=dataset.images.astype(np.float32),
    labels=dataset.labels.astype(np.int32),
    num_classes=np.int32(dataset.num_classes),
  )
  return path


def load_npz(path: str | os.PathLike[str], name: str | None = None) -> Dataset:
  """Reads a dataset written by :func:`save_npz` (validated as a Dataset)."""
  with np.load(path) as f:
    return Dataset(f["images"], f["labels"], int(f["num_classes"]), name or Path(path).stem)
