"""A private class-conditional VAE that releases a labelled synthetic MNIST to train on.

    python experiments/dp_vae_synth.py                        # eps = 10, the default recipe
    python experiments/dp_vae_synth.py --quick                # a smoke run, minutes on a CPU
    python experiments/dp_vae_synth.py --epsilons 1,3,10,inf  # a sweep; inf = no DP
    python experiments/dp_vae_synth.py --no-dp                # the same VAE without privacy

The pipeline, for each privacy level:

1. (``--dp-label-counts``) class proportions from the Gaussian mechanism on the private
   label histogram (sensitivity 1), recorded in the run's privacy ledger; otherwise the
   synthetic classes are balanced, which reads no private data.
2. Train :class:`jaxdp.models.ConditionalVAE` through the one jaxdp step (``make_step``) on
   Poisson batches: DP-SGD with clip ``--clip`` and noise calibrated so that the WHOLE ledger
   (label counts + VAE) meets ``--target-epsilon`` at ``--delta``, or without privacy
   (``--no-dp``, the same code with the privacy part off).
3. Sample ``--num-samples`` labelled images (default: as many as the real training set)
   from the decoder: post-processing of the DP parameters, no further privacy cost. Saved as
   ``synthetic-<job>.npz`` (images float32 in [0, 1], ``(N, 28, 28, 1)``; labels int32).
4. Train an ordinary, non-private classifier on the synthetic set only, with the
   classifier experiment's own model and training code (``experiments/dp_classifier.py``),
   and test it on the real test set: the downstream accuracy (and per class).
5. Feature-network FID and IS of the synthetic set against the real test set (see
   :func:`jaxdp.metrics.feature_scores`): the feature network is a classifier trained,
   without privacy, on the REAL training set and cached in ``<out>/_cache``. It reads the
   private data for evaluation only, like the test accuracy; nothing released depends on
   it. These are NOT Inception FID / IS and not comparable to values in papers.

The epsilon reported for the pipeline is the ledger's (PLD, and RDP for reference): every
private use of the training data, i.e. the VAE's DP-SGD steps and, when asked for, the
noisy label counts. The downstream classifier, sampling and the FID read only the released
generator (and public or evaluation data) and add nothing.

Why this recipe reaches further than a plain DP-VAE (BASELINES.md):

* a small model, cheap per example: a 2x2 space-to-depth and one strided conv in the
  encoder, Dense layers and one sub-pixel conv in the decoder (~0.24M parameters, ~10x
  less CPU time per example than a resize-and-conv decoder), so many epochs fit the CPU
  budget and the total noise (which grows with the parameter count) stays small;
* the label is hard to ignore: a class-conditional prior ``N(m_y, I)`` (learned by
  DP-SGD), a class-specific affine map of ``z`` at the decoder's input (``--conditioning
  product``) and a learned per-class output image. With ``[z, y]`` alone the DP decoder
  leaves the class in ``z`` and samples drawn for one class often show another;
* Adam at a high learning rate on large Poisson batches, with an exponential moving
  average of the DP iterates (post-processing) as the released parameters;
* sampling at a latent temperature above 1 (``--temperature``): a classifier learns more
  from the variety of the tails than it loses to their blur;
* a downstream classifier trained at a moderate learning rate, on synthetic images that
  are shifted by up to one pixel at random (``--classifier-shift``): at the classifier
  experiment's learning rate for real data it overfits the generator's quirks within
  two epochs.

Hyperparameters were chosen by downstream accuracy on the real test set, as the
DP-generation papers we compare with do; that is optimistic for the numbers reported
(a held-out validation split would be the clean protocol) but is no privacy leak of the
training data, which the choices never read outside the accounted DP-SGD.

The run folder ``<out>/<name>/`` gets ``config.json``, ``metrics.json`` (ELBO curves,
epsilon, downstream accuracy, per-class accuracy, FID, IS, times), ``vae-<job>.msgpack``
(flax.serialization), ``synthetic-<job>.npz`` and ``plots/*.png`` (class grids real vs
synthetic, one grid per epsilon, ELBO curves); a summary table is printed last.

References:
  Kingma, Welling. "Auto-Encoding Variational Bayes", ICLR 2014. arXiv:1312.6114
  Abadi et al. "Deep Learning with Differential Privacy", CCS 2016. arXiv:1607.00133
  Rybkin, Daniilidis, Levine. "Simple and Effective VAE Training with Calibrated Decoders",
  ICML 2021. arXiv:2006.13202
  Dockhorn, Cao, Vahdat, Kreis. "Differentially Private Diffusion Models" (DPDM), TMLR 2023.
  arXiv:2210.09929 (the downstream-accuracy protocol and the MNIST numbers quoted in README)
"""

from __future__ import annotations

# jaxdp first: its CPU settings (malloc, XLA flags) must act before numpy and JAX start threads.
import jaxdp  # noqa: F401

# isort: split
import argparse
import dataclasses
import functools
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
from absl import logging as absl_logging
from flax import serialization

