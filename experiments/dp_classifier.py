"""Private MNIST classifiers with DP-SGD, next to the same model trained without privacy.

    python experiments/dp_classifier.py                      # the eps = 3 recipe
    python experiments/dp_classifier.py --quick              # a smoke run, minutes on a CPU
    python experiments/dp_classifier.py --epsilons 1,3,8     # privacy-utility sweep
    python experiments/dp_classifier.py --no-test --lr 1     # tuning: validation only

Every model trains through the one jaxdp step on Poisson batches of the private split; the
private ones clip each example's gradient to ``--clip`` and add Gaussian noise of std
``sigma * clip`` (sigma given, or calibrated to the target epsilon for the steps the run
takes), drawn from secret OS entropy, independently for each model. The reported epsilon is
that of exactly what ran (PLD and RDP); ``metrics.json["privacy"]`` composes every released
model. Curves come from the validation split; the test set is read once per released model.

Defaults (DP-SGD literature for MNIST): Tramer & Boneh's tanh CNN on fixed ScatterNet
features, SGD momentum 0.9, clip 0.1, large batches, and an EMA of the iterates as the
released model (post-processing, De et al. 2022). The recipe (batch 1024, 30 epochs, lr 2)
was chosen on a 5000-example validation split (README, "How the defaults were chosen").

References:
  Abadi et al., "Deep Learning with Differential Privacy", CCS 2016. arXiv:1607.00133
  Tramer, Boneh, "Differentially Private Learning Needs Better Features (or Much More
  Data)", ICLR 2021. arXiv:2011.11660
  De, Berrada, Hayes, Smith, Balle, "Unlocking High-Accuracy Differentially Private Image
  Classification through Scale", 2022. arXiv:2204.13650
"""

from __future__ import annotations

# jaxdp first: its CPU settings (malloc, XLA flags) must act before numpy and JAX start threads.
import jaxdp  # noqa: F401

# isort: split
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any, ClassVar

import jax

from jaxdp import optim
from jaxdp.experiment import cli, tasks
from jaxdp.experiment.cli import option
from jaxdp.experiment.runs import RunFolder, format_table
from jaxdp.experiment.settings import DataSettings, PrivacySettings, RunSettings
from jaxdp.models.classifier import ACTIVATIONS
from jaxdp.plots import plot_curves, plot_epsilon, plot_privacy_utility


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(DataSettings, PrivacySettings, RunSettings):
  """Everything a run depends on; the flags, written to ``config.json``."""

  DEFAULT_EPSILON: ClassVar[float] = 3.0
  PRESETS: ClassVar = {
    "quick": dict(epochs=5, batch_size=256, baseline_epochs=2, baseline_batch_size=256,
                  train_size=10_000, validation_size=1000),
  }  # fmt: skip

  out: str = option("runs/dp_classifier", "parent folder of the run folder")
  model: str = option("scatter_cnn", "classifier", choices=tasks.CLASSIFIERS)
  activation: str = option("tanh", "activation", choices=tuple(ACTIVATIONS))
  epochs: int = option(30, "private training epochs", check="positive_int")
  batch_size: int = option(1024, "expected (Poisson) batch size", check="positive_int")
  optimizer: str = option("sgd", "optimiser", choices=optim.OPTIMIZERS)
  lr: float = option(2.0, "learning rate", check="positive")
  momentum: float | None = option(0.9, "SGD momentum (none: plain SGD)", check="decay")
  ema: float = option(0.999, "decay of the released parameter average (0: off)", check="decay")
  clip: float = option(0.1, "L2 clip norm of each example's gradient", check="positive")
  baseline: bool = option(True, "also train the model without DP (its results go to nondp/)")
  baseline_epochs: int = option(20, "epochs of the non-private model", check="positive_int")
  baseline_batch_size: int = option(1024, "its batch size", check="positive_int")
  baseline_lr: float = option(0.05, "its learning rate", check="positive")

  def check(self) -> None:
    if self.momentum is not None and self.optimizer != "sgd":
      raise ValueError(f"--momentum applies to --optimizer sgd only, got {self.optimizer}")

  def training(self, private: bool) -> tasks.Training:
    """The training settings of the private models, or of the non-private baseline."""
    return tasks.Training(
      epochs=self.epochs if private else self.baseline_epochs,
      batch_size=self.batch_size if private else self.baseline_batch_size,
      lr=self.lr if private else self.baseline_lr,
      optimizer=self.optimizer,
      momentum=self.momentum,
      ema=self.ema,
      **self.step_options(),
    )


