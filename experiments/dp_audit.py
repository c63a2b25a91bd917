"""Does the privacy hold? White-box one-run canary audits of DP-SGD and black-box
membership inference against classifiers trained by the library.

    python experiments/dp_audit.py                  # the full study (about 45 min on 2 cores)
    python experiments/dp_audit.py --quick          # a smoke run, minutes on a CPU
    python experiments/dp_audit.py --no-mia         # the canary audits alone

White box, one run (Steinke, Nasr & Jagielski 2023): m Dirac gradient canaries
(:func:`jaxdp.audit.canary_loss`), each included with probability 1/2, join the private
split in ONE training run of the real classifier (the dp_classifier recipe) through jaxdp's
step, with the noise calibrated to each claimed epsilon; the auditor sees every step's
release on the canary coordinates and scores each canary by its likelihood ratio under the
claimed mechanism. The guesses give two lower bounds: Steinke et al.'s (valid for any
mechanism) and the f-DP one with the Gaussian family (Mahloujifar et al. 2024). The same
audit runs against two deliberately broken steps (no clipping; noise scaled as if the sum
were the mean), which must be flagged: lower bound above the claim.

Black box: ``--mia-models`` classifiers per privacy level (non-private, then each of
``--mia-epsilons``), each trained on a random half of a candidate pool; each model in turn
is the target and the others its shadow models. Loss-threshold and LiRA (online and offline)
scores give ROC curves, AUC and TPR at 0.1% and 1% FPR.

What is released: the canaries are synthetic and their coordinates are never read by the
model, so the canary scores depend on the private data not at all; the membership pool is
the PUBLIC partition of the training set (``--public-size``). No model is saved. The run
folder therefore releases nothing of the private split.

References:
  Steinke, Nasr, Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023.
  arXiv:2305.08846
  Mahloujifar, Melis, Chaudhuri, "Auditing f-Differential Privacy in One Run", 2024.
  arXiv:2410.22235
  Carlini et al., "Membership Inference Attacks From First Principles", S&P 2022.
  arXiv:2112.03570
"""

from __future__ import annotations

# jaxdp first: its CPU settings (malloc, XLA flags) must act before numpy and JAX start threads.
import jaxdp  # noqa: F401

# isort: split
import dataclasses
import functools
import math
import sys
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import numpy as np
from scipy import special