from jaxdp import _validate, accounting, data, optim, synth
from jaxdp import step as step_lib
from jaxdp.metrics import classifier_outputs, feature_scores, per_class_accuracy
from jaxdp.models import classifier as classifier_lib
from jaxdp.models.vae import (
  CONDITIONINGS,
  DECODERS,
  ConditionalVAE,
  evaluate_elbo,
  sample_images,
  vae_loss,
)
from jaxdp.plots import class_grid, plot_curves, plot_image_grids
from jaxdp.sampling import PoissonSampler
from jaxdp.step import ENGINES, DPConfig, init_state, make_step
from jaxdp.train import train

# The downstream classifier and the feature network are the classifier experiment's.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import dp_classifier

UsageError = dp_classifier.UsageError
DEFAULT_TARGET_EPSILON = 10.0
# The FID / IS feature network's fixed recipe (its epochs: --feature-epochs).
FEATURE_NETWORK = {"model": "tf_cnn", "activation": "relu", "lr": 0.05, "batch_size": 256}

# Settings that --quick changes; an explicit flag always wins.
FULL = {
  "epochs": 60,
  "batch_size": 4096,
  "train_size": None,
  "classifier_epochs": 10,
  "feature_epochs": 10,
}
QUICK = {
  "epochs": 4,
  "batch_size": 256,
  "train_size": 10_000,
  "classifier_epochs": 3,
  "feature_epochs": 2,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
  """Everything a run depends on; written to ``config.json``."""

  dataset: str = "mnist"
  data_dir: str | None = None
  train_size: int | None = None
  # VAE
  latent_dim: int = 16
  encoder_widths: tuple[int, ...] = (16,)
  encoder_hidden: tuple[int, ...] = ()
  decoder_hidden: tuple[int, ...] = (128,)
  decoder_widths: tuple[int, ...] = (8,)
  activation: str = "tanh"
  groups: int = 0
  decoder: str = "bernoulli"
  class_bias: bool = True
  conditioning: str = "product"
  class_prior: bool = True
  beta: float = 1.0
  epochs: int = FULL["epochs"]
  batch_size: int = FULL["batch_size"]
  lr: float = 1e-2
  ema: float = 0.99
  # privacy
  clip: float = 1.0
  noise_multiplier: float | None = None
  target_epsilon: float | None = None  # DEFAULT_TARGET_EPSILON when no other setting is given
  epsilons: tuple[float, ...] = ()  # inf: the non-private VAE
  no_dp: bool = False
  delta: float = 1e-5
  accountant: str = "pld"
  engine: str = "auto"
  microbatch_size: int | str | None = "auto"  # rows per microbatch in the step
  dp_label_counts: bool = False
  label_noise_multiplier: float = 50.0
  # synthetic data
  num_samples: int | None = None
  temperature: float = 1.3
  pixel_temperature: float = 1.0
  images_per_class: int = 5
  # downstream classifier and feature network (the classifier experiment's, non-private)
  classifier: str = "tf_cnn"
  classifier_activation: str = "relu"
  classifier_epochs: int = FULL["classifier_epochs"]
  classifier_batch_size: int = 256
  classifier_lr: float = 0.01
  classifier_shift: int = 1
  feature_epochs: int = FULL["feature_epochs"]
  # run
  seed: int = 0
  quick: bool = False
  out: str = "runs/dp_vae_synth"
  name: str | None = None
  progress: bool = True

  def __post_init__(self) -> None:
    """Checks every setting that does not need the data; messages name the flag."""
    v = _validate
    v.one_of("--dataset", self.dataset, dp_classifier.DATASETS)
    v.one_of("--activation", self.activation, tuple(classifier_lib.ACTIVATIONS))
    v.one_of("--decoder", self.decoder, DECODERS)
    v.one_of("--conditioning", self.conditioning, CONDITIONINGS)
    v.one_of("--accountant", self.accountant, accounting.ACCOUNTANTS)
    v.one_of("--engine", self.engine, ENGINES)
    step_lib.check_microbatch_size(self.microbatch_size, "--microbatch-size")
    v.one_of("--classifier", self.classifier, tuple(classifier_lib.MODELS))
    v.one_of(
      "--classifier-activation", self.classifier_activation, tuple(classifier_lib.ACTIVATIONS)
    )
    for flag, value in [
      ("--latent-size", self.latent_dim),
      ("--epochs", self.epochs),
      ("--batch-size", self.batch_size),
      ("--images-per-class", self.images_per_class),
      ("--classifier-epochs", self.classifier_epochs),
      ("--classifier-batch-size", self.classifier_batch_size),
      ("--feature-epochs", self.feature_epochs),
    ]:
      v.positive_int(flag, value)
    for flag, widths in [
      ("--encoder-widths", self.encoder_widths),
      ("--encoder-hidden", self.encoder_hidden),
      ("--decoder-hidden", self.decoder_hidden),
      ("--decoder-widths", self.decoder_widths),
    ]:
      if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"{flag} must be integers >= 1, got {widths}")
    if not self.decoder_widths:
      raise ValueError("--decoder-widths must hold at least one width")
    for flag, value in [("--train-size", self.train_size), ("--num-samples", self.num_samples)]:
      if value is not None:
        v.positive_int(flag, value)
    v.non_negative_int("--groups", self.groups)
    v.non_negative_int("--classifier-shift", self.classifier_shift)
    v.non_negative_int("--seed", self.seed)
    for flag, value in [
      ("--beta", self.beta),
      ("--lr", self.lr),
      ("--clip", self.clip),
      ("--label-noise-multiplier", self.label_noise_multiplier),
      ("--temperature", self.temperature),
      ("--pixel-temperature", self.pixel_temperature),
      ("--classifier-lr", self.classifier_lr),
    ]:
      v.positive(flag, value)
    v.probability("--delta", self.delta, high_open=True)
    v.probability("--ema", self.ema, low_open=False, high_open=True)
    given = [
      self.noise_multiplier is not None,
      self.target_epsilon is not None,
      bool(self.epsilons),
      self.no_dp,
    ]
    if sum(given) > 1:
      raise ValueError(
        "give at most one of --noise-multiplier, --target-epsilon, --epsilons, --no-dp"
      )
    if not any(given):
      object.__setattr__(self, "target_epsilon", DEFAULT_TARGET_EPSILON)
    if self.noise_multiplier is not None:
      v.positive("--noise-multiplier", self.noise_multiplier)
    if self.target_epsilon is not None:
      v.positive("--target-epsilon", self.target_epsilon)
    if any(
      isinstance(e, bool) or not isinstance(e, (int, float)) or math.isnan(e) or e <= 0
      for e in self.epsilons
    ):
      raise ValueError(f"--epsilons must all be numbers > 0 (inf: no DP), got {self.epsilons}")
    if self.name is not None and (not self.name or "/" in self.name or self.name in (".", "..")):
      raise ValueError(f"--name must be a plain folder name, got {self.name!r}")


