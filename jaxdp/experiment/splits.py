"""The data splits of every experiment: private training set, validation, public, test.

A dataset's training split is partitioned once, by one seeded permutation (the seed is
public; so is the partition):

    perm        = permutation(N_train)                      (numpy, seed [seed, 7])
    public      = perm[:P]                                  (--public-size P)
    validation  = perm[P : P + V]                           (--validation-size V)
    private     = perm[P + V : P + V + T]                   (--train-size T, default the rest)

* ``private`` is what private training reads; every use of it is DP and accounted.
* ``validation`` is held out of every training run; hyperparameters, epoch counts and
  checkpoint choices are made on it, and the per-epoch curves of a run folder come from it.
  It is not covered by the DP guarantee (as any evaluation set), and choosing on it is a
  use of the data that the run does not account: the README says how defaults were chosen.
* ``public`` stands in for public data (e.g. the autoencoder of the latent-space route, the
  FID feature network): models trained on it without DP may be released, and it never
  enters private training.
* ``test`` is read once per released model, for the reported number
  (:meth:`Splits.final_test`): nothing is chosen on it.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from jaxdp import _validate, data

__all__ = ["SYNTHETIC_SIZES", "Splits", "load_splits"]

# Train and test sizes of the tiny "synthetic" dataset (tests and smoke runs).
SYNTHETIC_SIZES = (1500, 500)
_SPLIT_DOMAIN = 7


@dataclasses.dataclass
class Splits:
  """The partition of one dataset; see the module docstring.

  Attributes:
    private: the private training set.
    validation: held out for choices and curves (None when ``validation_size`` is 0).
    public: the public partition (None when ``public_size`` is 0).
    num_classes: the dataset's number of classes (public).
    test_reads: labels of the models the test set was read for, in order.
  """

  private: data.Dataset
  validation: data.Dataset | None
  public: data.Dataset | None
  num_classes: int
  _test: data.Dataset = dataclasses.field(repr=False)
  test_reads: list[str] = dataclasses.field(default_factory=list)

  def final_test(self, label: str) -> data.Dataset:
    """The test set, for the one reported number of model ``label``.

    Raises:
      RuntimeError: if the test set was already read for ``label`` (a second read is a
        choice made on it).
    """
    if label in self.test_reads:
      raise RuntimeError(f"the test set was already read for {label!r}: read it once per model")
    self.test_reads.append(label)
    return self._test

  @property
  def test_size(self) -> int:
    """Number of test examples (public)."""
    return len(self._test)

  def figure_examples(self) -> data.Dataset:
    """The test set, for real images shown beside synthetic ones in a figure (a training
    image never appears in one). Nothing is chosen on it and no number is read from it."""
    return self._test


def load_splits(
  dataset: str,
  data_dir: str | os.PathLike[str] | None = None,
  *,
  train_size: int | None = None,
  validation_size: int = 0,
  public_size: int = 0,
  seed: int = 0,
) -> Splits:
  """Loads ``dataset`` and partitions its training split (see the module docstring).

  Args:
    dataset: one of ``jaxdp.data.DATASETS`` or ``"synthetic"`` (a tiny learnable set).
    data_dir: folder of IDX files (else ``$JAXDP_DATA_DIR``, else TFDS).
    train_size: size of the private set; None takes every example left.
    validation_size: size of the validation split, >= 0.
    public_size: size of the public partition, >= 0.
    seed: the partition's seed (public).

  Returns:
    The :class:`Splits`.

  Raises:
    ValueError: if the sizes do not fit the training split (messages name the flag).
  """
  if dataset == "synthetic":
    train, test = data.synthetic_splits(*SYNTHETIC_SIZES, seed=seed)
  else:
    train, test = data.load_dataset(dataset, data_dir)
  _validate.non_negative_int("--validation-size", validation_size)
  _validate.non_negative_int("--public-size", public_size)
  n = len(train)
  if validation_size + public_size >= n:
    raise ValueError(
      f"--validation-size + --public-size must leave a private training set: "
      f"{validation_size} + {public_size} of the {n} training examples"
    )
  rest = n - validation_size - public_size
  if train_size is not None:
    _validate.positive_int("--train-size", train_size)
    if train_size > rest:
      raise ValueError(
        f"--train-size must be <= {rest} (the {n} training examples less --validation-size "
        f"and --public-size), got {train_size}"
      )
  perm = np.random.default_rng([seed, _SPLIT_DOMAIN]).permutation(n)
  cuts = np.cumsum([public_size, validation_size, train_size or rest])
  parts = np.split(perm, cuts)[:3]
  public, validation, private = (np.sort(p) for p in parts)
  name = train.name
  return Splits(
    private=train.subset(private, name=f"{name}[private]"),
    validation=train.subset(validation, name=f"{name}[validation]") if len(validation) else None,
    public=train.subset(public, name=f"{name}[public]") if len(public) else None,
    num_classes=train.num_classes,
    _test=test,
  )