from jaxdp import accounting, audit, optim, parallel
from jaxdp.experiment import cli, tasks
from jaxdp.experiment.cli import option
from jaxdp.experiment.runs import RunFolder, format_table
from jaxdp.experiment.settings import DataSettings, Job, RunSettings
from jaxdp.metrics import classifier_outputs
from jaxdp.models.classifier import ACTIVATIONS, classifier_loss
from jaxdp.plots import plot_roc
from jaxdp.step import ENGINES, DPConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(DataSettings, RunSettings):
  """Everything a run depends on; the flags, written to ``config.json``."""

  PRESETS: ClassVar = {
    "quick": dict(epochs=2, batch_size=256, train_size=5000, validation_size=0, seeds=1,
                  canaries=500, public_size=1000, mia_models=4, mia_epochs=3,
                  mia_epsilons=(3.0,)),
  }  # fmt: skip

  out: str = option("runs/dp_audit", "parent folder of the run folder")
  validation_size: int = option(0, "training examples held out (the audit chooses nothing)")
  public_size: int = option(10_000, "public examples: the membership-inference pool")
  delta: float = option(1e-5, "delta of every epsilon", check="fraction")
  accountant: str = option("pld", "accountant of the claimed epsilons", choices=("pld", "rdp"))
  engine: str = option("auto", "per-example clipping engine", choices=ENGINES)
  confidence: float = option(0.95, "confidence of the lower bounds", check="fraction")
  model: str = option("scatter_cnn", "classifier", choices=tasks.CLASSIFIERS)
  activation: str = option("tanh", "activation", choices=tuple(ACTIVATIONS))
  epochs: int = option(30, "epochs of each canary run", check="positive_int")
  batch_size: int = option(1024, "expected (Poisson) batch size", check="positive_int")
  lr: float = option(2.0, "SGD learning rate (momentum 0.9)", check="positive")
  clip: float = option(0.1, "L2 clip norm", check="positive")
  epsilons: tuple[float, ...] = option((4.0, 8.0), "claimed epsilons of the canary audits")
  seeds: int = option(3, "canary runs per claimed epsilon and mechanism", check="positive_int")
  canaries: int = option(1000, "gradient canaries per run (m)", check="positive_int")
  amplitude: float = option(10.0, "canary gradient norm / clip", check="positive")
  broken: bool = option(True, "also audit the two broken mechanisms")
  broken_epochs: int = option(10, "epochs of each broken-mechanism run", check="positive_int")
  mia: bool = option(True, "run the membership-inference study")
  mia_models: int = option(8, "models per privacy level (>= 4, even)", check="positive_int")
  mia_epochs: int = option(30, "epochs of each membership model", check="positive_int")
  mia_batch_size: int = option(512, "their expected batch size", check="positive_int")
  mia_epsilons: tuple[float, ...] = option((1.0, 3.0, 8.0), "privacy levels (plus no DP)")

  def check(self) -> None:
    if self.mia and (self.mia_models < 4 or self.mia_models % 2):
      raise ValueError(f"--mia-models must be an even number >= 4, got {self.mia_models}")
    if self.amplitude < 1:
      raise ValueError(f"--amplitude must be >= 1 (a canary at least C), got {self.amplitude}")
    if any(not math.isfinite(e) or e <= 0 for e in (*self.epsilons, *self.mia_epsilons)):
      raise ValueError("--epsilons and --mia-epsilons must be finite numbers > 0")


def canary_audits(cfg: Config, splits: Any, keys: Any, out: RunFolder) -> list[dict[str, Any]]:
  """The white-box one-run audits: correct step at each claimed epsilon, broken steps at the
  first, ``cfg.seeds`` runs each (each run a resumable job of ``out``)."""
  model = tasks.make_classifier(cfg.model, splits.num_classes, cfg.activation)
  data = jax.device_get(tasks.classifier_inputs(cfg.model, splits.private))
  params = jax.jit(model.init)(jax.random.key(cfg.seed), data["image"][:1])["params"]
  n = len(splits.private) + cfg.canaries // 2  # about half the canaries join
  q = min(1.0, cfg.batch_size / n)
  plan = [("correct", e, cfg.epochs) for e in cfg.epsilons]
  if cfg.broken:
    plan += [(kind, cfg.epsilons[0], cfg.broken_epochs) for kind in audit.BROKEN_MECHANISMS]
  mesh = parallel.mesh_for(cfg.devices, "--devices")

  def one_run(label: str, mechanism: str, sigma: float, steps: int) -> dict[str, Any]:
    return audit.white_box_audit(
      classifier_loss(model), params, data, num_canaries=cfg.canaries,
      privacy=DPConfig(l2_norm_clip=cfg.clip, noise_multiplier=sigma, engine=cfg.engine),
      sampling_prob=q, steps=steps,
      model_optimizer=optim.make_optimizer("sgd", cfg.lr, momentum=0.9),
      delta=cfg.delta, mechanism=mechanism, amplitude=cfg.amplitude * cfg.clip,
      has_aux=True, confidence=cfg.confidence, keys=keys, label=label, mesh=mesh,
    )  # fmt: skip

  rows = []
  for mechanism, eps, epochs in plan:
    steps = epochs * round(1 / q)
    sigma = accounting.calibrate_noise_multiplier(eps, cfg.delta, q, steps, cfg.accountant)
    for seed in range(cfg.seeds):
      label = f"{mechanism} eps={eps:g} run {seed + 1}"
      print(f"{label}: q = {q:.4f}, {steps} steps, sigma {sigma:.4f}, m = {cfg.canaries}")
      res = out.cached(label, functools.partial(one_run, label, mechanism, sigma, steps))
      res.update(label=label, target_epsilon=eps, steps=steps, sampling_prob=q, sigma=sigma)
      print(f"  lower bound {res['epsilon']:.3f} (GDP {res['gdp_epsilon']:.3f}), claimed "
            f"{res['claimed_epsilon']:.3f}, ceiling {res['ceiling']:.3f}")  # fmt: skip
      rows.append(res)
  return rows