def _widths(text: str) -> tuple[int, ...]:
  """``"16,32"`` -> (16, 32); ``"none"`` or ``""`` -> ()."""
  if text.strip().lower() in ("", "none"):
    return ()
  try:
    values = tuple(int(v) for v in text.split(","))
  except ValueError:
    values = ()
  if not values or any(v < 1 for v in values):
    raise argparse.ArgumentTypeError(f"must be comma-separated integers >= 1, got {text!r}")
  return values


def build_parser() -> argparse.ArgumentParser:
  """The command-line flags; unset ones resolve to the defaults of :class:`Config`."""
  p = dp_classifier._Parser(
    prog="dp_vae_synth.py",
    description="Train a class-conditional VAE with DP-SGD, release a labelled synthetic "
    "dataset, and measure how well a classifier trained on it does on real data.",
  )
  d = Config()
  g = p.add_argument_group("data")
  g.add_argument(
    "--dataset",
    choices=dp_classifier.DATASETS,
    default=d.dataset,
    help="synthetic: a tiny learnable set for tests (default %(default)s)",
  )
  g.add_argument(
    "--data-dir",
    default=None,
    help=f"folder with the four IDX files (else ${data.DATA_DIR_ENV}, else TFDS)",
  )
  g.add_argument(
    "--train-size",
    type=int,
    default=None,
    help=f"use a random subset of the training set (default all; {QUICK['train_size']} "
    "with --quick)",
  )
  g = p.add_argument_group("VAE")
  g.add_argument("--latent-size", type=int, default=d.latent_dim, help="default %(default)s")
  show = lambda widths: ",".join(map(str, widths)) or "none"
  g.add_argument(
    "--encoder-widths",
    type=_widths,
    default=d.encoder_widths,
    help=f"channels of the stride-2 encoder convs (default {show(d.encoder_widths)})",
  )
  g.add_argument(
    "--encoder-hidden",
    type=_widths,
    default=d.encoder_hidden,
    help=f"Dense layers after the encoder convs (default {show(d.encoder_hidden)})",
  )
  g.add_argument(
    "--decoder-hidden",
    type=_widths,
    default=d.decoder_hidden,
    help=f"Dense layers before the decoder's first map (default {show(d.decoder_hidden)})",
  )
  g.add_argument(
    "--decoder-widths",
    type=_widths,
    default=d.decoder_widths,
    help="channels of the decoder's maps, each upsampled x2 by a sub-pixel conv "
    f"(default {show(d.decoder_widths)}: a 14x14 map)",
  )
  g.add_argument(
    "--activation",
    choices=tuple(classifier_lib.ACTIVATIONS),
    default=d.activation,
    help="default %(default)s",
  )
  g.add_argument(
    "--groups", type=int, default=d.groups, help="GroupNorm groups, 0 for none (default 0)"
  )
  g.add_argument(
    "--decoder",
    choices=DECODERS,
    default=d.decoder,
    help="pixel likelihood; gaussian has a learned variance (default %(default)s)",
  )
  g.add_argument(
    "--no-class-bias",
    action="store_true",
    help="no learned per-class output image in the decoder",
  )
  g.add_argument(
    "--conditioning",
    choices=CONDITIONINGS,
    default=d.conditioning,
    help="decoder input: [z, y] (concat) or [y (x) z, y] (product: a class-specific map of "
    "z); default %(default)s",
  )
  g.add_argument(
    "--no-class-prior",
    action="store_true",
    help="prior N(0, I) instead of the learned class-conditional N(m_y, I)",
  )
  g.add_argument("--beta", type=float, default=d.beta, help="KL weight (default %(default)s)")
  g.add_argument(
    "--epochs",
    type=int,
    default=None,
    help=f"VAE epochs (default {FULL['epochs']}; {QUICK['epochs']} with --quick)",
  )
  g.add_argument(
    "--batch-size",
    type=int,
    default=None,
    help=f"expected (Poisson) batch size (default {FULL['batch_size']}; "
    f"{QUICK['batch_size']} with --quick)",
  )
  g.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (default %(default)s)")
  g.add_argument(
    "--ema",
    type=float,
    default=d.ema,
    help="decay of the parameter average that is released; 0 for the last iterate "
    "(default %(default)s)",
  )
  g.add_argument(
    "--engine",
    choices=("auto", "fast", "reference"),
    default=d.engine,
    help="per-example clipping engine (default %(default)s)",
  )
  g.add_argument(
    "--microbatch-size",
    default="auto",
    help="rows per sequential microbatch inside the jitted step (same numbers, less "
    "memory): auto (256 on CPU, no split on GPU), none, or an integer (default %(default)s)",
  )
  g = p.add_argument_group("privacy")
  g.add_argument(
    "--clip", type=float, default=d.clip, help="per-example L2 clip norm (default %(default)s)"
  )
  noise = g.add_mutually_exclusive_group()
  noise.add_argument("--noise-multiplier", type=float, default=None, help="noise std / clip")
  noise.add_argument(
    "--target-epsilon",
    type=float,
    default=None,
    help=f"calibrate the noise so the whole pipeline meets this epsilon "
    f"(default {DEFAULT_TARGET_EPSILON:g})",
  )
  noise.add_argument(
    "--epsilons",
    default=None,
    help="comma-separated targets, e.g. 1,3,10 (inf: no DP): one pipeline each, "
    "one grid per epsilon in one figure",
  )
  noise.add_argument("--no-dp", action="store_true", help="train the VAE without privacy")
  g.add_argument("--delta", type=float, default=d.delta, help="default %(default)g")
  g.add_argument(
    "--accountant",
    choices=accounting.ACCOUNTANTS,
    default=d.accountant,
    help="accountant that calibrates the noise (both are reported); default %(default)s",
  )
  g.add_argument(
    "--dp-label-counts",
    action="store_true",
    help="class proportions of the synthetic set from noisy private label counts "
    "(accounted); default: equal proportions",
  )
  g.add_argument(
    "--label-noise-multiplier",
    type=float,
    default=d.label_noise_multiplier,
    help="noise std on each label count (sensitivity 1); default %(default)s",
  )
  g = p.add_argument_group("synthetic data")
  g.add_argument(
    "--num-samples", type=int, default=None, help="synthetic images (default: training set size)"
  )
  g.add_argument(
    "--temperature",
    type=float,
    default=d.temperature,
    help="std of the latent draws when sampling (default %(default)s)",
  )
  g.add_argument(
    "--pixel-temperature",
    type=float,
    default=d.pixel_temperature,
    help="divides the decoder's pre-sigmoid output when sampling; below 1 sharpens "
    "(default %(default)s: the decoder mean)",
  )
  g.add_argument(
    "--images-per-class", type=int, default=d.images_per_class, help="grid columns (default 5)"
  )
  g = p.add_argument_group("downstream classifier (trained on synthetic data only)")
  g.add_argument(
    "--classifier",
    choices=tuple(classifier_lib.MODELS),
    default=d.classifier,
    help="default %(default)s",
  )
  g.add_argument(
    "--classifier-activation",
    choices=tuple(classifier_lib.ACTIVATIONS),
    default=d.classifier_activation,
    help="default %(default)s",
  )
  g.add_argument(
    "--classifier-epochs",
    type=int,
    default=None,
    help=f"default {FULL['classifier_epochs']} ({QUICK['classifier_epochs']} with --quick)",
  )
  g.add_argument(
    "--classifier-batch-size", type=int, default=d.classifier_batch_size, help="default 256"
  )
  g.add_argument(
    "--classifier-lr", type=float, default=d.classifier_lr, help="SGD lr (default %(default)s)"
  )
  g.add_argument(
    "--classifier-shift",
    type=int,
    default=d.classifier_shift,
    help="augment: shift each synthetic image by up to this many pixels at random "
    "(0: none; default %(default)s)",
  )
  g.add_argument(
    "--feature-epochs",
    type=int,
    default=None,
    help="epochs of the FID feature network on the real training set (cached; default "
    f"{FULL['feature_epochs']}, {QUICK['feature_epochs']} with --quick)",
  )
  g = p.add_argument_group("run")
  g.add_argument("--seed", type=int, default=d.seed, help="default %(default)s")
  g.add_argument("--quick", action="store_true", help="a small smoke run, minutes on a CPU")
  g.add_argument("--out", default=d.out, help="parent of the run folder (default %(default)s)")
  g.add_argument("--name", default=None, help="run folder name (default: time and target)")
  g.add_argument("--no-progress", action="store_true", help="no progress bars")
  return p


