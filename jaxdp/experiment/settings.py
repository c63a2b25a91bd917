"""The settings every experiment shares, as frozen dataclasses that are also its flags.

An experiment's config inherits the groups it needs and adds its own fields; each group
validates its fields in ``__post_init__`` with a message that names the flag:

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Config(DataSettings, PrivacySettings, RunSettings):
      epochs: int = option(30, "training epochs")

Fields that change privacy (clip, noise, delta, sampling) live in :class:`PrivacySettings`
and the training settings; :class:`RunSettings` holds what cannot (folders, progress bars,
devices and batch splitting), and the seed, which governs only what is public.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
from pathlib import Path
from typing import Any, ClassVar

from jaxdp import _validate, accounting, data, optim, parallel
from jaxdp import step as step_lib
from jaxdp.experiment.cli import flag, option
from jaxdp.keys import KeySource
from jaxdp.models import classifier as classifier_lib
from jaxdp.models import gan as gan_lib
from jaxdp.models import vae as vae_lib

__all__ = [
  "ClassifierSettings",
  "DataSettings",
  "GANSettings",
  "Job",
  "PrivacySettings",
  "RunSettings",
  "Settings",
  "StudySettings",
  "SyntheticSettings",
  "VAESettings",
]

DATASETS = (*data.DATASETS, "synthetic")
# The classifiers an experiment can train (jaxdp.experiment.tasks.make_classifier);
# scatter_cnn: Tramer & Boneh's small CNN on fixed ScatterNet features; scatter_vit: a ViT
# whose tokens are those features.
CLASSIFIERS = (*classifier_lib.MODELS, "scatter_cnn", "scatter_vit")


def _positive_ints(name: str, values: tuple[int, ...]) -> tuple[int, ...]:
  if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in values):
    raise ValueError(f"{name} must be integers >= 1, got {values}")
  return values


# The value checks a field can name in option(check=...); each raises naming the flag.
CHECKS = {
  "positive": _validate.positive,
  "positive_int": _validate.positive_int,
  "non_negative_int": _validate.non_negative_int,
  "fraction": lambda name, x: _validate.probability(name, x, high_open=True),  # (0, 1)
  "decay": lambda name, x: _validate.probability(name, x, low_open=False, high_open=True),
  "positive_ints": _positive_ints,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
  """The root of the settings groups. ``__post_init__`` checks every field's choices and
  declared check (None always passes), then runs each group's ``check`` method."""

  def __post_init__(self) -> None:
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if value is None:
        continue
      if f.metadata.get("choices"):
        _validate.one_of(flag(f.name), value, f.metadata["choices"])
      if f.metadata.get("check"):
        CHECKS[f.metadata["check"]](flag(f.name), value)
    for cls in reversed(type(self).__mro__):
      check = cls.__dict__.get("check")
      if check is not None:
        check(self)

  def derived(self) -> dict[str, Any]:
    """Settings the flags leave to a default that depends on other flags, as resolved
    (``config.json`` records them beside the flags)."""
    return {}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunSettings(Settings):
  """Where the run writes and how it shows progress; the public seed; how each step runs
  (devices, physical batches, microbatches: the same numbers up to float summation order)."""

  seed: int = option(
    0,
    "seed of everything public: initialisation, data splits, synthetic labels. The DP noise "
    "and batches never derive from it",
    check="non_negative_int",
  )
  insecure_reproducible_noise: bool = option(
    False,
    "derive the DP noise and batches from --seed (debugging and tests only: the noise is "
    "then public and the run has NO privacy guarantee)",
  )
  quick: bool = option(False, "a small smoke run, minutes on a CPU")
  out: str = option("runs", "parent folder of the run folder")
  name: str | None = option(None, "run folder name (default: time and settings)")
  progress: bool = option(True, "progress bars")
  tensorboard: bool = option(False, "also write TensorBoard event files")
  checkpoint_every: int = option(
    0,
    "save each model's state every N epochs under nondp/resume/ (0: off; secret, deleted "
    "when the run completes)",
    check="non_negative_int",
  )
  resume: str | None = option(
    None, "continue the run in this folder from its checkpoints (give the run's flags)"
  )
  devices: int | None = option(
    None,
    "devices each step's rows are split over, one all-reduce, noise once (default: all)",
    check="positive_int",
  )
  microbatch_size: int | str | None = option(
    "auto",
    "rows per sequential microbatch inside the jitted step (same numbers, less memory): "
    "auto, none or an integer",
    parse=lambda text: step_lib.parse_microbatch_size(text, "--microbatch-size"),
  )
  physical_batch: int | None = option(
    None,
    "rows per physical batch of a logical (Poisson) batch: a larger logical batch runs as "
    "several whose clipped sums add up before the one noise draw (default: mean + 4 std)",
    check="positive_int",
  )

  def check(self) -> None:
    step_lib.check_microbatch_size(self.microbatch_size, flag("microbatch_size"))
    if self.devices is not None:
      parallel.resolve_devices(self.devices, flag("devices"))
    if self.name is not None and (not self.name or "/" in self.name or self.name in (".", "..")):
      raise ValueError(f"--name must be a plain folder name, got {self.name!r}")

  def step_options(self) -> dict[str, Any]:
    """The :class:`jaxdp.experiment.tasks.Training` fields of how each step runs."""
    return {
      "microbatch_size": self.microbatch_size,
      "physical_batch_size": self.physical_batch,
      "devices": self.devices,
    }

  def key_source(self) -> KeySource:
    """Secret keys from the OS; from ``seed`` only with --insecure-reproducible-noise."""
    return KeySource(insecure_seed=self.seed if self.insecure_reproducible_noise else None)

  @property
  def noise_mode(self) -> str:
    """How the run's DP noise was drawn, as recorded in config.json."""
    if self.insecure_reproducible_noise:
      return "INSECURE: derived from --seed (no privacy guarantee)"
    return "secure: OS entropy, not recorded"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSettings(Settings):
  """Which data, and how its training split is partitioned (jaxdp.experiment.splits)."""

  dataset: str = option("mnist", "dataset (synthetic: a tiny learnable set)", choices=DATASETS)
  data_dir: str | None = option(
    None, f"folder with the four IDX files (else ${data.DATA_DIR_ENV}, else TFDS)"
  )
  train_size: int | None = option(
    None, "private training examples (none: all that is left)", check="positive_int"
  )
  validation_size: int = option(
    5000,
    "training examples held out for curves and choices (never trained on)",
    check="non_negative_int",
  )
  public_size: int = option(
    0, "training examples set apart as public data (never private)", check="non_negative_int"
  )
  test: bool = option(
    True, "read the test set once at the end for the reported numbers (--no-test: tuning)"
  )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClassifierSettings(Settings):
  """A private classifier's recipe, and the non-private baseline trained beside it."""

  model: str = option("scatter_cnn", "classifier", choices=CLASSIFIERS)
  # (the clip norm is PrivacySettings.clip; a script sets its default)
  activation: str = option("tanh", "activation", choices=tuple(classifier_lib.ACTIVATIONS))
  epochs: int = option(30, "private training epochs", check="positive_int")
  batch_size: int = option(1024, "expected (Poisson) batch size", check="positive_int")
  optimizer: str = option("sgd", "optimiser", choices=optim.OPTIMIZERS)
  lr: float = option(2.0, "learning rate", check="positive")
  momentum: float | None = option(0.9, "SGD momentum (none: plain SGD)", check="decay")
  ema: float = option(0.999, "decay of the released parameter average (0: off)", check="decay")
  baseline: bool = option(True, "also train the model without DP (its results go to nondp/)")
  baseline_epochs: int = option(20, "epochs of the non-private model", check="positive_int")
  baseline_batch_size: int = option(1024, "its batch size", check="positive_int")
  baseline_lr: float = option(0.05, "its learning rate", check="positive")

  def check(self) -> None:
    if self.momentum is not None and self.optimizer != "sgd":
      raise ValueError(f"--momentum applies to --optimizer sgd only, got {self.optimizer}")

  def training_options(self, private: bool) -> dict[str, Any]:
    """The :class:`jaxdp.experiment.tasks.Training` fields of the private models, or of the
    non-private baseline (without how each step runs: ``RunSettings.step_options``)."""
    return dict(
      epochs=self.epochs if private else self.baseline_epochs,
      batch_size=self.batch_size if private else self.baseline_batch_size,
      lr=self.lr if private else self.baseline_lr,
      optimizer=self.optimizer,
      momentum=self.momentum,
      ema=self.ema,
    )

  def architecture(self) -> dict[str, Any]:
    """Keyword arguments of the model beyond its activation (a script may add flags)."""
    return {}


