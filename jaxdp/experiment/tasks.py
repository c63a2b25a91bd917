"""The tasks experiments are built from: train a model (private or not) through the one
jaxdp step, train and evaluate classifiers, train on synthetic data and test on real, FID/IS.

:func:`fit` is the one training task. It draws the sampler's seed and the state's key (the
noise and per-example keys) from the run's :class:`~jaxdp.keys.KeySource` under the model's
label, so every model of a run has its own secret noise; it records a private model in the
run folder's ledger, and it sends what it measures to the right place: per-epoch metrics of
a held-out split and the epsilon so far to the released stream (for a DP model), statistics
of the private training batches (loss, accuracy, gradient norms, fraction clipped) to the
non-DP diagnostics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np
import optax
from flax import serialization

try:
  import fcntl
except ImportError:  # not POSIX: no lock between runs side by side
  fcntl = None

from jaxdp import _validate, accounting, data, optim, parallel, synth
from jaxdp.experiment.cli import UsageError, flag, usage_errors
from jaxdp.experiment.runs import RunFolder, format_table, slug
from jaxdp.experiment.settings import (
  CLASSIFIERS,
  GANSettings,
  Job,
  PrivacySettings,
  SyntheticSettings,
)
from jaxdp.experiment.splits import Splits, load_splits
from jaxdp.keys import KeySource
from jaxdp.metrics import (
  classifier_outputs,
  evaluate_classifier,
  feature_scores,
  per_class_accuracy,
)
from jaxdp.models import classifier as classifier_lib
from jaxdp.models import gan as gan_lib
from jaxdp.models import scatternet
from jaxdp.plots import class_grid, plot_curves, plot_epsilon, plot_privacy_utility
from jaxdp.sampling import PoissonSampler
from jaxdp.step import DPConfig, init_state, make_step
from jaxdp.train import train

__all__ = [
  "CLASSIFIERS",
  "FEATURE_NETWORK",
  "GeneratorTrainer",
  "Noise",
  "SyntheticPipeline",
  "SyntheticRelease",
  "Trained",
  "Training",
  "accuracy_scores",
  "calibrate",
  "classifier_inputs",
  "critic_noise",
  "evaluate_generator",
  "feature_network",
  "fid_is",
  "fit",
  "label_proportions",
  "load_data",
  "make_classifier",
  "public_cut",
  "public_only_baseline",
  "run_feature_network",
  "synthetic_table",
  "test_classifier",
  "train_classifier",
  "train_on_synthetic",
]

PyTree = Any
PLD_CURVE_POINTS = 8  # epochs at which a private run's epsilon curve gets a PLD value


@dataclasses.dataclass(frozen=True, kw_only=True)
class Training:
  """How one model trains (the settings that change no privacy beyond batch and epochs)."""

  epochs: int
  batch_size: int
  lr: float
  optimizer: str = "sgd"
  momentum: float | None = None
  ema: float = 0.0  # decay of the released parameter average; 0: the last iterate
  microbatch_size: int | str | None = "auto"
  physical_batch_size: int | None = None  # None: mean + 4 std of the Poisson batch size
  devices: int | None = None  # devices the rows of each step are split over; None: all
  weight_clip: float | None = None  # keep every parameter in [-c, c] (a WGAN critic)

  def __post_init__(self) -> None:
    _validate.positive_int("epochs", self.epochs)
    _validate.positive_int("batch_size", self.batch_size)
    _validate.positive("lr", self.lr)
    _validate.probability("ema", self.ema, low_open=False, high_open=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Noise:
  """The DP-SGD mechanism of one private model."""

  l2_norm_clip: float
  noise_multiplier: float
  delta: float
  accountant: str = "pld"
  engine: str = "auto"


@dataclasses.dataclass
class Trained:
  """A trained model: the parameters it releases, its summary and per-epoch history."""

  label: str
  params: PyTree
  entry: dict[str, Any]
  history: list[dict[str, Any]]


def load_data(cfg: Any, batch_flags: tuple[str, ...] = ("batch_size",)) -> Splits:
  """The splits of an experiment's config (its data and privacy settings), checked against
  the data: every batch size in ``batch_flags`` fits the private set, and delta < 1/N.

  Raises:
    UsageError: with a message that names the flag.
  """
  with usage_errors():
    splits = load_splits(
      cfg.dataset,
      cfg.data_dir,
      train_size=cfg.train_size,
      validation_size=cfg.validation_size,
      public_size=cfg.public_size,
      seed=cfg.seed,
    )
  n = len(splits.private)
  for name in batch_flags:
    if getattr(cfg, name) > n:
      raise UsageError(f"{flag(name)} must be <= {n} (the private training set)")
  if cfg.delta >= 1.0 / n:
    raise UsageError(f"--delta must be < 1/N = {1 / n:.3g} for N = {n}, got {cfg.delta:g}")
  return splits


def calibrate(
  job: Job,
  privacy: PrivacySettings,
  *,
  num_examples: int,
  training: Training,
  ledger: accounting.PrivacyLedger | None = None,
) -> Noise | None:
  """The mechanism of ``job``: its noise multiplier, given or calibrated to its target.

  With ``ledger``, the calibration composes the earlier private uses in it, so the whole
  pipeline (e.g. noisy label counts, then the model) meets the target.

  Raises:
    UsageError: if the target cannot be met (the message names the flag).
  """
  if not job.private:
    return None
  sigma = job.noise_multiplier
  if sigma is None:
    q = training.batch_size / num_examples
    steps = training.epochs * max(1, round(1 / q))
    try:
      sigma = accounting.calibrate_noise_multiplier(
        job.target_epsilon, privacy.delta, q, steps, privacy.accountant, ledger=ledger
      )
    except ValueError as err:
      raise UsageError(f"--target-epsilon / --epsilons: {err}") from err
  return Noise(
    l2_norm_clip=privacy.clip,
    noise_multiplier=sigma,
    delta=privacy.delta,
    accountant=privacy.accountant,
    engine=privacy.engine,
  )


def _released_params(state: Any) -> PyTree:
  ema = optim.ema_params(state.opt_state)
  return state.params if ema is None else ema


def fit(
  label: str,
  loss_fn: Callable,
  params: PyTree,
  train_data: Mapping[str, jax.Array],
  training: Training,
  *,
  noise: Noise | None,
  keys: KeySource,
  run: RunFolder | None = None,
  evaluate: Callable[[PyTree], Mapping[str, float]] | None = None,
  select: str | None = None,
  release: bool | None = None,
  has_aux: bool = False,
  aux_name: str = "accuracy",
  progress: bool = True,
  side_inputs: Callable[[list[Any]], list[dict[str, Any]]] | None = None,
  after_step: Callable[[int, Any], None] | None = None,
) -> Trained:
  """Trains one model through the one jaxdp step, privately (``noise``) or not.

  Args:
    label: the model's name in the run (its keys, ledger entry, files and logs).
    loss_fn: per-example loss ``loss_fn(params, example, rng)``.
    params: initial parameters.
    train_data: the training examples as device arrays with a leading example axis.
    training: epochs, expected batch size, optimiser.
    noise: the DP-SGD mechanism, or None for non-private training.
    keys: the run's key source: the sampler's seed and the noise key come from it.
    run: the run folder, or None.
    evaluate: ``evaluate(params) -> {name: value}`` on a held-out split, after every epoch
      (e.g. ``validation_accuracy``); never the test set.
    select: a key of ``evaluate``'s output to maximise: the released parameters are those of
      the best epoch (a choice on the held-out split; of tied epochs the later, trained
      longer) instead of the last.
    release: whether the model's per-epoch metrics go to the released stream; default: only
      a private model's (a model trained without DP on private data is not released).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    aux_name: the name of a per-example aux array in the diagnostics.
    progress: progress bars.
    side_inputs, after_step: :func:`jaxdp.train.train`'s hooks (a GAN critic's generated
      rows, its generator's updates); a model with ``after_step`` is not checkpointed (the
      hook's state is not in the checkpoint).

  Returns:
    :class:`Trained`; ``entry`` holds the settings, the epsilon (PLD and RDP) of a private
    model, times, and the last (or selected) evaluation.
  """
  n = int(jax.tree_util.tree_leaves(train_data)[0].shape[0])
  private = noise is not None
  release = private if release is None else release
  mesh = parallel.mesh_for(training.devices, "--devices")
  sampler = PoissonSampler(
    n,
    expected_batch_size=min(training.batch_size, n),
    physical_batch_size=training.physical_batch_size,
    row_multiple=parallel.row_multiple(mesh),
    seed=keys.seed(f"{label}/batches"),
  )
  q, steps = sampler.sampling_prob, training.epochs * sampler.steps_per_epoch
  entry: dict[str, Any] = {
    "label": label,
    "private": private,
    "num_examples": n,
    "epochs": training.epochs,
    "steps": steps,
    "expected_batch_size": sampler.expected_batch_size,
    "physical_batch_size": sampler.physical_batch_size,
    "devices": parallel.describe(mesh),
    "sampling_prob": q,
    "learning_rate": training.lr,
  }
  privacy, tracker = None, None
  if private:
    privacy = DPConfig(
      l2_norm_clip=noise.l2_norm_clip, noise_multiplier=noise.noise_multiplier, engine=noise.engine
    )
    tracker = accounting.EpsilonTracker(q, noise.noise_multiplier, noise.delta)
    entry.update(l2_norm_clip=noise.l2_norm_clip, noise_multiplier=noise.noise_multiplier)
    print(f"{label}: q = {q:.5f}, {steps} steps, noise multiplier {noise.noise_multiplier:.4f}")
  opt = optim.make_optimizer(
    training.optimizer,
    training.lr,
    momentum=training.momentum,
    ema_decay=training.ema or None,
    weight_clip=training.weight_clip,
  )
  step = make_step(
    loss_fn,
    opt,
    privacy,
    expected_batch_size=sampler.expected_batch_size,
    has_aux=has_aux,
    microbatch_size=training.microbatch_size,
    mesh=mesh,
  )
  state = init_state(params, opt, keys.key(f"{label}/noise"))
  best: dict[str, Any] = {}

  def on_epoch(epoch: int, state: Any) -> Mapping[str, float]:
    if evaluate is None:
      return {}
    result = dict(evaluate(_released_params(state)))
    if select is not None and (not best or result[select] >= best["value"]):  # ties: later
      best.update(value=result[select], epoch=epoch, params=_released_params(state))
    return result

  def released_view(row: dict[str, Any]) -> dict[str, Any]:
    """An epoch's released metrics: held-out results and epsilon so far (PLD at some
    epochs); no statistic of the private training batches."""
    shown = {k: v for k, v in row.items() if not k.startswith("train_") and k != "grad_norms"}
    if private and row["epoch"] - 1 in _pld_points(training.epochs):
      event = accounting.dpsgd_event(q, noise.noise_multiplier, int(row["step"]))
      shown["epsilon_pld"] = accounting.epsilon(event, noise.delta, "pld")
    return shown

  def on_entry(row: dict[str, Any]) -> None:
    """Logs an epoch's entry: the released metrics, and the non-DP diagnostics apart."""
    if run is None:
      return
    shown = released_view(row)
    diag = {k: v for k, v in row.items() if k.startswith("train_") or k == "epoch"}
    if release:
      run.released.log(label, row["step"], shown)
      run.diagnostics.log(label, row["step"], diag)
    else:
      run.diagnostics.log(label, row["step"], {**shown, **diag})
    if "grad_norms" in row:
      run.diagnostics.histogram(label, "per_example_grad_norm", row["step"], row["grad_norms"])

  # A model that selects its best epoch keeps that epoch's parameters in memory only: it is
  # not checkpointed (a resumed run retrains it).
  resumable = run is not None and select is None and after_step is None
  checkpoint = run.checkpointer(label) if resumable else None
  state, raw = train(
    step,
    state,
    train_data,
    sampler,
    epochs=training.epochs,
    tracker=tracker,
    on_epoch=on_epoch,
    on_entry=on_entry,
    aux_name=aux_name,
    desc=label,
    progress=progress,
    checkpoint=checkpoint,
    side_inputs=side_inputs,
    after_step=after_step,
  )
  if checkpoint is not None:
    checkpoint.close()
  assert int(state.step) == steps, "the run took other steps than accounted"
  history = [released_view(row) for row in raw]
  entry["train_time_s"] = raw[-1]["time"]
  entry.update({k: v for k, v in history[-1].items() if k not in ("epoch", "step", "time")})
  released = _released_params(state)
  if select is not None and best:
    released = best["params"]
    entry["selected_epoch"] = best["epoch"]
    entry[select] = best["value"]
  if private:
    event = accounting.dpsgd_event(q, noise.noise_multiplier, steps)
    entry["epsilon_pld"] = history[-1]["epsilon_pld"]
    entry["epsilon_rdp"] = accounting.epsilon(event, noise.delta, "rdp")
    entry["epsilon"] = entry[f"epsilon_{noise.accountant}"]
    entry["delta"] = noise.delta
    if run is not None:
      run.ledger.add_dpsgd(label, q, noise.noise_multiplier, steps)
  return Trained(label, released, entry, history)