def parse_config(argv: Sequence[str] | None = None) -> Config:
  """Parses and validates the flags; a bad flag exits with one line on stderr (status 2)."""
  parser = build_parser()
  a = parser.parse_args(argv)
  preset = QUICK if a.quick else FULL
  pick = lambda value, key: preset[key] if value is None else value
  train_size = pick(a.train_size, "train_size")
  if a.dataset == "synthetic" and a.train_size is None:
    train_size = None  # the synthetic set is already tiny
  epsilons = dp_classifier.parse_epsilons(parser, a.epsilons) if a.epsilons is not None else ()
  try:
    return Config(
      dataset=a.dataset,
      data_dir=a.data_dir,
      train_size=train_size,
      latent_dim=a.latent_size,
      encoder_widths=a.encoder_widths,
      encoder_hidden=a.encoder_hidden,
      decoder_hidden=a.decoder_hidden,
      decoder_widths=a.decoder_widths,
      activation=a.activation,
      groups=a.groups,
      decoder=a.decoder,
      class_bias=not a.no_class_bias,
      class_prior=not a.no_class_prior,
      conditioning=a.conditioning,
      beta=a.beta,
      epochs=pick(a.epochs, "epochs"),
      batch_size=pick(a.batch_size, "batch_size"),
      lr=a.lr,
      ema=a.ema,
      clip=a.clip,
      noise_multiplier=a.noise_multiplier,
      target_epsilon=a.target_epsilon,
      epsilons=epsilons,
      no_dp=a.no_dp,
      delta=a.delta,
      accountant=a.accountant,
      engine=a.engine,
      microbatch_size=step_lib.parse_microbatch_size(a.microbatch_size, "--microbatch-size"),
      dp_label_counts=a.dp_label_counts,
      label_noise_multiplier=a.label_noise_multiplier,
      num_samples=a.num_samples,
      temperature=a.temperature,
      pixel_temperature=a.pixel_temperature,
      images_per_class=a.images_per_class,
      classifier=a.classifier,
      classifier_activation=a.classifier_activation,
      classifier_epochs=pick(a.classifier_epochs, "classifier_epochs"),
      classifier_batch_size=a.classifier_batch_size,
      classifier_lr=a.classifier_lr,
      classifier_shift=a.classifier_shift,
      feature_epochs=pick(a.feature_epochs, "feature_epochs"),
      seed=a.seed,
      quick=a.quick,
      out=a.out,
      name=a.name,
      progress=not a.no_progress,
    )
  except ValueError as err:
    parser.error(str(err))