@dataclasses.dataclass(frozen=True, kw_only=True)
class StudySettings(Settings):
  """A study's cells (jaxdp.experiment.study): their data, seeds and shared flags."""

  dataset: str = option("mnist", "dataset of every cell", choices=DATASETS)
  data_dir: str | None = option(None, "IDX folder of every cell (else $JAXDP_DATA_DIR)")
  seeds: int = option(3, "seeds per setting (0, 1, ...): the spread over seeds",
                      check="positive_int")  # fmt: skip
  delta: float = option(1e-5, "delta of every epsilon", check="fraction")
  accountant: str = option("pld", "accountant of the study's composed epsilon",
                           choices=accounting.ACCOUNTANTS)  # fmt: skip
  cell_args: str = option("", "flags added to every cell's command, e.g. '--train-size 20000'")
  parallel: int = option(1, "cells run at once, each its own process (a cell keeps about one "
                            "CPU core busy: 2 on the 2-core CPU halves the wall time)",
                         check="positive_int")  # fmt: skip
  reuse: tuple[str, ...] = option((), "other study folders whose finished cells of the same "
                                      "name and flags are copied in, not run again")  # fmt: skip

  def check(self) -> None:
    bad = [f for f in self.reuse if not (Path(f) / "cells").is_dir()]
    if bad:
      raise ValueError(f"--reuse must name study folders (with cells/ inside), got {bad}")

  def cell_flags(self) -> tuple[str, ...]:
    """The flags every cell gets: data, delta, ``cell_args``, and the run settings that
    cells inherit (``--quick``, ``--insecure-reproducible-noise``, ``--devices`` ...)."""
    out = ["--dataset", self.dataset, "--delta", repr(self.delta)]
    if self.data_dir:
      out += ["--data-dir", self.data_dir]
    for name in ("quick", "insecure_reproducible_noise", "tensorboard"):
      if getattr(self, name, False):
        out.append(flag(name))
    if getattr(self, "devices", None):
      out += ["--devices", str(self.devices)]
    return (*out, *shlex.split(self.cell_args))


