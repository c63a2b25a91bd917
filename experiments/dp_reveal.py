"""What a model reveals, with and without DP: first-layer filters, saliency maps, member
and non-member losses, and class reconstructions by model inversion, side by side.

    python experiments/dp_reveal.py                 # eps = 3 against no DP (minutes on a CPU)
    python experiments/dp_reveal.py --quick         # a smoke run
    python experiments/dp_reveal.py --epsilons 1,8  # more privacy levels

The same classifier (the TF-Privacy CNN) is trained without DP and with DP-SGD at each
``--epsilons`` on the same members: one half of the PUBLIC partition of the training set
(``--public-size``); the other half are the non-members. Everything here is computed from
public data (and the test set's first digit of each class, for the saliency figure), so the
whole folder can be published. Figures (``plots/``, and TensorBoard with ``--tensorboard``):

* ``filters.png``: the 16 first-layer 8x8 filters of each model;
* ``saliency.png``: |d logit_y / d x| on test digits (SmoothGrad, Smilkov et al. 2017);
* ``member_losses.png``: per-example loss of members and non-members, and the
  loss-threshold attack's AUC on them (:mod:`jaxdp.audit`);
* ``inversion.png``: one reconstruction per class by gradient ascent on the input
  (Fredrikson et al. 2015).
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
import numpy as np

from jaxdp import audit, reveal
from jaxdp.experiment import cli, tasks
from jaxdp.experiment.cli import option
from jaxdp.experiment.runs import RunFolder, format_table
from jaxdp.experiment.settings import DataSettings, PrivacySettings, RunSettings
from jaxdp.models.classifier import ACTIVATIONS
from jaxdp.plots import plot_curves, plot_image_grids, plot_member_losses


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(DataSettings, PrivacySettings, RunSettings):
  """Everything a run depends on; the flags, written to ``config.json``."""

  DEFAULT_EPSILON: ClassVar[float] = 3.0
  PRESETS: ClassVar = {
    "quick": dict(public_size=2000, epochs=4, baseline_epochs=4, inversion_steps=50),
  }

  out: str = option("runs/dp_reveal", "parent folder of the run folder")
  validation_size: int = option(0, "training examples held out (nothing is chosen here)")
  public_size: int = option(20_000, "public examples: half members, half non-members")
  activation: str = option("tanh", "activation of both models", choices=tuple(ACTIVATIONS))
  clip: float = option(1.0, "L2 clip norm of each example's gradient", check="positive")
  epochs: int = option(30, "DP training epochs", check="positive_int")
  batch_size: int = option(
    512, "expected (Poisson) batch size of DP training", check="positive_int"
  )
  lr: float = option(0.5, "DP learning rate (SGD, momentum 0.9)", check="positive")
  baseline_epochs: int = option(40, "epochs without DP", check="positive_int")
  baseline_lr: float = option(0.05, "learning rate without DP", check="positive")
  inversion_steps: int = option(300, "gradient-ascent steps per class", check="positive_int")


def run(cfg: Config) -> dict[str, Any]:
  """Trains the models of ``cfg``, draws the figures, writes the run folder."""
  splits = tasks.load_data(cfg)
  if splits.public is None or len(splits.public) < 4:
    raise cli.UsageError("--public-size must be at least 4 (members and non-members)")
  pool = splits.public
  half = len(pool) // 2
  members, others = pool.subset(np.arange(half)), pool.subset(np.arange(half, len(pool)))
  out = RunFolder.start(cfg, "reveal")
  keys = cfg.key_source()
  k = splits.num_classes
  model = tasks.make_classifier("tf_cnn", k, cfg.activation)
  train_data = tasks.classifier_inputs("tf_cnn", members)
  held_out = tasks.classifier_inputs("tf_cnn", others)
  plan: list[tuple[str, tasks.Noise | None, tasks.Training]] = [
    ("non-private", None, tasks.Training(epochs=cfg.baseline_epochs, batch_size=256,
                                         lr=cfg.baseline_lr, momentum=0.9,
                                         **cfg.step_options())),
  ]  # fmt: skip
  training = tasks.Training(
    epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=0.9, **cfg.step_options()
  )
  for job in cfg.jobs("DP-SGD"):
    plan.append(
      (job.label, tasks.calibrate(job, cfg, num_examples=half, training=training), training)
    )

  figure = splits.figure_examples()  # the test set: figures only, no number read
  first = np.array([np.flatnonzero(figure.labels == c)[0] for c in range(k)])
  digits, digit_labels = figure.images[first], figure.labels[first]
  filters, saliency, inversions, losses, curves, rows, entries = {}, {}, {}, {}, {}, [], []
  saliency["test digit"] = digits[:, None]
  for label, noise, train in plan:
    t = tasks.train_classifier(
      label, model, train_data, train, noise=noise, keys=keys, init_key=jax.random.key(cfg.seed),
      run=out, validation=held_out, split_name="non_member", release=True, progress=cfg.progress,
    )  # fmt: skip
    w = reveal.first_layer_filters(t.params)
    lo, hi = w.min(axis=(1, 2), keepdims=True), w.max(axis=(1, 2), keepdims=True)
    filters[label] = ((w - lo) / np.maximum(hi - lo, 1e-12)).reshape(2, -1, *w.shape[1:], 1)
    short = label.replace("DP-SGD ", "")  # narrow panels
    saliency[short] = reveal.saliency_maps(model, t.params, digits, digit_labels)[
      :, None, ..., None
    ]
    inversions[short] = reveal.invert_classes(
      model, t.params, members.image_shape, k, steps=cfg.inversion_steps
    )[:, None]
    inside = reveal.per_example_losses(model, t.params, members.images, members.labels)
    outside = reveal.per_example_losses(model, t.params, others.images, others.labels)
    auc = audit.auc(audit.loss_threshold_scores(inside), audit.loss_threshold_scores(outside))
    losses[f"{label} (attack AUC {auc:.3f})"] = (inside, outside)
    acc = t.entry.get("non_member_accuracy", float("nan"))
    eps = f"{t.entry['epsilon_pld']:.3f}" if noise else "inf"
    rows.append(
      [
        label,
        eps,
        f"{100 * acc:.2f}%",
        f"{auc:.4f}",
        f"{np.mean(inside):.3f} / {np.mean(outside):.3f}",
      ]
    )
    entries.append({**t.entry, "loss_attack_auc": auc, "member_loss_mean": float(np.mean(inside)),
                    "non_member_loss_mean": float(np.mean(outside))})  # fmt: skip
    curves[label] = t.history

  plot_curves(curves, out.file("plots/curves.png"), splits=("non_member",))
  title = f"{cfg.dataset}: the same CNN without and with DP-SGD"
  figures = {
    "filters": plot_image_grids(
      filters, out.file("plots/filters.png"), row_labels=["", ""], title=title
    ),
    "saliency": plot_image_grids(
      saliency, out.file("plots/saliency.png"), title="|d logit / d input|"
    ),
    "member_losses": plot_member_losses(losses, out.file("plots/member_losses.png")),
    "inversion": plot_image_grids(
      inversions, out.file("plots/inversion.png"), title="model inversion"
    ),
  }
  for name, png in figures.items():
    out.released.figure(f"reveal/{name}", png)
  metrics = out.finish({"dataset": cfg.dataset, "members": half, "models": entries})
  print(f"wrote {out.path}")
  print(format_table(["model", "eps (PLD)", "non-member acc", "loss AUC", "loss in / out"], rows))
  return metrics


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Command-line entry: parses ``argv`` (default ``sys.argv[1:]``), runs, returns metrics."""
  return cli.main(Config, run, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
  main(sys.argv[1:])