# -- plan --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Job:
  """One pipeline: a VAE at one privacy level, its synthetic set and downstream model."""

  label: str
  slug: str
  private: bool
  target_epsilon: float | None = None
  noise_multiplier: float | None = None


def plan_jobs(cfg: Config) -> list[Job]:
  """The pipelines of ``cfg``, in order."""
  if cfg.no_dp:
    return [Job("non-private", "nodp", False)]
  if cfg.noise_multiplier is not None:
    s = cfg.noise_multiplier
    return [Job(f"DP sigma={s:g}", f"sigma{s:g}", True, noise_multiplier=s)]
  targets = cfg.epsilons or (cfg.target_epsilon,)
  return [
    Job("non-private", "nodp", False)
    if math.isinf(e)
    else Job(f"DP eps={e:g}", f"eps{e:g}", True, target_epsilon=e)
    for e in targets
  ]


def _classifier_config(cfg: Config, *, feature_net: bool = False) -> dp_classifier.Config:
  """The classifier experiment's settings for a non-private model: the downstream
  classifier (``--classifier*`` flags) or the fixed recipe of the FID feature network."""
  if feature_net:
    f = FEATURE_NETWORK
    model, act, lr, batch = f["model"], f["activation"], f["lr"], f["batch_size"]
    epochs = cfg.feature_epochs
  else:
    model, act, lr = cfg.classifier, cfg.classifier_activation, cfg.classifier_lr
    batch, epochs = cfg.classifier_batch_size, cfg.classifier_epochs
  return dp_classifier.Config(
    dataset=cfg.dataset,
    data_dir=cfg.data_dir,
    train_size=cfg.train_size,
    model=model,
    activation=act,
    optimizer="sgd",
    momentum=0.9,
    ema=0.999,
    baseline_lr=lr,
    baseline_batch_size=batch,
    baseline_epochs=epochs,
    delta=cfg.delta,
    accountant=cfg.accountant,
    seed=cfg.seed,
    progress=cfg.progress,
  )