@dataclasses.dataclass(frozen=True)
class Job:
  """One model of a run: private with a target epsilon or a noise multiplier, or not."""

  label: str
  private: bool
  target_epsilon: float | None = None
  noise_multiplier: float | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrivacySettings(Settings):
  """DP-SGD's settings: clip, noise (given or calibrated), delta, accountant, engine."""

  DEFAULT_EPSILON: ClassVar[float] = 3.0

  clip: float = option(1.0, "L2 clip norm of each example's gradient", check="positive")
  noise_multiplier: float | None = option(
    None, "noise std / clip; the epsilon follows from it", check="positive"
  )
  target_epsilon: float | None = option(
    None, "calibrate the noise to this epsilon (default: the experiment's)", check="positive"
  )
  epsilons: tuple[float, ...] = option(
    (), "comma-separated targets, e.g. 1,3,8 (inf: no DP): one model each, independent noise"
  )
  delta: float = option(1e-5, "delta of every epsilon (must be < 1/N)", check="fraction")
  accountant: str = option(
    "pld", "accountant that calibrates the noise (both reported)", choices=accounting.ACCOUNTANTS
  )
  engine: str = option("auto", "per-example clipping engine", choices=step_lib.ENGINES)

  def check(self) -> None:
    given = [self.noise_multiplier, self.target_epsilon, self.epsilons or None]
    if sum(g is not None for g in given) > 1:
      raise ValueError("give at most one of --noise-multiplier, --target-epsilon, --epsilons")
    if any(math.isnan(e) or e <= 0 for e in self.epsilons):
      raise ValueError(f"--epsilons must all be numbers > 0 (inf: no DP), got {self.epsilons}")

  def jobs(self, tag: str = "DP") -> list[Job]:
    """The models the privacy flags ask for, in order (``inf`` in --epsilons: no DP)."""
    if self.noise_multiplier is not None:
      s = self.noise_multiplier
      return [Job(f"{tag} sigma={s:g}", True, noise_multiplier=s)]
    targets = self.epsilons or (self.target_epsilon or self.DEFAULT_EPSILON,)
    return [
      Job("non-private", False) if math.isinf(e) else Job(f"{tag} eps={e:g}", True, e)
      for e in targets
    ]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SyntheticSettings(Settings):
  """What a synthetic-data experiment releases and measures: the sampled set, its label
  proportions, the train-on-synthetic classifier and the FID feature network (trained on
  the public partition: give ``--public-size`` > 0 for FID / IS)."""

  dp_label_counts: bool = option(False, "class proportions from noisy label counts (accounted)")
  label_noise_multiplier: float = option(
    50.0, "noise std on each label count (sensitivity 1)", check="positive"
  )
  num_samples: int | None = option(
    None, "synthetic images (none: the private set's size)", check="positive_int"
  )
  held_out_fraction: float = option(
    0.1, "extra held-out synthetic images, for selection", check="fraction"
  )
  images_per_class: int = option(5, "grid columns", check="positive_int")
  classifier: str = option(
    "tf_cnn", "classifier trained on synthetic data", choices=tuple(classifier_lib.MODELS)
  )
  classifier_activation: str = option(
    "relu", "its activation", choices=tuple(classifier_lib.ACTIVATIONS)
  )
  classifier_epochs: int = option(
    10, "its epochs (the best on held-out synthetic is kept)", check="positive_int"
  )
  classifier_batch_size: int = option(256, "its batch size", check="positive_int")
  classifier_lr: float = option(0.01, "its SGD learning rate (momentum 0.9)", check="positive")
  classifier_shift: int = option(
    1, "shift synthetic images by up to this many pixels", check="non_negative_int"
  )
  feature_epochs: int = option(
    10, "epochs of the FID feature network (public data, cached)", check="positive_int"
  )


