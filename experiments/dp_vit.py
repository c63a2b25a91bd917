"""A private Vision Transformer on MNIST patches, next to the same model without privacy.

    python experiments/dp_vit.py                   # eps = 3
    python experiments/dp_vit.py --quick           # a smoke run, minutes on a CPU
    python experiments/dp_vit.py --no-test --lr 3e-3 --epochs 20    # tuning: validation only
    python experiments/dp_vit.py --model scatter_vit   # tokens: ScatterNet features

:class:`jaxdp.models.classifier.ViT` (patches, a Dense patch embedding over the tokens,
learned positions, pre-norm blocks of multi-head self-attention and an MLP, mean pooling)
trains through the one jaxdp step on the fast engine: the patch embedding and the
attention's query / key / value / output projections take the dense rule over the tokens,
the position table the Embed rule, LayerNorm the norm rule; nothing falls back to a
whole-model vmap. Everything else is the classifier experiment's (``dp_classifier.py``:
calibrated secret noise, curves on validation, the test set read once per released model).

References:
  Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at
  Scale", ICLR 2021. arXiv:2010.11929
  Abadi et al., "Deep Learning with Differential Privacy", CCS 2016. arXiv:1607.00133
"""

from __future__ import annotations

# jaxdp first: its CPU settings (malloc, XLA flags) must act before numpy and JAX start threads.
import jaxdp  # noqa: F401

# isort: split
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any, ClassVar

from jaxdp.experiment import cli, tasks
from jaxdp.experiment.cli import option
from jaxdp.experiment.settings import (
  ClassifierSettings,
  DataSettings,
  PrivacySettings,
  RunSettings,
)
from jaxdp.models.classifier import ACTIVATIONS


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(DataSettings, PrivacySettings, ClassifierSettings, RunSettings):
  """Everything a run depends on; the flags, written to ``config.json``."""

  DEFAULT_EPSILON: ClassVar[float] = 3.0
  PRESETS: ClassVar = {
    "quick": dict(epochs=3, batch_size=256, baseline_epochs=2, baseline_batch_size=256,
                  train_size=10_000, validation_size=1000),
  }  # fmt: skip

  out: str = option("runs/dp_vit", "parent folder of the run folder")
  model: str = option(
    "vit",
    "vit: tokens are pixel patches; scatter_vit: tokens are the ScatterNet features of the "
    "7x7 grid of 4x4 patches (fixed filters, no privacy cost; --patch does not apply)",
    choices=("vit", "scatter_vit"),
  )
  activation: str = option("gelu", "MLP activation", choices=tuple(ACTIVATIONS))
  epochs: int = option(20, "private training epochs", check="positive_int")
  batch_size: int = option(1024, "expected (Poisson) batch size", check="positive_int")
  optimizer: str = option("adam", "optimiser", choices=("adam", "sgd"))
  lr: float = option(2e-3, "learning rate", check="positive")
  momentum: float | None = option(None, "SGD momentum (none: plain SGD)", check="decay")
  clip: float = option(1.0, "L2 clip norm of each example's gradient", check="positive")
  baseline_lr: float = option(1e-3, "its learning rate", check="positive")
  patch: int = option(7, "patch side (divides the image side)", check="positive_int")
  dim: int = option(64, "token width", check="positive_int")
  depth: int = option(2, "transformer blocks", check="positive_int")
  heads: int = option(4, "attention heads (divide --dim)", check="positive_int")
  mlp: int = option(128, "MLP hidden width", check="positive_int")

  def check(self) -> None:
    if 28 % self.patch:  # every dataset here has 28 x 28 images
      raise ValueError(f"--patch must divide the image side 28, got {self.patch}")
    if self.dim % self.heads:
      raise ValueError(f"--heads must divide --dim ({self.dim}), got {self.heads}")

  def architecture(self) -> dict[str, Any]:
    arch = dict(dim=self.dim, depth=self.depth, heads=self.heads, mlp=self.mlp)
    return arch if self.model == "scatter_vit" else dict(patch=self.patch, **arch)


def run(cfg: Config) -> dict[str, Any]:
  """Trains the models of ``cfg``, writes the run folder and returns its metrics."""
  return tasks.run_classifiers(cfg)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Command-line entry: parses ``argv`` (default ``sys.argv[1:]``), runs, returns metrics."""
  return cli.main(Config, run, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
  main(sys.argv[1:])