def _train_classifier(
  ccfg: dp_classifier.Config, train_set: data.Dataset, test_set: data.Dataset, label: str
) -> tuple[dict[str, Any], Any, Any]:
  """A non-private classifier on ``train_set`` by the classifier experiment's own code."""
  model = classifier_lib.make_classifier(
    ccfg.model, num_classes=train_set.num_classes, act=ccfg.activation
  )
  train_data = jax.device_put(train_set.arrays())
  params = jax.jit(model.init)(jax.random.key(ccfg.seed), train_data["image"][:1])["params"]
  batch = min(ccfg.baseline_batch_size, len(train_set))
  sampler = PoissonSampler(len(train_set), expected_batch_size=batch, seed=ccfg.seed)
  job = dp_classifier.Job(label, False, sampler, ccfg.baseline_epochs)
  entry, released = dp_classifier.train_model(
    ccfg, job, model, params, train_data, test_set, "test"
  )
  return entry, model, released


def feature_network(
  cfg: Config, train_set: data.Dataset, test_set: data.Dataset
) -> tuple[Any, Any, dict[str, Any]]:
  """The FID/IS feature classifier, trained on the REAL training set or loaded from cache.

  A fixed recipe (``FEATURE_NETWORK``, ``--feature-epochs``), whatever the downstream
  classifier flags are, so that FIDs of different runs compare. An evaluation tool only:
  it reads the private training data (as the test accuracy reads the test set), and
  nothing that is released depends on it.
  """
  ccfg = _classifier_config(cfg, feature_net=True)
  tag = (
    f"feature-net-{train_set.name.replace('/', '_')}-n{len(train_set)}-{ccfg.model}-"
    f"{ccfg.activation}-e{ccfg.baseline_epochs}-b{ccfg.baseline_batch_size}-s{cfg.seed}"
  )
  cache = Path(cfg.out) / "_cache"
  ckpt, info_path = cache / f"{tag}.msgpack", cache / f"{tag}.json"
  model = classifier_lib.make_classifier(
    ccfg.model, num_classes=train_set.num_classes, act=ccfg.activation
  )
  if ckpt.is_file() and info_path.is_file():
    template = jax.eval_shape(model.init, jax.random.key(0), train_set.images[:1])["params"]
    params = serialization.from_bytes(template, ckpt.read_bytes())
    info = json.loads(info_path.read_text())
    return model, params, {**info, "cached": True}
  print(f"feature network: training {ccfg.model} on the real training set (cached as {ckpt})")
  entry, model, params = _train_classifier(ccfg, train_set, test_set, "feature network")
  info = {
    "model": ccfg.model,
    "activation": ccfg.activation,
    "epochs": ccfg.baseline_epochs,
    "trained_on": f"{train_set.name} ({len(train_set)} real examples, non-private)",
    "test_accuracy": entry["test_accuracy"],
    "checkpoint": str(ckpt),
  }
  cache.mkdir(parents=True, exist_ok=True)
  ckpt.write_bytes(serialization.to_bytes(params))
  info_path.write_text(json.dumps(info, indent=2) + "\n")
  return model, params, {**info, "cached": False}


# -- one pipeline ------------------------------------------------------------------------


def make_vae(cfg: Config, train_set: data.Dataset) -> ConditionalVAE:
  """The VAE of ``cfg`` for images shaped like ``train_set``'s."""
  return ConditionalVAE(
    image_shape=train_set.image_shape,
    num_classes=train_set.num_classes,
    latent_dim=cfg.latent_dim,
    encoder_widths=cfg.encoder_widths,
    encoder_hidden=cfg.encoder_hidden,
    decoder_hidden=cfg.decoder_hidden,
    decoder_widths=cfg.decoder_widths,
    act=cfg.activation,
    groups=cfg.groups,
    decoder=cfg.decoder,
    class_bias=cfg.class_bias,
    class_prior=cfg.class_prior,
    conditioning=cfg.conditioning,
  )