PRETRAIN_BATCH_SIZE = 128  # public pretraining: small batches, many steps on a small set


def pretrain_on_public(
  label: str,
  loss_fn: Callable,
  params: PyTree,
  public_data: Mapping[str, jax.Array],
  training: Training,
  *,
  epochs: int,
  keys: KeySource,
  run: RunFolder | None,
  aux_name: str,
  progress: bool = True,
  side_inputs: Callable[[list[Any]], list[dict[str, Any]]] | None = None,
  after_step: Callable[[int, Any], None] | None = None,
  evaluate: Callable[[PyTree], Mapping[str, float]] | None = None,
) -> PyTree:
  """A generator's starting point trained WITHOUT noise on the PUBLIC partition only
  (``public_data``, never a private row): the private steps that follow start from it.

  Public pretraining is free of privacy cost (it reads no private data, so no ledger entry)
  and lets the noisy steps adapt a model instead of building one, which matters most at
  small epsilon. It runs ``epochs`` epochs with ``training``'s optimiser and learning rate
  at batch ``PRETRAIN_BATCH_SIZE`` (at most the public set's size), without an EMA; the loss
  has aux ``aux_name``. ``side_inputs``, ``after_step`` and ``evaluate`` are :func:`fit`'s
  (a GAN's critic pretrains with its generator's hooks, :class:`GeneratorTrainer`).

  Returns:
    The pretrained parameters.
  """
  n = int(jax.tree_util.tree_leaves(public_data)[0].shape[0])
  training = dataclasses.replace(
    training, epochs=epochs, batch_size=min(PRETRAIN_BATCH_SIZE, n), ema=0.0
  )
  return fit(
    f"{label} public pretraining", loss_fn, params, public_data, training, noise=None,
    keys=keys, run=run, release=True, has_aux=True, aux_name=aux_name, progress=progress,
    side_inputs=side_inputs, after_step=after_step, evaluate=evaluate,
  ).params  # fmt: skip