def balanced_shadows(shadow_in: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """(S, n) which shadows score each candidate: as many "in" as "out" (the smaller count),
  dropping random ones from the larger side."""
  used = np.ones_like(shadow_in)
  for j in range(shadow_in.shape[1]):
    inn, out = np.flatnonzero(shadow_in[:, j]), np.flatnonzero(~shadow_in[:, j])
    extra, keep = (inn, len(out)) if len(inn) > len(out) else (out, len(inn))
    used[rng.choice(extra, len(extra) - keep, replace=False), j] = False
  return used


def membership_study(cfg: Config, splits: Any, keys: Any, out: RunFolder) -> list[dict[str, Any]]:
  """Loss-threshold and LiRA attacks on classifiers trained on random halves of the public
  pool, at each privacy level; every model is once the target, the others its shadows (each
  model a resumable job of ``out``)."""
  pool = splits.public
  p, k = len(pool), cfg.mia_models
  rng = np.random.default_rng([cfg.seed, 7])  # public: which pool examples each model sees
  inside = np.zeros((k, p), bool)  # each example in exactly half of the models
  for j in range(p):
    inside[rng.choice(k, k // 2, replace=False), j] = True
  model = tasks.make_classifier(cfg.model, splits.num_classes, cfg.activation)
  inputs = tasks.classifier_inputs(cfg.model, pool)
  labels = np.asarray(pool.labels)
  levels = [("non-private", None), *[(f"DP eps={e:g}", e) for e in cfg.mia_epsilons]]
  results = []
  for name, eps in levels:
    training = tasks.Training(
      epochs=cfg.mia_epochs, batch_size=min(cfg.mia_batch_size, p // 2),
      lr=cfg.lr if eps else 0.05, optimizer="sgd", momentum=0.9, **cfg.step_options(),
    )  # fmt: skip
    job = Job(name, eps is not None, eps)
    noise = tasks.calibrate(job, cfg, num_examples=p // 2, training=training)

    def scored(i: int, label: str, training=training, noise=noise) -> dict[str, Any]:
      """Model i's confidences and losses on the whole pool, and its epsilon."""
      half = {key: v[inside[i]] for key, v in inputs.items()}
      t = tasks.train_classifier(
        label, model, half, training, noise=noise, keys=keys,
        init_key=jax.random.key(cfg.seed + i), progress=cfg.progress,
      )  # fmt: skip
      logits = np.asarray(classifier_outputs(model, t.params, inputs["image"])[1], np.float64)
      return {
        "phi": audit.logit_confidence(logits, labels),
        "loss": special.logsumexp(logits, axis=-1) - logits[np.arange(p), labels],
        "epsilon": t.entry.get("epsilon_pld"),
      }

    phi, losses = np.zeros((k, p)), np.zeros((k, p))
    for i in range(k):
      label = f"{name} model {i + 1}"
      got = out.cached(label, functools.partial(scored, i, label))
      phi[i], losses[i] = got["phi"], got["loss"]
    scores = {"loss threshold": [], "LiRA online": [], "LiRA offline": []}
    member = []
    for i in range(k):
      shadows = [j for j in range(k) if j != i]
      used = balanced_shadows(inside[shadows], rng)
      scores["loss threshold"].append(audit.loss_threshold_scores(losses[i]))
      for online, key in ((True, "LiRA online"), (False, "LiRA offline")):
        s = audit.lira_scores(phi[i], phi[shadows], inside[shadows], online=online,
                              global_variance=True, shadow_used=used)  # fmt: skip
        scores[key].append(s)
      member.append(inside[i])
    member = np.concatenate(member)
    row: dict[str, Any] = {"level": name, "epsilon": got["epsilon"]}
    for key, s in scores.items():
      s = np.concatenate(s)
      pos, neg = s[member], s[~member]
      row[key] = {
        "auc": audit.auc(pos, neg),
        "tpr_at_0.1%": audit.tpr_at_fpr(pos, neg, 1e-3),
        "tpr_at_1%": audit.tpr_at_fpr(pos, neg, 1e-2),
        "roc": audit.roc_curve(pos, neg),
        "scores": s,
      }
    row["member"] = member
    print(f"{name}: LiRA AUC {row['LiRA online']['auc']:.4f}, loss AUC "
          f"{row['loss threshold']['auc']:.4f}")  # fmt: skip
    results.append(row)
  return results


def status(row: dict[str, Any]) -> str:
  """A canary run's verdict: a broken mechanism must be flagged, the correct one never."""
  if row["mechanism"] == "correct":
    return "FLAGGED: BUG" if row["flagged"] else "holds"
  return "flagged" if row["flagged"] else "MISSED"


def run(cfg: Config) -> dict[str, Any]:
  """Runs the audits of ``cfg``, writes the run folder and returns its metrics."""
  splits = tasks.load_data(cfg)
  out = RunFolder.start(cfg, "audit")
  keys = cfg.key_source()
  white = canary_audits(cfg, splits, keys, out)
  mia = membership_study(cfg, splits, keys, out) if cfg.mia and splits.public is not None else []
  arrays = {}
  for i, r in enumerate(white):
    arrays[f"canary_scores_{i}"], arrays[f"canary_included_{i}"] = (
      r.pop("scores"),
      r.pop("included"),
    )
  for i, r in enumerate(mia):
    arrays[f"mia_member_{i}"] = r.pop("member")
    for key in ("loss threshold", "LiRA online", "LiRA offline"):
      arrays[f"mia_{i}_{key.replace(' ', '_')}"] = r[key].pop("scores")
  np.savez_compressed(out.file("scores.npz"), **arrays)
  if mia:
    curves = {
      f"{r['level']} (AUC {r['LiRA online']['auc']:.3f})": r["LiRA online"]["roc"] for r in mia
    }
    plot_roc(curves, out.file("plots/roc.png"), title="LiRA (online) on the public pool")
    for r in mia:
      for key in ("loss threshold", "LiRA online", "LiRA offline"):
        r[key].pop("roc")
  metrics = out.finish({"white_box": white, "membership_inference": mia})
  print(f"wrote {out.path}")
  rows = [
    [r["label"], f"{r['claimed_epsilon']:.3f}", f"{r['epsilon']:.3f}", f"{r['gdp_epsilon']:.3f}",
     f"{r['ceiling']:.3f}", f"{r['correct']}/{r['guesses']}", status(r)]
    for r in white
  ]  # fmt: skip
  head = ["canary run", "claimed eps", "lower bound", "GDP bound", "ceiling", "right", ""]
  print(format_table(head, rows))
  print(f"m = {cfg.canaries} canaries, delta {cfg.delta:g}, confidence {cfg.confidence:g}")
  if mia:
    rows = [
      [r["level"], *[f"{r[k]['auc']:.4f} / {100 * r[k]['tpr_at_0.1%']:.2f}%" for k in
                     ("loss threshold", "LiRA online", "LiRA offline")]]
      for r in mia
    ]  # fmt: skip
    print(format_table(["model", "loss AUC / TPR@0.1%", "LiRA online", "LiRA offline"], rows))
  return metrics


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Command-line entry: parses ``argv`` (default ``sys.argv[1:]``), runs, returns metrics."""
  return cli.main(Config, run, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
  main(sys.argv[1:])