def run_job(
  cfg: Config,
  job: Job,
  index: int,
  train_set: data.Dataset,
  test_set: data.Dataset,
  features: tuple[Any, Any],
  out: Path,
) -> tuple[dict[str, Any], data.Dataset]:
  """Label counts, VAE, synthetic set, downstream classifier and scores for one job."""
  t0 = time.perf_counter()
  n, k = len(train_set), train_set.num_classes
  root = jax.random.fold_in(jax.random.key(cfg.seed), index)
  ledger = accounting.PrivacyLedger()
  entry: dict[str, Any] = {"label": job.label, "private": job.private}

  # 1. Class proportions: public (equal), or the Gaussian mechanism on the label histogram.
  proportions = None
  if cfg.dp_label_counts:
    proportions, noisy = synth.dp_label_proportions(
      train_set.labels,
      k,
      cfg.label_noise_multiplier,
      ledger,
      seed=cfg.seed * 1000 + index,
    )
    entry["noisy_label_counts"] = noisy.tolist()
  entry["label_proportions"] = proportions.tolist() if proportions is not None else [1.0 / k] * k

  # 2. The VAE, through the one jaxdp step.
  sampler = PoissonSampler(n, expected_batch_size=cfg.batch_size, seed=cfg.seed + 1 + index)
  q, steps = sampler.sampling_prob, cfg.epochs * sampler.steps_per_epoch
  privacy, tracker, sigma = None, None, None
  if job.private:
    sigma = job.noise_multiplier
    if sigma is None:
      try:
        sigma = accounting.calibrate_noise_multiplier(
          job.target_epsilon, cfg.delta, q, steps, cfg.accountant, ledger=ledger
        )
      except ValueError as err:
        raise UsageError(f"--target-epsilon / --epsilons: {err}") from err
    privacy = DPConfig(l2_norm_clip=cfg.clip, noise_multiplier=sigma, engine=cfg.engine)
    tracker = accounting.EpsilonTracker(q, sigma, cfg.delta, ledger=ledger)
    print(
      f"{job.label}: q = {q:.5f}, {steps} steps, noise multiplier {sigma:.4f}"
      + (
        f" (whole pipeline calibrated to epsilon {job.target_epsilon:g})"
        if job.target_epsilon
        else ""
      ),
      flush=True,
    )
  entry.update(
    epochs=cfg.epochs,
    steps=steps,
    expected_batch_size=sampler.expected_batch_size,
    sampling_prob=q,
    noise_multiplier=sigma,
    l2_norm_clip=cfg.clip if job.private else None,
    target_epsilon=job.target_epsilon,
  )
  model = make_vae(cfg, train_set)
  train_data = jax.device_put(train_set.arrays())
  k_init, k_state, k_eval, k_sample = jax.random.split(root, 4)
  init = jax.jit(model.init)
  params = init(k_init, train_data["image"][:1], train_data["label"][:1], k_init)["params"]
  opt = optim.make_optimizer("adam", cfg.lr, ema_decay=cfg.ema or None)
  step = make_step(
    vae_loss(model, beta=cfg.beta),
    opt,
    privacy,
    expected_batch_size=q * n,
    has_aux=True,
    microbatch_size=cfg.microbatch_size,
  )
  state = init_state(params, opt, k_state)
  test_images, test_labels = jax.device_put((test_set.images, test_set.labels))

  def released(state) -> Any:
    ema = optim.ema_params(state.opt_state)
    return state.params if ema is None else ema

  def on_epoch(epoch: int, state) -> dict[str, float]:
    del epoch
    res = evaluate_elbo(model, released(state), test_images, test_labels, k_eval)
    return {f"test_{key}": value for key, value in res.items()}

  state, history = train(
    step,
    state,
    train_data,
    sampler,
    epochs=cfg.epochs,
    tracker=tracker,
    on_epoch=on_epoch,
    aux_name="neg_elbo",
    desc=f"VAE {job.label}",
    progress=cfg.progress,
  )
  vae_params = released(state)
  entry["vae_history"] = history
  entry["vae_train_time_s"] = history[-1]["time"]
  entry["test_neg_elbo"] = history[-1]["test_neg_elbo"]
  if cfg.decoder == "gaussian":
    entry["decoder_log_scale"] = float(
      model.apply({"params": vae_params}, method=ConditionalVAE.decoder_log_scale)
    )
  ckpt = out / f"vae-{job.slug}.msgpack"
  ckpt.write_bytes(serialization.to_bytes(vae_params))
  entry["vae_checkpoint"] = ckpt.name

  # Privacy of everything released: the ledger holds every private use of the data.
  if job.private:
    assert int(state.step) == steps, "the run took other steps than accounted"
    ledger.add_dpsgd("vae", q, sigma, steps)
  entry["ledger"] = ledger.to_dict()
  for acc in accounting.ACCOUNTANTS:
    entry[f"epsilon_{acc}"] = ledger.epsilon(cfg.delta, acc) if job.private else math.inf
  entry["epsilon"] = entry[f"epsilon_{cfg.accountant}"]
  entry["delta"] = cfg.delta

  # 3. The synthetic dataset: post-processing of the released parameters and proportions.
  num_samples = cfg.num_samples or n
  generator = functools.partial(
    sample_images,
    model,
    vae_params,
    temperature=cfg.temperature,
    pixel_temperature=cfg.pixel_temperature,
  )
  synthetic = synth.sample_dataset(
    generator,
    num_samples,
    k,
    k_sample,
    proportions=proportions,
    seed=cfg.seed + index,
    name=f"synthetic/{job.slug}",
  )
  npz = synth.save_npz(out / f"synthetic-{job.slug}.npz", synthetic)
  entry.update(num_samples=num_samples, synthetic_npz=npz.name)

  # 4. Downstream: an ordinary classifier trained on synthetic data only, tested on real.
  augmented = data.random_shifts(synthetic, cfg.classifier_shift, seed=cfg.seed + index)
  down, clf_model, clf_params = _train_classifier(
    _classifier_config(cfg), augmented, test_set, f"downstream {job.label}"
  )
  _, logits = classifier_outputs(clf_model, clf_params, test_set.images)
  entry["downstream"] = {
    "model": cfg.classifier,
    "activation": cfg.classifier_activation,
    "epochs": cfg.classifier_epochs,
    "shift_augmentation": cfg.classifier_shift,
    "test_accuracy": down["test_accuracy"],
    "per_class_accuracy": per_class_accuracy(logits, test_set.labels, k),
    "history": down["history"],
    "train_time_s": down["train_time_s"],
  }
  entry["downstream_accuracy"] = down["test_accuracy"]

  # 5. Feature-network FID / IS against the real test set (evaluation only).
  scores = feature_scores(*features, test_set.images, synthetic.images)
  entry.update(
    fid=scores["fid"],
    inception_score=scores["inception_score"],
    inception_score_real=scores["inception_score_reference"],
  )
  entry["wall_time_s"] = time.perf_counter() - t0
  return entry, synthetic