def _pld_points(epochs: int) -> set[int]:
  """Epoch indices that get a PLD epsilon (about PLD_CURVE_POINTS, the last included)."""
  last = epochs - 1
  return {round(k * last / (PLD_CURVE_POINTS - 1)) for k in range(PLD_CURVE_POINTS)}


# -- classifiers -------------------------------------------------------------------------


def make_classifier(name: str, num_classes: int, activation: str, **architecture: Any) -> nn.Module:
  """The classifier named ``name`` (one of ``CLASSIFIERS``), with ``architecture`` settings."""
  _validate.one_of("model", name, CLASSIFIERS)
  if name == "scatter_cnn":
    return scatternet.ScatterCNN(num_classes=num_classes, act=activation, **architecture)
  if name == "scatter_vit":
    return scatternet.ScatterViT(num_classes=num_classes, act=activation, **architecture)
  return classifier_lib.make_classifier(
    name, num_classes=num_classes, act=activation, **architecture
  )


def classifier_inputs(name: str, ds: data.Dataset) -> dict[str, jax.Array]:
  """The inputs of classifier ``name`` on the device: the images, or for ``scatter_cnn`` and
  ``scatter_vit`` their ScatterNet features (fixed filters, computed per example: no
  privacy cost; kept in the feature cache, :func:`scattering_features`)."""
  arrays = ds.arrays()
  if name.startswith("scatter_"):
    arrays = {"image": scattering_features(ds.images), "label": ds.labels}
  return jax.device_put(arrays)


CACHE_DIR_ENV = "JAXDP_CACHE_DIR"


def feature_cache_dir() -> Path | None:
  """The folder of cached per-example features: ``$JAXDP_CACHE_DIR`` (set but empty: no
  cache), else ``~/.cache/jaxdp``."""
  value = os.environ.get(CACHE_DIR_ENV)
  if value is None:
    return Path.home() / ".cache" / "jaxdp"
  return Path(value) if value else None


def scattering_features(images: np.ndarray) -> np.ndarray:
  """:func:`jaxdp.models.scatternet.scattering_dataset` of ``images``, read back from the
  feature cache when the same images were transformed before (about 30 s for MNIST on
  the 2-core CPU, then a file read).

  The file is named by a SHA-256 of the images and of the transform's version
  (``scatternet.FEATURES_VERSION``), and written atomically by a background thread. It
  holds features of whatever images it is given, the private split's included: a local
  copy of derived data beside the dataset, never part of a run folder or a released file.
  """
  cache = feature_cache_dir()
  if cache is None:
    return scatternet.scattering_dataset(images)
  images = np.ascontiguousarray(images)
  digest = hashlib.sha256(
    f"scattering v{scatternet.FEATURES_VERSION} {images.dtype} {images.shape}".encode()
  )
  digest.update(images.data)
  path = cache / f"scattering-{digest.hexdigest()[:32]}.npy"
  if path.is_file():
    try:
      return np.load(path)
    except (OSError, ValueError):  # a damaged file: computed again and replaced
      pass
  features = scatternet.scattering_dataset(images)
  cache.mkdir(parents=True, exist_ok=True)

  def write() -> None:
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp.npy")
    np.save(tmp, features)
    tmp.replace(path)

  # Written while training goes on (the file I/O releases the GIL; 0.9 GB for MNIST's
  # private split); not a daemon thread, so the interpreter waits for it at exit.
  threading.Thread(target=write, name="jaxdp-feature-cache").start()
  return features


