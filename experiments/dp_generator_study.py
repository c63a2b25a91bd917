"""The generator comparison: every jaxdp generator at several epsilons and seeds, on
downstream accuracy, FID / IS, stability and wall time.

    python experiments/dp_generator_study.py            # 6 generators x eps 1,3,10 x 3 seeds
    python experiments/dp_generator_study.py --quick    # a smoke study, under 10 minutes
    python experiments/dp_generator_study.py --generators dp-vae,latent-vae --epsilons 10

Each cell is one run of a generator's script (``experiments/dp_*_synth.py``, its defaults)
at ``--target-epsilon e`` and ``--seed s``, in its own run folder with its own secret noise
(:mod:`jaxdp.experiment.study`). With ``--reference``, each generator also trains once
without DP: its FID is the reference the DP rows are read against (results under
``nondp/``). Reported per generator and epsilon, over seeds: downstream test accuracy
(the standard CNN trained on the synthetic set, its epoch chosen on held-out synthetic
data, tested once on the real test set), feature-network FID and IS, and stability: the
spread over seeds, runs that diverged (a non-finite loss or sample), mode collapse (how
many classes the public feature classifier ever predicts on the samples, how often it
agrees with the label asked for, the per-class feature spread relative to real images) and
wall time. Figures: accuracy and FID against epsilon, and one grid per generator and epsilon.
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
from jaxdp.plots import class_grid, plot_series
from jaxdp.synth import load_npz

# Each generator: its script and the flags that make it that generator. The DP-WGAN's weight
# clip (0.2) and both WGANs' generator average and mode-seeking term (the script's defaults)
# were chosen on validation (docs/results.md): at the WGAN paper's 0.01 the DP-WGAN learned
# nothing, with or without DP, and the WGAN-GP without the two collapsed (27.6% against 61.7%).
GENERATORS = {
  "dp-vae": ("experiments/dp_vae_synth.py", ()),
  "dp-gan": ("experiments/dp_gan_synth.py", ()),
  "dp-wgan": (
    "experiments/dp_gan_synth.py",
    ("--loss", "wasserstein", "--gradient-penalty", "0", "--weight-clip", "0.2"),
  ),
  "dp-wgan-gp": ("experiments/dp_gan_synth.py", ("--loss", "wasserstein")),
  "latent-vae": ("experiments/dp_latent_synth.py", ()),
  "latent-gan": ("experiments/dp_latent_synth.py", ("--generator", "gan")),
}
VALUES = ("test_accuracy", "validation_accuracy", "fid", "inception_score", "classes_predicted",
          "label_agreement", "diversity", "diversity_min", "epsilon", "train_time_s",
          "process_time_s", "public_only_test_accuracy",
          "public_only_validation_accuracy", "with_public_test_accuracy",
          "with_public_validation_accuracy")  # fmt: skip


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(StudySettings, RunSettings):
  """The study's flags, written to ``config.json``; each cell's own are in its folder."""

  PRESETS: ClassVar = {
    "quick": dict(epsilons=(1.0, 10.0), seeds=1, reference=False,
                  cell_args="--train-size 3000 --num-samples 3000 --classifier-epochs 2"),
  }  # fmt: skip

  out: str = option("runs/dp_generator_study", "parent folder of the study folder")
  generators: tuple[str, ...] = option(tuple(GENERATORS), f"of {', '.join(GENERATORS)}")
  epsilons: tuple[float, ...] = option((1.0, 3.0, 10.0), "target epsilons of the DP cells")
  reference: bool = option(True, "also each generator without DP, seed 0 (results in nondp/)")
  test: bool = option(True, "read the test set once per cell (--no-test: validation only)")

  def check(self) -> None:
    bad = [g for g in self.generators if g not in GENERATORS]
    if bad or not self.generators:
      raise ValueError(f"--generators must be some of {', '.join(GENERATORS)}, got {bad or 'none'}")
    if not self.epsilons or any(not 0 < e < float("inf") for e in self.epsilons):
      raise ValueError(f"--epsilons must be finite numbers > 0, got {self.epsilons}")


def cells(cfg: Config) -> list[study.Cell]:
  """The study's cells: each generator at each epsilon and seed, then the references."""
  common = (*cfg.cell_flags(), *(() if cfg.test else ("--no-test",)))
  out = []
  for g in cfg.generators:
    script, flags = GENERATORS[g]
    for eps in cfg.epsilons:
      for seed in range(cfg.seeds):
        out.append(study.Cell(
          f"{g}-eps{eps:g}-seed{seed}", script,
          (*flags, *common, "--target-epsilon", f"{eps:g}", "--seed", str(seed)),
          {"generator": g, "epsilon_target": eps, "seed": seed},
        ))  # fmt: skip
    if cfg.reference:
      tags = {"generator": g, "epsilon_target": float("inf"), "seed": 0}
      nondp = (*flags, *common, "--no-dp", "--seed", "0")
      out.append(study.Cell(f"{g}-nondp", script, nondp, tags))
  return out


def run(cfg: Config) -> dict[str, Any]:
  """Runs (or resumes) the study, writes its folder and returns its metrics."""
  out = RunFolder.start(cfg, "quick" if cfg.quick else "study")
  rows = study.run_cells(cells(cfg), out.path, parallel=cfg.parallel, reuse=cfg.reuse)
  by = ("generator", "epsilon_target")
  utility = "test_accuracy" if cfg.test else "validation_accuracy"
  summary, reference = study.release(
    out, rows, by=by, values=VALUES, utility=utility, info={"generators": list(cfg.generators)}
  )
  for value, label in ((utility, utility.replace("_", " ")), ("fid", "feature FID")):
    series = {
      g: [(s["epsilon_target"], s[f"{value}_mean"], s[f"{value}_std"]) for s in summary
          if s["generator"] == g]
      for g in cfg.generators
    }  # fmt: skip
    plot_series(series, out.file(f"plots/{value}_vs_epsilon.png"), xlabel="epsilon",
                ylabel=label, logx=True, title=f"mean +- std over {cfg.seeds} seed(s)")  # fmt: skip
  grids = {}
  for row in rows:  # seed 0 of each DP cell: released synthetic images only
    if row["private"] and row["seed"] == 0 and row.get("synthetic_npz"):
      ds = load_npz(row["synthetic_npz"])
      name = f"{row['generator']}\neps={row['epsilon_target']:g}"
      grids[name] = class_grid(ds.images, ds.labels, ds.num_classes, 3)
  if grids:
    out.plot_images("grids", grids, title="samples per class (seed 0)")
  return {"summary": summary, "reference": reference, "run_dir": str(out.path)}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Command-line entry: parses ``argv`` (default ``sys.argv[1:]``), runs, returns metrics."""
  return cli.main(Config, run, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
  main(sys.argv[1:])