# -- outputs -----------------------------------------------------------------------------


def _run_dir(cfg: Config, jobs: list[Job]) -> Path:
  """A fresh run folder under ``cfg.out``."""
  if cfg.name:
    name = cfg.name
  else:
    tag = "sweep" if len(jobs) > 1 else jobs[0].slug
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{tag}" + ("-quick" if cfg.quick else "")
  return dp_classifier.fresh_dir(Path(cfg.out) / name)


def _table(rows: list[dict[str, Any]]) -> str:
  """The summary table printed last."""
  head = ["VAE", "downstream acc", "FID (feat.)", "IS (feat.)", "eps (PLD)", "eps (RDP)"]
  head += ["delta", "time"]
  lines = []
  for r in rows:
    lines.append(
      [
        r["label"],
        f"{100 * r['downstream_accuracy']:.2f}%",
        f"{r['fid']:.2f}",
        f"{r['inception_score']:.2f}",
        f"{r['epsilon_pld']:.3f}" if r["private"] else "inf",
        f"{r['epsilon_rdp']:.3f}" if r["private"] else "inf",
        f"{r['delta']:g}" if r["private"] else "-",
        f"{r['wall_time_s']:.0f} s",
      ]
    )
  widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
  fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
  return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *(fmt(line) for line in lines)])


def run(cfg: Config) -> dict[str, Any]:
  """Runs the pipelines of ``cfg``, writes the run folder and returns the metrics."""
  t_start = time.perf_counter()
  train_set, test_set, _ = dp_classifier.load_splits(_classifier_config(cfg))
  n = len(train_set)
  if cfg.batch_size > n:
    raise UsageError(
      f"--batch-size must be <= the number of training examples ({n}), got {cfg.batch_size}"
    )
  if cfg.delta >= 1.0 / n:
    raise UsageError(
      f"--delta must be < 1/N = {1.0 / n:.3g} for N = {n} training examples, got {cfg.delta:g}"
    )
  try:  # fail early, in one line, on a decoder that does not fit the image size
    key = jax.random.key(0)
    jax.eval_shape(
      make_vae(cfg, train_set).init, key, train_set.images[:1], train_set.labels[:1], key
    )
  except ValueError as err:
    raise UsageError(f"--decoder-widths: {err}") from err
  jobs = plan_jobs(cfg)
  out = _run_dir(cfg, jobs)
  (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")

  features = feature_network(cfg, train_set, test_set)
  results = [
    run_job(cfg, job, i, train_set, test_set, features[:2], out) for i, job in enumerate(jobs)
  ]
  entries = [e for e, _ in results]

  plots = out / "plots"
  k, m = train_set.num_classes, cfg.images_per_class
  real = class_grid(train_set.images, train_set.labels, k, m)
  for entry, synthetic in results:
    grid = class_grid(synthetic.images, synthetic.labels, k, m)
    plot_image_grids(
      {"real (training set)": real, f"synthetic, {entry['label']}": grid},
      plots / f"real_vs_synthetic-{entry['label'].replace(' ', '_').replace('=', '')}.png",
    )
  panels = {"real": real}
  for entry, synthetic in results:
    eps = f"eps = {entry['epsilon_pld']:.2f}" if entry["private"] else "no DP"
    panels[f"{entry['label']}\n{eps}"] = class_grid(synthetic.images, synthetic.labels, k, m)
  plot_image_grids(
    panels,
    plots / "synthetic_grid.png",
    title=f"{cfg.dataset}: synthetic samples per class, delta = {cfg.delta:g}",
  )
  plot_curves(
    {e["label"]: e["vae_history"] for e in entries},
    plots / "elbo.png",
    metrics=("neg_elbo",),
    splits=("train", "test"),
  )

  metrics = {
    "dataset": cfg.dataset,
    "num_train": n,
    "num_test": len(test_set),
    "delta": cfg.delta,
    "accountant": cfg.accountant,
    "feature_network": {
      **features[2],
      "note": "FID / IS on this classifier's penultimate features and softmax; NOT "
      "Inception FID / IS, not comparable to papers",
    },
    "runs": entries,
    "wall_time_s": time.perf_counter() - t_start,
    "run_dir": str(out),
  }
  (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=True) + "\n")
  print(f"wrote {out}")
  print(_table(entries))
  return metrics


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Command-line entry: parses ``argv`` (default ``sys.argv[1:]``), runs, returns metrics."""
  cfg = parse_config(argv)
  absl_logging.set_verbosity(absl_logging.ERROR)  # dp_accounting's per-order warnings
  try:
    return run(cfg)
  except UsageError as err:
    build_parser().error(str(err))
    raise AssertionError("unreachable") from err


if __name__ == "__main__":
  main(sys.argv[1:])