def run_classifiers(cfg: Any) -> dict[str, Any]:
  """A classifier experiment (``experiments/dp_classifier.py``, ``dp_vit.py``): the private
  models of ``cfg.jobs`` (each with its own secret noise, calibrated to its target) and the
  non-private baseline, trained on the private split; curves on validation, the test set
  read once per released model; the run folder and the printed table.

  ``cfg`` holds the data, privacy, classifier (``ClassifierSettings``) and run settings.

  Returns:
    The released ``metrics.json`` (the private models; the baseline's go to ``nondp/``).
  """
  training = lambda private: Training(**cfg.training_options(private), **cfg.step_options())
  splits = load_data(cfg, ("batch_size", "baseline_batch_size"))
  n = len(splits.private)
  jobs = cfg.jobs("DP-SGD")
  noises = [calibrate(j, cfg, num_examples=n, training=training(True)) for j in jobs]
  tag = "sweep" if len(jobs) > 1 else jobs[0].label.split()[-1].replace("=", "")
  out = RunFolder.start(cfg, f"{cfg.model}-{tag}")
  keys = cfg.key_source()
  model = make_classifier(cfg.model, splits.num_classes, cfg.activation, **cfg.architecture())
  inputs = lambda ds: classifier_inputs(cfg.model, ds)
  train_data = inputs(splits.private)
  validation = inputs(splits.validation) if splits.validation is not None else None
  init_key = jax.random.key(cfg.seed)  # public: the same initialisation for every model

  plan = [("non-private", None)] if cfg.baseline else []
  plan += [(j.label, noise) for j, noise in zip(jobs, noises, strict=True)]
  trained = []
  test_inputs = None  # every model reads the same test set: its inputs are made once
  for label, noise in plan:
    t = train_classifier(
      label, model, train_data, training(noise is not None), noise=noise, keys=keys,
      init_key=init_key, run=out, validation=validation, progress=cfg.progress,
    )  # fmt: skip
    if cfg.test:
      test_set = splits.final_test(label)  # the once-per-model read, checked each time
      test_inputs = inputs(test_set) if test_inputs is None else test_inputs
      t.entry.update(test_classifier(model, t.params, test_inputs))
    t.entry["checkpoint"] = out.save_params(label, t.params, released=noise is not None)
    t.entry["time_to_98_validation_s"] = time_to(t.history, "validation_accuracy", 0.98)
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
      "-" if (t98 := t.entry["time_to_98_validation_s"]) is None else f"{t98:.0f} s",
    ]
    for t in trained
  ]
  print(f"wrote {out.path}")
  head = ["model", score.replace("_", " "), "eps (PLD)", "eps (RDP)", "time", "98% validation"]
  print(format_table(head, rows))
  p = metrics["privacy"]
  print(f"released: epsilon {p['epsilon_pld']:.3f} (PLD) at delta {cfg.delta:g}, all models")
  return metrics


def time_to(history: Sequence[Mapping[str, Any]], key: str, level: float) -> float | None:
  """Training seconds (evaluations included) until the first epoch whose ``key`` reached
  ``level``, or None if none did: a held-out curve's time to an accuracy."""
  return next((float(h["time"]) for h in history if h.get(key, -math.inf) >= level), None)


def critic_noise(noise: Noise | None, gradient_penalty: float) -> Noise | None:
  """A GAN critic's mechanism: with a gradient penalty, engine "auto" becomes "reference"
  (the penalty's ``jax.grad`` hides the critic's layers from the fast engine, whose per-layer
  fallback then runs ~20x slower than ``vmap(grad)``; the same numbers either way)."""
  if noise is None or gradient_penalty <= 0 or noise.engine != "auto":
    return noise
  return dataclasses.replace(noise, engine="reference")


class GeneratorTrainer:
  """A GAN's generator beside its private critic (:mod:`jaxdp.models.gan`): the hooks of
  :func:`fit` that give the critic step one generated row per private row, and one generator
  step after every ``every`` critic steps. It reads only the DP critic: no privacy cost.

  Args:
    generator, critic: the Flax modules.
    params: the generator's initial parameters.
    optimizer: the generator's optimiser.
    batch_size: draws per generator step.
    every: critic steps per generator step.
    key: the generator's randomness (fakes and latent draws).
    loss: the critic's objective (:data:`jaxdp.models.gan.LOSSES`), which sets the
      generator's.
    mode_seeking: weight of the generator's mode-seeking regulariser (0: off; see
      :func:`jaxdp.models.gan.generator_update`).
  """

  def __init__(
    self,
    generator: nn.Module,
    critic: nn.Module,
    params: PyTree,
    optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    every: int,
    key: jax.Array,
    loss: str = "wasserstein",
    mode_seeking: float = 0.0,
  ) -> None:
    _validate.positive_int("every", every)
    self.generator, self.every, self.key = generator, every, key
    self.state = gan_lib.GeneratorState(params, optimizer.init(params))
    self.update = gan_lib.generator_update(
      generator, critic, optimizer, batch_size, loss, mode_seeking
    )
    self.losses: list[jax.Array] = []
    self.count = 0

  def _next_key(self) -> jax.Array:
    self.count += 1
    return jax.random.fold_in(self.key, self.count)

  def side_inputs(self, batches: list[Any]) -> list[dict[str, jax.Array]]:
    """One generated example per row of each physical batch."""
    g, params = self.generator, self.state.params
    return [gan_lib.fake_rows(g, params, self._next_key(), len(b.indices)) for b in batches]

  def after_step(self, step: int, critic_state: Any) -> None:
    """A generator step after every ``every``-th critic step."""
    if step % self.every == 0:
      self.state, loss = self.update(self.state, critic_state.params, self._next_key())
      self.losses.append(loss)

  @property
  def params(self) -> PyTree:
    """The released generator's parameters: the optimiser's parameter average when it keeps
    one (:func:`jaxdp.optim.param_ema`: post-processing, no privacy cost), else the last
    iterate."""
    average = optim.ema_params(self.state.opt_state)
    return self.state.params if average is None else average

  def epoch_loss(self, _: Any) -> dict[str, float]:
    """The mean generator loss since the last call (post-processing of the DP critic);
    nothing when the generator has not stepped since (a NaN would read as divergence)."""
    if not self.losses:
      return {}
    value = float(np.mean(jax.device_get(self.losses)))
    self.losses = []
    return {"generator_loss": value}