def run(cfg: Config) -> dict[str, Any]:
  """Trains the models of ``cfg``, writes the run folder and returns its metrics."""
  splits = tasks.load_data(cfg, ("batch_size", "baseline_batch_size"))
  n = len(splits.private)
  jobs = cfg.jobs("DP-SGD")
  noises = [tasks.calibrate(j, cfg, num_examples=n, training=cfg.training(True)) for j in jobs]
  tag = "sweep" if len(jobs) > 1 else jobs[0].label.split()[-1].replace("=", "")
  out = RunFolder.start(cfg, f"{cfg.model}-{tag}")
  keys = cfg.key_source()
  model = tasks.make_classifier(cfg.model, splits.num_classes, cfg.activation)
  inputs = lambda ds: tasks.classifier_inputs(cfg.model, ds)
  train_data = inputs(splits.private)
  validation = inputs(splits.validation) if splits.validation is not None else None
  init_key = jax.random.key(cfg.seed)  # public: the same initialisation for every model

  plan = [("non-private", None)] if cfg.baseline else []
  plan += [(j.label, noise) for j, noise in zip(jobs, noises, strict=True)]
  trained = []
  for label, noise in plan:
    t = tasks.train_classifier(
      label, model, train_data, cfg.training(noise is not None), noise=noise, keys=keys,
      init_key=init_key, run=out, validation=validation, progress=cfg.progress,
    )  # fmt: skip
    if cfg.test:
      t.entry.update(tasks.test_classifier(model, t.params, inputs(splits.final_test(label))))
    t.entry["checkpoint"] = out.save_params(label, t.params, released=noise is not None)
    trained.append(t)

  private = [t for t in trained if t.entry["private"]]
  baseline = [t for t in trained if not t.entry["private"]]
  curves = {t.label: t.history for t in private}
  plot_curves(curves, out.file("plots/curves.png"), splits=("validation",))
  plot_epsilon(curves, out.file("plots/epsilon.png"), keys=("epsilon_pld", "epsilon_rdp"))
  if baseline:
    nondp = out.file("plots/curves.png", released=False)
    plot_curves({t.label: t.history for t in baseline}, nondp, splits=("validation",))
  score = "test_accuracy" if cfg.test else "validation_accuracy"
  if len(private) > 1:
    plot_privacy_utility(
      [t.entry["epsilon_pld"] for t in private],
      [t.entry[score] for t in private],
      out.file("plots/privacy_utility.png"),
      ylabel=score.replace("_", " "),
    )
  metrics = out.finish(
    {"dataset": cfg.dataset, "num_private": n, "models": [t.entry for t in private]},
    nondp={"models": [t.entry for t in baseline]} if baseline else None,
  )
  rows = [
    [
      t.label,
      f"{100 * t.entry[score]:.2f}%",
      f"{t.entry['epsilon_pld']:.3f}" if t.entry["private"] else "inf (nondp/)",
      f"{t.entry['epsilon_rdp']:.3f}" if t.entry["private"] else "inf",
      f"{t.entry['train_time_s']:.0f} s",
    ]
    for t in trained
  ]
  print(f"wrote {out.path}")
  print(format_table(["model", score.replace("_", " "), "eps (PLD)", "eps (RDP)", "time"], rows))
  p = metrics["privacy"]
  print(f"released: epsilon {p['epsilon_pld']:.3f} (PLD) at delta {cfg.delta:g}, all models")
  return metrics


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Command-line entry: parses ``argv`` (default ``sys.argv[1:]``), runs, returns metrics."""
  return cli.main(Config, run, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
  main(sys.argv[1:])
