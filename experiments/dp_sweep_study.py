"""Clip-norm and activation sweeps of the DP classifier and the DP generators: utility
against the swept value, one line per model.

    python experiments/dp_sweep_study.py --sweep clip                 # clip 0.01 ... 10
    python experiments/dp_sweep_study.py --sweep activation           # relu, tanh, elu, gelu
    python experiments/dp_sweep_study.py --sweep clip --quick         # 2 values, a smoke study
    python experiments/dp_sweep_study.py --sweep activation --models classifier,dp-vae

Each cell is one run of a model's script (its defaults, its default epsilon unless
``--epsilon``) with one value of the swept setting, in its own run folder with its own
secret noise (:mod:`jaxdp.experiment.study`). The sweeps are for choosing settings, so no
cell reads the test set: utility is validation accuracy (for a generator, of the standard
CNN trained on its synthetic set), with feature FID for the generators. The activation of a
generator is its private network's: the DP-VAE's, the DP-GAN critic's (its default loss, the
original GAN's), the latent VAE's, the latent GAN critic's.
tanh is the tempered sigmoid 2 sigmoid(2x) - 1 (s = 2, T = 2, o = 1, Papernot et al.'s
MNIST choice, arXiv:2007.14191); ``--values tempered_sigmoid`` names it so.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any, ClassVar

from jaxdp.experiment import cli, study
from jaxdp.experiment.cli import option
from jaxdp.experiment.runs import RunFolder
from jaxdp.experiment.settings import RunSettings, StudySettings
from jaxdp.models.classifier import ACTIVATIONS
from jaxdp.plots import plot_series

# Each model: its script, the flags that make it that model, and its activation flag.
MODELS = {
  "classifier": ("experiments/dp_classifier.py", ("--no-baseline",), "--activation"),
  "dp-vae": ("experiments/dp_vae_synth.py", (), "--activation"),
  "dp-gan": ("experiments/dp_gan_synth.py", (), "--critic-activation"),
  "latent-vae": ("experiments/dp_latent_synth.py", (), "--activation"),
  "latent-gan": ("experiments/dp_latent_synth.py", ("--generator", "gan"), "--critic-activation"),
}
DEFAULT_VALUES = {"clip": ("0.01", "0.1", "1", "10"), "activation": ("relu", "tanh", "elu", "gelu")}
VALUES = ("validation_accuracy", "fid", "inception_score", "classes_predicted", "diversity",
          "epsilon", "train_time_s", "process_time_s")  # fmt: skip


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(StudySettings, RunSettings):
  """The study's flags, written to ``config.json``; each cell's own are in its folder."""

  # --quick: two values per sweep (unless --values), one seed, smaller private splits.
  PRESETS: ClassVar = {"quick": dict(seeds=1, cell_args="--train-size 3000 --epochs 2")}

  out: str = option("runs/dp_sweep_study", "parent folder of the study folder")
  sweep: str = option("clip", "the swept setting", choices=tuple(DEFAULT_VALUES))
  values: tuple[str, ...] = option(
    (), "its values (default clip 0.01,0.1,1,10; activation relu,tanh,elu,gelu)"
  )
  models: tuple[str, ...] = option(tuple(MODELS), f"of {', '.join(MODELS)}")
  epsilon: float | None = option(None, "target epsilon of every cell (default: each script's)",
                                 check="positive")  # fmt: skip
  seeds: int = option(1, "seeds per value (0, 1, ...)", check="positive_int")

  def check(self) -> None:
    bad = [m for m in self.models if m not in MODELS]
    if bad or not self.models:
      raise ValueError(f"--models must be some of {', '.join(MODELS)}, got {bad or 'none'}")
    if self.sweep == "clip":
      for v in self.values:
        try:
          ok = float(v) > 0
        except ValueError:
          ok = False
        if not ok:
          raise ValueError(f"--values: clip norms must be numbers > 0, got {v!r}")
    bad = [v for v in self.values if self.sweep == "activation" and v not in ACTIVATIONS]
    if bad:
      raise ValueError(f"--values: activations must be of {', '.join(ACTIVATIONS)}, got {bad}")

  @property
  def swept(self) -> tuple[str, ...]:
    """The swept values (``--values``, else the sweep's defaults; with --quick the middle
    two of them)."""
    if self.values:
      return self.values
    return DEFAULT_VALUES[self.sweep][1:3] if self.quick else DEFAULT_VALUES[self.sweep]


def cells(cfg: Config) -> list[study.Cell]:
  """Each model at each swept value and seed; no cell reads the test set."""
  common = (*cfg.cell_flags(), "--no-test")
  if cfg.epsilon is not None:
    common += ("--target-epsilon", f"{cfg.epsilon:g}")
  out = []
  for m in cfg.models:
    script, flags, activation = MODELS[m]
    for value in cfg.swept:
      setting = ("--clip", value) if cfg.sweep == "clip" else (activation, value)
      for seed in range(cfg.seeds):
        out.append(study.Cell(
          f"{m}-{cfg.sweep}{value}-seed{seed}", script,
          (*flags, *common, *setting, "--seed", str(seed)),
          {"model": m, cfg.sweep: value, "seed": seed},
        ))  # fmt: skip
  return out


def run(cfg: Config) -> dict[str, Any]:
  """Runs (or resumes) the sweep, writes its folder and returns its metrics."""
  out = RunFolder.start(cfg, f"{cfg.sweep}-quick" if cfg.quick else cfg.sweep)
  rows = study.run_cells(cells(cfg), out.path, parallel=cfg.parallel, reuse=cfg.reuse)
  by = ("model", cfg.sweep)
  summary, _ = study.release(
    out, rows, by=by, values=VALUES, utility="validation_accuracy", info={"sweep": cfg.sweep}
  )
  x = (lambda v: float(v)) if cfg.sweep == "clip" else str
  for value, label in (("validation_accuracy", "validation accuracy"), ("fid", "feature FID")):
    series = {
      m: [(x(s[cfg.sweep]), s[f"{value}_mean"], s[f"{value}_std"]) for s in summary
          if s["model"] == m]
      for m in cfg.models
    }  # fmt: skip
    plot_series(series, out.file(f"plots/{value}_vs_{cfg.sweep}.png"), xlabel=cfg.sweep,
                ylabel=label, logx=cfg.sweep == "clip",
                title="classifier: its own accuracy; generators: downstream")  # fmt: skip
  return {"summary": summary, "run_dir": str(out.path)}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Command-line entry: parses ``argv`` (default ``sys.argv[1:]``), runs, returns metrics."""
  return cli.main(Config, run, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
  main(sys.argv[1:])