def pretrain_gan_on_public(
  label: str,
  generator: nn.Module,
  critic: nn.Module,
  start: tuple[PyTree, PyTree],
  public_data: Mapping[str, jax.Array],
  training: Training,
  recipe: GANSettings,
  *,
  epochs: int,
  field: str = "image",
  keys: KeySource,
  run: RunFolder | None,
  progress: bool = True,
) -> tuple[PyTree, PyTree]:
  """A GAN's starting point: critic and generator trained together WITHOUT noise on the
  PUBLIC partition only (:func:`pretrain_on_public` with the generator's hooks; no privacy
  cost). ``start`` and the result are ``(critic_params, generator_params)``; the examples'
  data is ``public_data[field]``. The generator's last iterate is returned (no average)."""
  n = int(jax.tree_util.tree_leaves(public_data)[0].shape[0])
  trainer = GeneratorTrainer(
    generator, critic, start[1], gan_lib.generator_optimizer(recipe.generator_lr),
    batch_size=min(PRETRAIN_BATCH_SIZE, n), every=recipe.critic_steps,
    key=keys.key(f"{label} public pretraining/fakes"), loss=recipe.loss,
    mode_seeking=recipe.mode_seeking,
  )  # fmt: skip
  loss = gan_lib.critic_loss(critic, gradient_penalty=recipe.penalty, key=field, loss=recipe.loss)
  critic_params = pretrain_on_public(
    label, loss, start[0], public_data, training, epochs=epochs, keys=keys, run=run,
    aux_name="wasserstein", progress=progress, side_inputs=trainer.side_inputs,
    after_step=trainer.after_step, evaluate=trainer.epoch_loss,
  )  # fmt: skip
  return critic_params, trainer.params


def fit_gan(
  label: str,
  generator: nn.Module,
  critic: nn.Module,
  start: tuple[PyTree, PyTree],
  data: Mapping[str, jax.Array],
  training: Training,
  recipe: GANSettings,
  *,
  noise: Noise | None,
  field: str = "image",
  keys: KeySource,
  run: RunFolder | None,
  progress: bool = True,
) -> tuple[Trained, PyTree]:
  """A GAN whose critic alone reads ``data`` (privately when ``noise`` is given): every
  critic step is one :func:`fit` step on per-pair losses (:func:`jaxdp.models.gan.critic_loss`
  on ``data[field]``, the penalty inside it), and after every ``recipe.critic_steps`` of them
  the generator steps through the critic (:class:`GeneratorTrainer`; post-processing).

  ``start`` is ``(critic_params, generator_params)``. Returns the trained critic (its
  ``entry`` holds ``steps`` and ``sampling_prob``: the caller's ledger charges ONE event per
  critic step and nothing for the generator) and the released generator's parameters (the
  average of its iterates with ``recipe.generator_ema``)."""
  trainer = GeneratorTrainer(
    generator, critic, start[1],
    gan_lib.generator_optimizer(recipe.generator_lr, recipe.generator_ema),
    batch_size=training.batch_size, every=recipe.critic_steps, key=keys.key(f"{label}/fakes"),
    loss=recipe.loss, mode_seeking=recipe.mode_seeking,
  )  # fmt: skip
  loss = gan_lib.critic_loss(critic, gradient_penalty=recipe.penalty, key=field, loss=recipe.loss)
  trained = fit(
    label, loss, start[0], data, training, noise=critic_noise(noise, recipe.penalty), keys=keys,
    run=run, evaluate=trainer.epoch_loss, has_aux=True, aux_name="wasserstein",
    progress=progress, side_inputs=trainer.side_inputs, after_step=trainer.after_step,
  )  # fmt: skip
  trained.entry["generator_steps"] = trained.entry["steps"] // recipe.critic_steps
  return trained, trainer.params


def train_classifier(
  label: str,
  model: nn.Module,
  train_data: Mapping[str, jax.Array],
  training: Training,
  *,
  noise: Noise | None,
  keys: KeySource,
  init_key: jax.Array,
  run: RunFolder | None = None,
  validation: Mapping[str, jax.Array] | None = None,
  split_name: str = "validation",
  select: bool = False,
  release: bool | None = None,
  progress: bool = True,
) -> Trained:
  """A classifier (softmax cross-entropy), privately or not; curves on ``validation``.

  Args:
    label: the model's name in the run.
    model: a Flax classifier ``(B, ...) -> (B, K)``.
    train_data: ``{"image": ..., "label": ...}`` device arrays (e.g. ScatterNet features).
    training: epochs, batch, optimiser.
    noise: the DP mechanism, or None.
    keys: the run's key source.
    init_key: the (public) key of the initial parameters.
    run: the run folder.
    validation: held-out ``{"image", "label"}`` arrays: per-epoch ``<split_name>_accuracy``
      and ``<split_name>_loss``.
    split_name: the name of that split in the metrics.
    select: release the epoch with the best accuracy on ``validation`` (checkpoint choice on
      the held-out split) instead of the last.
    release: see :func:`fit`.
    progress: progress bars.
  """
  params = jax.jit(model.init)(init_key, train_data["image"][:1])["params"]

  def evaluate(p: PyTree) -> dict[str, float]:
    res = evaluate_classifier(model, p, validation)
    return {f"{split_name}_accuracy": res["accuracy"], f"{split_name}_loss": res["loss"]}

  return fit(
    label,
    classifier_lib.classifier_loss(model),
    params,
    train_data,
    training,
    noise=noise,
    keys=keys,
    run=run,
    evaluate=evaluate if validation is not None else None,
    select=f"{split_name}_accuracy" if select and validation is not None else None,
    release=release,
    has_aux=True,
    progress=progress,
  )


def test_classifier(
  model: nn.Module, params: PyTree, test_data: Mapping[str, jax.Array]
) -> dict[str, Any]:
  """Test accuracy, loss and per-class accuracy of a released classifier (read once)."""
  res = evaluate_classifier(model, params, test_data)
  _, logits = classifier_outputs(model, params, test_data["image"])
  num_classes = logits.shape[-1]
  per_class = per_class_accuracy(logits, np.asarray(test_data["label"]), num_classes)
  return {
    "test_accuracy": res["accuracy"],
    "test_loss": res["loss"],
    "per_class_test_accuracy": per_class,
  }