@dataclasses.dataclass(frozen=True, kw_only=True)
class VAESettings(Settings):
  """The architecture of a :class:`jaxdp.models.vae.ConditionalVAE` and how it is sampled."""

  latent_dim: int = option(16, "latent dimension", check="positive_int")
  encoder_widths: tuple[int, ...] = option(
    (16,), "channels of the stride-2 encoder convs", check="positive_ints"
  )
  encoder_hidden: tuple[int, ...] = option(
    (), "Dense layers after the encoder convs", check="positive_ints"
  )
  decoder_hidden: tuple[int, ...] = option(
    (128,), "Dense layers before the decoder's map", check="positive_ints"
  )
  decoder_widths: tuple[int, ...] = option(
    (8,), "channels of the decoder's x2 sub-pixel maps (at least one)", check="positive_ints"
  )
  activation: str = option("tanh", "activation", choices=tuple(classifier_lib.ACTIVATIONS))
  groups: int = option(0, "GroupNorm groups (0: none)", check="non_negative_int")
  decoder: str = option("bernoulli", "pixel likelihood", choices=vae_lib.DECODERS)
  class_bias: bool = option(True, "a learned per-class output image in the decoder")
  conditioning: str = option(
    "product", "decoder input: [z, y] or [y (x) z, y]", choices=vae_lib.CONDITIONINGS
  )
  class_prior: bool = option(True, "class-conditional prior N(m_y, I) (else N(0, I))")
  temperature: float = option(1.3, "std of the latent draws when sampling", check="positive")
  pixel_temperature: float = option(
    1.0, "divides the decoder's pre-sigmoid output", check="positive"
  )

  def check(self) -> None:
    if not self.decoder_widths:
      raise ValueError("--decoder-widths must hold at least one width")

  def vae(self, image_shape: tuple[int, ...], num_classes: int) -> vae_lib.ConditionalVAE:
    """The VAE of these settings for images of ``image_shape``."""
    names = {f.name for f in dataclasses.fields(self)}
    fields = {
      f.name: getattr(self, f.name)
      for f in dataclasses.fields(vae_lib.ConditionalVAE)
      if f.name in names and f.name != "name"
    }
    return vae_lib.ConditionalVAE(
      image_shape=image_shape, num_classes=num_classes, act=self.activation, **fields
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class GANSettings(Settings):
  """A private GAN's recipe (:mod:`jaxdp.models.gan`, :func:`jaxdp.experiment.tasks.fit_gan`):
  the critic's objective, its penalty or weight clipping, and the generator that learns from
  the DP critic (post-processing: no privacy cost), for images and latent codes alike."""

  loss: str = option("logistic", "critic objective: the original GAN's cross-entropy with a "
                     "non-saturating generator (logistic), or the WGAN's (wasserstein)",
                     choices=gan_lib.LOSSES)  # fmt: skip
  gradient_penalty: float | None = option(
    None,
    "WGAN-GP weight, inside the per-example loss (0: off; default: 10 with --loss "
    "wasserstein, 0 with logistic, which needs no Lipschitz constraint)",
  )
  weight_clip: float | None = option(
    None, "keep every critic parameter in [-c, c] (the original WGAN)", check="positive"
  )
  critic_activation: str = option("leaky_relu", "critic activation",
                                  choices=gan_lib.CRITIC_ACTIVATIONS)  # fmt: skip
  critic_steps: int = option(5, "critic steps per generator step", check="positive_int")
  generator_lr: float = option(1e-3, "generator Adam learning rate (b1 0.5)", check="positive")
  mode_seeking: float = option(
    1.0,
    "weight of the generator's mode-seeking term against a class collapsing to a few "
    "samples (MSGAN; generator only, no privacy cost; 0: off)",
  )
  generator_ema: float = option(
    0.99,
    "release an exponential moving average of the generator's iterates with this decay "
    "(0: the last iterate; post-processing, no privacy cost)",
    check="decay",
  )

  def check(self) -> None:
    if self.mode_seeking < 0:
      raise ValueError(f"--mode-seeking must be >= 0, got {self.mode_seeking}")
    if self.gradient_penalty is not None and self.gradient_penalty < 0:
      raise ValueError(f"--gradient-penalty must be >= 0, got {self.gradient_penalty}")

  @property
  def penalty(self) -> float:
    """The gradient penalty's weight, its default resolved by the loss."""
    if self.gradient_penalty is not None:
      return self.gradient_penalty
    return 10.0 if self.loss == "wasserstein" else 0.0

  @property
  def gan_name(self) -> str:
    """GAN, GAN-GP, WGAN or WGAN-GP."""
    name = {"wasserstein": "WGAN", "logistic": "GAN"}[self.loss]
    return name + ("-GP" if self.penalty > 0 else "")

  def derived(self) -> dict[str, Any]:
    return {**super().derived(), "gradient_penalty_resolved": self.penalty}