test_classifier.__test__ = False  # a library function, not a pytest test


def public_cut(public: Any) -> int:
  """Public examples that train the public-only classifiers (90%; the rest select epochs)."""
  return max(1, round(0.9 * len(public)))


def public_only_baseline(cfg: Any, splits: Any, keys: KeySource, run: RunFolder) -> dict[str, Any]:
  """The downstream classifier trained on the public partition alone (90%, the rest for
  its epoch choice): what a generator that uses the public data (the latent route's
  autoencoder, a public pretraining) must beat to be worth its privacy cost.

  Trained as hard as the synthetic sets' classifier: the public images are repeated, each
  copy with its own random shifts, to as many rows as a synthetic set has, so that it gets
  the same epochs, steps and augmentation (10 epochs of the bare 1,800 images would be 70
  steps, an undertrained and flattering baseline). It reads no private row (released)."""
  public = splits.public
  cut = public_cut(public)
  rows = max(cut, cfg.num_samples or len(splits.private))
  label = "public-only baseline"
  result = train_on_synthetic(
    label, public.subset(np.resize(np.arange(cut), rows)),
    public.subset(np.arange(cut, len(public))), cfg,
    validation=splits.validation, test=splits.final_test(label) if cfg.test else None,
    keys=keys, init_key=jax.random.key(cfg.seed), run=run, release=True,
    progress=cfg.progress,
  )  # fmt: skip
  result.pop("history", None)
  return {"public_examples": cut, "training_rows": rows, **result}


def accuracy_scores(result: Mapping[str, Any]) -> str:
  """A classifier's test and validation accuracies (those it has), for stdout."""
  names = [s for s in ("test", "validation") if f"{s}_accuracy" in result]
  return ", ".join(f"{s} accuracy {100 * result[f'{s}_accuracy']:.2f}%" for s in names)


def train_on_synthetic(
  label: str,
  synthetic: data.Dataset,
  held_out: data.Dataset,
  settings: SyntheticSettings,
  *,
  validation: data.Dataset | None,
  test: data.Dataset | None,
  keys: KeySource,
  init_key: jax.Array,
  run: RunFolder | None = None,
  release: bool = True,
  progress: bool = True,
) -> dict[str, Any]:
  """Train on synthetic, test on real: the downstream utility of a synthetic dataset.

  An ordinary (non-private) classifier (``settings.classifier*``) is trained on
  ``synthetic`` only, each image shifted by up to ``classifier_shift`` pixels at random;
  the epoch with the best accuracy on ``held_out`` synthetic data (sampled apart from
  ``synthetic``) is kept. That model is scored on the real ``validation`` split (where
  settings are chosen) and on ``test`` (read once, for the reported number). It reads no
  private training data, so a DP synthetic set's classifier is as private as the set.

  Returns:
    ``{"model", "epochs", "selected_epoch", "held_out_accuracy", "validation_accuracy",
    "test_accuracy", "per_class_test_accuracy", "history", ...}`` (without the entries of a
    split that is None).
  """
  clf = classifier_lib.make_classifier(
    settings.classifier, num_classes=synthetic.num_classes, act=settings.classifier_activation
  )
  training = Training(
    epochs=settings.classifier_epochs,
    batch_size=min(settings.classifier_batch_size, len(synthetic)),
    lr=settings.classifier_lr,
    momentum=0.9,
    ema=0.999,
  )
  trained = train_classifier(
    label,
    clf,
    jax.device_put(data.random_shifts(synthetic, settings.classifier_shift).arrays()),
    training,
    noise=None,
    keys=keys,
    init_key=init_key,
    run=run,
    validation=jax.device_put(held_out.arrays()),
    split_name="held_out",
    select=True,
    release=release,
    progress=progress,
  )
  out = {
    "model": settings.classifier,
    "activation": settings.classifier_activation,
    "epochs": training.epochs,
    "shift_augmentation": settings.classifier_shift,
    "selected_epoch": trained.entry["selected_epoch"],
    "held_out_accuracy": trained.entry["held_out_accuracy"],
    "train_time_s": trained.entry["train_time_s"],
    "history": trained.history,
  }
  if validation is not None:
    res = evaluate_classifier(clf, trained.params, jax.device_put(validation.arrays()))
    out["validation_accuracy"] = res["accuracy"]
  if test is not None:
    out.update(test_classifier(clf, trained.params, jax.device_put(test.arrays())))
  return out


def label_proportions(
  label: str,
  splits: Splits,
  settings: SyntheticSettings,
  *,
  keys: KeySource,
  ledger: accounting.PrivacyLedger,
  run: RunFolder | None,
) -> tuple[np.ndarray | None, list[float] | None]:
  """The class proportions of a synthetic set: balanced (None; reads no private data), or
  with ``--dp-label-counts`` the Gaussian mechanism on the private label histogram (its
  noise secret), recorded in the pipeline's ``ledger`` and the run's.

  Returns:
    ``(proportions, noisy_counts)``, both None for balanced classes.
  """
  if not settings.dp_label_counts:
    return None, None
  proportions, noisy = synth.dp_label_proportions(
    splits.private.labels,
    splits.num_classes,
    settings.label_noise_multiplier,
    ledger,
    seed=keys.seed(f"{label}/label_counts"),
  )
  if run is not None:
    run.ledger.add_gaussian(f"{label}/label_counts", settings.label_noise_multiplier)
  return proportions, noisy.tolist()


def evaluate_generator(
  label: str,
  generator: synth.Generator,
  settings: SyntheticSettings,
  splits: Splits,
  *,
  proportions: np.ndarray | None,
  features: tuple[nn.Module, PyTree] | None,
  keys: KeySource,
  run: RunFolder | None,
  release: bool,
  test: bool,
  seed: int,
  progress: bool = True,
) -> tuple[dict[str, Any], data.Dataset]:
  """What follows a trained generator: sample, release, train on synthetic, FID / IS.

  Samples ``num_samples`` labelled images (class proportions ``proportions``, None for
  balanced; latents from the run's secret keys) and a held-out ``held_out_fraction`` more;
  writes the set to the run folder (released, or under ``nondp/``); trains on it and tests
  on real data (:func:`train_on_synthetic`); and scores it with the feature network against
  the test set (``test``) or the validation split. All of it is post-processing of the
  generator and ``proportions``: no privacy cost.

  Returns:
    ``(entry, synthetic)``: the measurements and the released synthetic set.
  """
  num = settings.num_samples or len(splits.private)
  held = max(1, round(settings.held_out_fraction * num))
  pool = synth.sample_dataset(
    generator,
    num + held,
    splits.num_classes,
    keys.key(f"{label}/sample"),
    proportions=proportions,
    seed=seed,
    name=f"synthetic/{slug(label)}",
  )
  # A diverged generator's non-finite pixels become 0, so that its numbers can be measured
  # (and show it); ``nonfinite_samples`` is the fraction of images that had any.
  finite = np.isfinite(pool.images).reshape(len(pool), -1).all(axis=1)
  if not finite.all():
    pool = dataclasses.replace(pool, images=np.nan_to_num(pool.images, nan=0.0, posinf=1.0))
  synthetic, held_out = pool.subset(np.arange(num)), pool.subset(np.arange(num, num + held))
  entry: dict[str, Any] = {"num_samples": num, "held_out_samples": held}
  entry["nonfinite_samples"] = float(1.0 - finite.mean())
  if run is not None:
    entry["synthetic_npz"] = run.save_dataset(label, synthetic, released=release)
  test_set = splits.final_test(label) if test else None
  entry["downstream"] = train_on_synthetic(
    f"{label} downstream",
    synthetic,
    held_out,
    settings,
    validation=splits.validation,
    test=test_set,
    keys=keys,
    init_key=jax.random.key(seed),
    run=run,
    release=release,
    progress=progress,
  )
  reference = test_set if test_set is not None else splits.validation
  if features is not None and reference is not None:
    entry.update(fid_is(features, reference, synthetic))
  return entry, synthetic


class SyntheticPipeline(NamedTuple):
  """One synthetic-data pipeline's privacy before its generator trains
  (:meth:`SyntheticRelease.start`)."""

  ledger: accounting.PrivacyLedger
  proportions: np.ndarray | None
  noisy_counts: list[float] | None
  noise: Noise | None


@dataclasses.dataclass
class SyntheticRelease:
  """The pipelines of a synthetic-data run, collected and then released together.

  Each :meth:`add` takes a pipeline's measurements, its own ledger (its epsilons, PLD and
  RDP, are that ledger's) and its synthetic set (a grid of it). :meth:`finish` draws the
  released grid (real test images, then the DP pipelines: a training image is never shown),
  and, when there are non-DP pipelines, a grid of all of them under ``nondp/``; writes
  ``metrics.json`` (the DP pipelines; ``privacy`` composes them through the run's ledger)
  and ``nondp/metrics.json``; prints the table.
  """

  run: RunFolder
  splits: Splits
  generator: str  # the table's name for the generator, e.g. "VAE"
  images_per_class: int
  entries: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  grids: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def start(
    self, job: Job, settings: Any, *, keys: KeySource, training: Training
  ) -> SyntheticPipeline:
    """What a pipeline settles before its generator trains: its own ledger, the class
    proportions (with ``--dp-label-counts`` noisy label counts, charged to it and to the
    run's ledger) and the generator's mechanism, calibrated so that the whole pipeline meets
    ``job``'s target (None for a non-private job)."""
    ledger = accounting.PrivacyLedger()
    proportions, noisy = (None, None)
    if job.private:
      proportions, noisy = label_proportions(
        job.label, self.splits, settings, keys=keys, ledger=ledger, run=self.run
      )
    n = len(self.splits.private)
    noise = calibrate(job, settings, num_examples=n, training=training, ledger=ledger)
    return SyntheticPipeline(ledger, proportions, noisy, noise)

  def add(
    self,
    entry: dict[str, Any],
    ledger: accounting.PrivacyLedger,
    synthetic: data.Dataset,
    delta: float,
  ) -> dict[str, Any]:
    """Records one pipeline (``entry`` needs ``label`` and ``private``); returns the entry
    with its epsilons and ledger."""
    for acc in accounting.ACCOUNTANTS:
      entry[f"epsilon_{acc}"] = ledger.epsilon(delta, acc) if entry["private"] else math.inf
    entry["ledger"] = ledger.to_dict()
    eps = f"eps = {entry['epsilon_pld']:.2f}" if entry["private"] else "no DP"
    k = self.splits.num_classes
    grid = class_grid(synthetic.images, synthetic.labels, k, self.images_per_class)
    self.grids[f"{entry['label']}\n{eps}"] = grid
    self.entries.append(entry)
    return entry

  def finish(
    self,
    metrics: Mapping[str, Any],
    title: str,
    public_baseline: Mapping[str, Any] | None = None,
  ) -> dict[str, Any]:
    """Grids, ``metrics.json`` (``metrics`` plus ``pipelines``, and
    ``public_only_baseline`` when given: :func:`public_only_baseline`, for generators that
    used the public partition) and the printed table (the baseline's line after it)."""
    if public_baseline is not None:
      metrics = {**metrics, "public_only_baseline": public_baseline}
    figure = self.splits.figure_examples()
    k = self.splits.num_classes
    real = {"real (test set)": class_grid(figure.images, figure.labels, k, self.images_per_class)}
    pairs = zip(self.grids.items(), self.entries, strict=True)
    dp_grids = {name: grid for (name, grid), e in pairs if e["private"]}
    if dp_grids:
      self.run.plot_images("synthetic_grid", {**real, **dp_grids}, title=title)
    if len(dp_grids) < len(self.entries):
      self.run.plot_images("synthetic_grid", {**real, **self.grids}, released=False, title=title)
    released = [e for e in self.entries if e["private"]]
    nondp = [e for e in self.entries if not e["private"]]
    out = self.run.finish(
      {**metrics, "pipelines": released}, nondp={"pipelines": nondp} if nondp else None
    )
    print(f"wrote {self.run.path}")
    print(synthetic_table(self.entries, self.generator))
    if released:
      print(f"released: epsilon {out['privacy']['epsilon_pld']:.3f} (PLD), all DP pipelines")
    if public_baseline is not None and (scores := accuracy_scores(public_baseline)):
      print(f"public-only baseline ({len(self.splits.public)} public examples): {scores}")
    return out


# -- FID / IS ----------------------------------------------------------------------------

# The feature network's fixed recipe, so that FIDs of different runs compare.
FEATURE_NETWORK = {"model": "tf_cnn", "activation": "relu", "lr": 0.05, "batch_size": 256}


def feature_network(
  public: data.Dataset,
  *,
  epochs: int,
  cache: Path | None,
  seed: int = 0,
  progress: bool = True,
) -> tuple[nn.Module, PyTree, dict[str, Any]]:
  """The FID / IS feature classifier, trained without DP on the PUBLIC partition only.

  A fixed recipe (``FEATURE_NETWORK``) on public data: it never reads the private training
  split, so it, and the scores it gives, release nothing private. Cached in ``cache`` by its
  recipe and data (None: no cache).

  Returns:
    ``(model, params, info)``.
  """
  f = FEATURE_NETWORK
  model = classifier_lib.make_classifier(
    f["model"], num_classes=public.num_classes, act=f["activation"]
  )
  tag = (
    f"feature-net-{public.name.replace('/', '_')}-n{len(public)}-{f['model']}-{f['activation']}"
    f"-e{epochs}-b{f['batch_size']}-s{seed}"
  )
  info = {
    "model": f["model"],
    "activation": f["activation"],
    "epochs": epochs,
    "trained_on": f"{public.name}: {len(public)} public examples (never private), non-DP",
  }

  def train() -> tuple[PyTree, dict[str, Any]]:
    t0 = time.perf_counter()
    training = Training(
      epochs=epochs, batch_size=min(f["batch_size"], len(public)), lr=f["lr"], momentum=0.9,
      ema=0.999,
    )  # fmt: skip
    trained = train_classifier(
      "feature network",
      model,
      jax.device_put(public.arrays()),
      training,
      noise=None,
      keys=KeySource(insecure_seed=seed),  # public data: nothing to keep secret
      init_key=jax.random.key(seed),
      progress=progress,
    )
    return trained.params, {"train_time_s": time.perf_counter() - t0}

  template = lambda: jax.eval_shape(model.init, jax.random.key(0), public.images[:1])["params"]
  params, meta = public_model_cache(cache, tag, template, train)
  return model, params, {**info, **meta}


def public_model_cache(
  cache: Path | None,
  tag: str,
  template: Callable[[], PyTree],
  train: Callable[[], tuple[PyTree, dict[str, Any]]],
) -> tuple[PyTree, dict[str, Any]]:
  """A model trained on PUBLIC data only, kept in ``cache`` under ``tag`` (its recipe and
  data) so that later runs read it back instead of training it again.

  Only for models that never read private data (the feature network, the latent route's
  public autoencoder): the cache holds nothing private and costs no privacy.

  Args:
    cache: the folder (None: no cache, always ``train()``).
    tag: a file name naming everything the model depends on.
    template: the parameters' shapes (``jax.eval_shape``), to read the stored bytes into.
    train: trains the model: ``(params, info)``, ``info`` JSON-serialisable.

  Returns:
    ``(params, info)``, ``info["cached"]`` saying whether they were read back.
  """
  if cache is None:
    params, info = train()
    return params, {**info, "cached": False}
  weights, meta = cache / f"{tag}.msgpack", cache / f"{tag}.json"
  cache.mkdir(parents=True, exist_ok=True)
  # Locked, so that runs side by side (a study's parallel cells) train the model once: the
  # second waits, then reads it back.
  with _file_lock(cache / f"{tag}.lock"):
    if weights.is_file() and meta.is_file():
      params = serialization.from_bytes(template(), weights.read_bytes())
      return params, {**json.loads(meta.read_text()), "cached": True}
    params, info = train()
    # Written through temporaries so that a killed run never leaves a half-written model.
    for path, payload in ((weights, serialization.to_bytes(params)),
                          (meta, (json.dumps(info) + "\n").encode())):  # fmt: skip
      tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
      tmp.write_bytes(payload)
      tmp.replace(path)
  return params, {**info, "cached": False}


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
  """An exclusive advisory lock on ``path`` between processes (``fcntl.flock``; a no-op
  where there is no ``fcntl``). Released when the file is closed, also when a process dies."""
  with path.open("a") as handle:
    if fcntl is not None:
      fcntl.flock(handle, fcntl.LOCK_EX)
    yield


def run_feature_network(
  cfg: Any, splits: Splits
) -> tuple[tuple[nn.Module, PyTree] | None, dict[str, Any] | None]:
  """The run's feature network (:func:`feature_network` on the public partition, cached in
  ``<out>/_cache``) and its description; ``(None, None)`` without a public partition."""
  if splits.public is None:
    return None, None
  *features, info = feature_network(
    splits.public,
    epochs=cfg.feature_epochs,
    cache=Path(cfg.out) / "_cache",
    seed=cfg.seed,
    progress=cfg.progress,
  )
  return tuple(features), info


def fid_is(
  features: tuple[nn.Module, PyTree], reference: data.Dataset, synthetic: data.Dataset
) -> dict[str, float]:
  """Feature-network FID of ``synthetic`` against ``reference``, IS of both, and the mode
  coverage of ``synthetic`` (:func:`jaxdp.metrics.feature_scores`; not Inception FID / IS)."""
  scores = feature_scores(
    *features, reference.images, synthetic.images, reference_labels=reference.labels,
    labels=synthetic.labels,
  )  # fmt: skip
  scores["inception_score_real"] = scores.pop("inception_score_reference")
  return scores


def synthetic_table(entries: list[dict[str, Any]], generator: str) -> str:
  """The summary table of a synthetic-data run: downstream test and validation accuracy,
  FID, IS, the pipeline's epsilon and the generator's training time, one row per pipeline."""
  pct = lambda x: "-" if x is None else f"{100 * x:.2f}%"
  rows = [
    [
      e["label"],
      pct(e["downstream"].get("test_accuracy")),
      pct(e["downstream"].get("validation_accuracy")),
      f"{e.get('fid', math.nan):.2f}",
      f"{e.get('inception_score', math.nan):.2f}",
      f"{e['epsilon_pld']:.3f}",
      f"{e['train_time_s']:.0f} s",
    ]
    for e in entries
  ]
  head = [generator, "downstream test", "validation", "FID", "IS", "eps (PLD)", "train time"]
  return format_table(head, rows)
