"""Private synthetic MNIST by the latent route: a PUBLIC autoencoder, a private generator
of its latent codes (a latent VAE or a latent GAN), samples decoded by the public decoder.

    python experiments/dp_latent_synth.py                        # latent VAE at eps = 10
    python experiments/dp_latent_synth.py --generator gan        # latent GAN
    python experiments/dp_latent_synth.py --generator gan --loss wasserstein  # latent WGAN-GP
    python experiments/dp_latent_synth.py --epsilons 1,3,10      # one grid per epsilon
    python experiments/dp_latent_synth.py --quick                # a smoke run

(1) An autoencoder (``--variational-ae``: a VAE) trains without DP on the PUBLIC partition
(``--public-size`` examples of the training split, set apart before anything private is
read; :mod:`jaxdp.experiment.splits`): it costs no privacy and never sees the private split.
(2) Each private image becomes a code, by the public encoder or (``--codes inversion``) by
gradient descent on the public decoder; codes are standardised by the PUBLIC codes' mean and
spread. (3) A class-conditional generator of (code, label) trains through the one jaxdp step
(:class:`jaxdp.models.latent.LatentVAE`, or the vector GAN of :mod:`jaxdp.models.gan`, whose
critic alone reads the private codes, one accounted event per critic step); the generator
first trains without noise on the PUBLIC codes (``--public-pretrain-epochs``, free of privacy
cost), so that the private steps start from a public model.
(4) Its samples, decoded, make the labelled synthetic set: train on synthetic / test on real,
FID / IS, grids, as for the DP-VAE. Beside it, the honest baseline: the same classifier
trained on the public partition alone, for as many steps on as many (repeated, shifted)
rows as the synthetic sets' classifier.

The defaults (200 epochs on the public codes, then 40 private epochs at batch 2048;
temperature 1.3) were chosen on the validation split at eps 1 and 10
(``docs/results/latent_validation_sweep.csv``).

References:
  Chen et al., "DPMI / Differentially private data generation via mixed-type
  inversion", 2022. arXiv:2201.03139 (the pretrained feature-extractor variant)
  Dockhorn et al., "Differentially Private Diffusion Models", TMLR 2023. arXiv:2210.09929
"""

from __future__ import annotations

# jaxdp first: its CPU settings (malloc, XLA flags) must act before numpy and JAX start threads.
import jaxdp  # noqa: F401

# isort: split
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxdp.experiment import cli, tasks
from jaxdp.experiment.cli import option
from jaxdp.experiment.runs import RunFolder
from jaxdp.experiment.settings import (
  DataSettings,
  GANSettings,
  Job,
  PrivacySettings,
  RunSettings,
  SyntheticSettings,
)
from jaxdp.models import gan, latent
from jaxdp.models.classifier import ACTIVATIONS
from jaxdp.plots import plot_curves


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(DataSettings, PrivacySettings, SyntheticSettings, GANSettings, RunSettings):
  """Everything a run depends on; the flags, written to ``config.json``."""

  DEFAULT_EPSILON: ClassVar[float] = 10.0
  PRESETS: ClassVar = {
    "quick": dict(epochs=4, ae_epochs=4, train_size=6000, validation_size=1000,
                  public_size=1000, classifier_epochs=3, feature_epochs=2, num_samples=6000,
                  public_pretrain_epochs=10),
  }  # fmt: skip

  out: str = option("runs/dp_latent_synth", "parent folder of the run folder")
  public_size: int = option(2000, "training examples set apart as public: the autoencoder's")
  dp: bool = option(True, "train the generator with DP (--no-dp: without; results in nondp/)")
  generator: str = option("vae", "private generator of the codes", choices=("vae", "gan"))
  code_dim: int = option(32, "autoencoder code dimension", check="positive_int")
  ae_width: int = option(32, "autoencoder channels", check="positive_int")
  variational_ae: bool = option(False, "a VAE instead of a plain autoencoder")
  ae_beta: float = option(1.0, "KL weight of the variational autoencoder", check="positive")
  ae_epochs: int = option(60, "autoencoder epochs (public data)", check="positive_int")
  ae_batch_size: int = option(128, "autoencoder batch size", check="positive_int")
  ae_lr: float = option(2e-3, "autoencoder Adam learning rate", check="positive")
  codes: str = option("encoder", "private codes from", choices=("encoder", "inversion"))
  inversion_steps: int = option(100, "Adam steps of the inversion", check="positive_int")
  epochs: int = option(40, "generator epochs (round(1/q) private steps each)",
                       check="positive_int")  # fmt: skip
  batch_size: int = option(2048, "expected (Poisson) batch size", check="positive_int")
  lr: float = option(2e-3, "generator (latent VAE) / critic Adam learning rate",
                     check="positive")  # fmt: skip
  ema: float = option(
    0.99, "latent VAE: decay of its released parameter average (0: off)", check="decay"
  )
  clip: float = option(1.0, "L2 clip norm of each example's gradient", check="positive")
  latent_dim: int = option(16, "the generator's own latent dimension", check="positive_int")
  hidden: tuple[int, ...] = option((256, 256), "the generator's (and critic's) MLP widths",
                                   check="positive_ints")  # fmt: skip
  activation: str = option("elu", "the latent VAE's activation (the latent GAN's critic: "
                           "--critic-activation)", choices=tuple(ACTIVATIONS))  # fmt: skip
  temperature: float = option(1.3, "latent VAE sampling temperature", check="positive")
  mode_seeking: float = option(
    3.0,
    "latent GAN: weight of its generator's mode-seeking term (MSGAN; no privacy cost; 0: "
    "off; 3 chosen on validation at eps 10, the image GAN keeps 1)",
  )
  public_pretrain_epochs: int = option(
    200, "epochs of the generator (a GAN: with its critic) on the PUBLIC codes before the "
    "private ones (0: off)",
    check="non_negative_int",
  )  # fmt: skip

  def check(self) -> None:
    if not self.dp and (self.noise_multiplier or self.target_epsilon or self.epsilons):
      raise ValueError("--no-dp takes no --noise-multiplier, --target-epsilon or --epsilons")
    if self.public_size < 1:
      raise ValueError("--public-size must be >= 1: the autoencoder trains on public data")


def public_autoencoder(cfg: Config, splits: Any, keys: Any, out: RunFolder):
  """The autoencoder trained (without DP) on the public partition only; its parameters, the
  public codes' mean and spread, and the public codes themselves."""
  public = splits.public
  ae = latent.Autoencoder(public.image_shape, cfg.code_dim, cfg.ae_width, cfg.variational_ae)
  key = jax.random.key(cfg.seed)
  init = lambda: ae.init(key, public.images[:1], key)["params"]

  def train() -> tuple[Any, dict[str, Any]]:
    training = tasks.Training(
      epochs=cfg.ae_epochs, batch_size=min(cfg.ae_batch_size, len(public)), lr=cfg.ae_lr,
      optimizer="adam", **cfg.step_options(),
    )  # fmt: skip
    trained = tasks.fit(
      "public autoencoder", latent.autoencoder_loss(ae, cfg.ae_beta), jax.jit(init)(),
      jax.device_put(public.arrays()), training, noise=None, keys=keys, run=out, release=True,
      has_aux=True, aux_name="reconstruction", progress=cfg.progress,
    )  # fmt: skip
    return trained.params, trained.entry

  # Public data only: kept beside the feature network and reused by later runs (a study's
  # cells) with the same recipe.
  tag = (f"autoencoder-{public.name.replace('/', '_')}-n{len(public)}-c{cfg.code_dim}"
         f"-w{cfg.ae_width}-v{int(cfg.variational_ae)}-b{cfg.ae_beta:g}-e{cfg.ae_epochs}"
         f"-bs{cfg.ae_batch_size}-lr{cfg.ae_lr:g}-s{cfg.seed}")  # fmt: skip
  params, entry = tasks.public_model_cache(
    Path(cfg.out) / "_cache", tag, lambda: jax.eval_shape(init), train
  )
  codes = latent.encode(ae, params, public.images)
  mean, spread = jnp.mean(codes, axis=0), jnp.std(codes, axis=0) + 1e-6
  info = {"trained_on": f"{len(public)} public examples, non-DP", **entry}
  return ae, params, mean, spread, codes, info


def run(cfg: Config) -> dict[str, Any]:
  """Runs the pipelines of ``cfg``, writes the run folder and returns its metrics."""
  splits = tasks.load_data(cfg)
  if splits.public is None:
    raise cli.UsageError("--public-size: the latent route needs a public partition")
  private, k = splits.private, splits.num_classes
  n = len(private)
  jobs = cfg.jobs("DP") if cfg.dp else [Job("non-private", False)]
  out = RunFolder.start(cfg, "sweep" if len(jobs) > 1 else jobs[0].label.replace(" ", "-"))
  keys = cfg.key_source()
  features, feature_info = tasks.run_feature_network(cfg, splits)
  ae, ae_params, mean, spread, public_codes, ae_info = public_autoencoder(cfg, splits, keys, out)
  if cfg.codes == "inversion":
    codes = latent.invert(ae, ae_params, private.images, steps=cfg.inversion_steps)
  else:
    codes = latent.encode(ae, ae_params, private.images)
  # Each private code is a public function of its own image: the generator's DP is the route's.
  data = {"code": (codes - mean) / spread, "label": jnp.asarray(private.labels)}
  public_data = {"code": (public_codes - mean) / spread, "label": jnp.asarray(splits.public.labels)}
  gan_run = cfg.generator == "gan"
  training = tasks.Training(
    epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, optimizer="adam",
    ema=0.0 if gan_run else cfg.ema, weight_clip=cfg.weight_clip if gan_run else None,
    **cfg.step_options(),
  )  # fmt: skip
  name = f"latent {cfg.gan_name if gan_run else 'VAE'}"
  release = tasks.SyntheticRelease(out, splits, name, cfg.images_per_class)

  for job in jobs:
    # The pipeline's own ledger: noisy label counts (if asked for), then the generator.
    ledger, proportions, noisy, noise = release.start(job, cfg, keys=keys, training=training)
    trained, sample, released = train_generator(
      cfg, job.label, k, noise, data, training, keys, out, public_data
    )
    if noise is not None:
      steps = trained.entry["steps"]
      # A GAN: one event per critic step; its generator's steps cost nothing.
      ledger.add_dpsgd("critic" if gan_run else "generator", trained.entry["sampling_prob"],
                       noise.noise_multiplier, steps)  # fmt: skip
    entry: dict[str, Any] = {"label": job.label, "private": job.private, "noisy_counts": noisy}
    entry.update(generator=trained.entry, history=trained.history)
    entry["train_time_s"] = trained.entry["train_time_s"]
    entry["generator_checkpoint"] = out.save_params(job.label, released, released=job.private)

    def images(labels: np.ndarray, key: jax.Array, sample=sample) -> jax.Array:
      return latent.decode(ae, ae_params, sample(labels, key) * spread + mean)

    result, synthetic = tasks.evaluate_generator(
      job.label, images, cfg, splits, proportions=proportions, features=features, keys=keys,
      run=out, release=job.private, test=cfg.test, seed=cfg.seed, progress=cfg.progress,
    )  # fmt: skip
    entry["downstream_with_public"] = with_public(cfg, job.label, synthetic, splits, keys, out,
                                                  job.private)  # fmt: skip
    release.add({**entry, **result}, ledger, synthetic, cfg.delta)

  baseline = tasks.public_only_baseline(cfg, splits, keys, out)
  curves = {e["label"]: e["history"] for e in release.entries if e["private"]}
  if curves and cfg.generator == "gan":
    plot_curves(curves, out.file("plots/generator_loss.png"), metrics=("loss",),
                splits=("generator",))  # fmt: skip
  title = f"{cfg.dataset}: {name} samples per class, delta = {cfg.delta:g}"
  info = {"dataset": cfg.dataset, "num_private": n, "feature_network": feature_info,
          "autoencoder": ae_info}  # fmt: skip
  metrics = release.finish(info, title, baseline)
  for e in release.entries:
    if scores := tasks.accuracy_scores(e["downstream_with_public"]):
      print(f"{e['label']} synthetic + public images: {scores}")
  return metrics


def train_generator(
  cfg: Config, label: str, k: int, noise: Any, data: dict[str, Any], training: Any, keys: Any,
  out: RunFolder, public_data: dict[str, Any],
) -> tuple[Any, Any, Any]:  # fmt: skip
  """The private generator of (code, label): ``(trained, sample(labels, key) -> codes,
  released parameters)`` (``k`` classes).

  With ``--public-pretrain-epochs`` the generator (the GAN's with its critic) first trains
  without noise on the PUBLIC partition's codes (``public_data``): a public starting point,
  free of privacy cost, that the private steps then adapt to the private codes."""
  key = jax.random.key(cfg.seed)  # public: initialisation
  code, y = jnp.zeros((1, cfg.code_dim)), jnp.zeros((1,), jnp.int32)
  if cfg.generator == "vae":
    model = latent.LatentVAE(cfg.code_dim, k, cfg.latent_dim, cfg.hidden, cfg.activation)
    loss = latent.latent_vae_loss(model)
    params = jax.jit(model.init)(key, code, y, key)["params"]
    if cfg.public_pretrain_epochs:
      params = tasks.pretrain_on_public(
        label, loss, params, public_data, training, epochs=cfg.public_pretrain_epochs,
        keys=keys, run=out, aux_name="neg_elbo", progress=cfg.progress,
      )  # fmt: skip
    trained = tasks.fit(
      label, loss, params, data, training, noise=noise, keys=keys, run=out, has_aux=True,
      aux_name="neg_elbo", progress=cfg.progress,
    )  # fmt: skip

    def sample(labels: Any, key: jax.Array) -> jax.Array:
      return latent.sample_codes(model, trained.params, jnp.asarray(labels), key, cfg.temperature)

    return trained, sample, trained.params
  g = gan.VectorGenerator(cfg.code_dim, k, cfg.latent_dim, cfg.hidden)
  critic = gan.VectorCritic(k, cfg.hidden, cfg.critic_activation, gan.class_bias_for(cfg.loss))
  start = (
    jax.jit(critic.init)(key, code)["params"],
    jax.jit(g.init)(key, jnp.zeros((1, cfg.latent_dim)), y)["params"],
  )
  if cfg.public_pretrain_epochs:
    start = tasks.pretrain_gan_on_public(
      label, g, critic, start, public_data, training, cfg, epochs=cfg.public_pretrain_epochs,
      field="code", keys=keys, run=out, progress=cfg.progress,
    )  # fmt: skip
  trained, params = tasks.fit_gan(
    label, g, critic, start, data, training, cfg, noise=noise, field="code", keys=keys,
    run=out, progress=cfg.progress,
  )  # fmt: skip

  def sample_gan(labels: Any, key: jax.Array) -> jax.Array:
    return gan.sample(g, params, labels, key)

  return trained, sample_gan, params


def with_public(
  cfg: Config, label: str, synthetic: Any, splits: Any, keys: Any, out: RunFolder, private: bool
) -> dict[str, Any]:  # fmt: skip
  """The downstream classifier trained on the synthetic set AND the public images it may
  use anyway: what the private generator adds over the public data alone
  (:func:`jaxdp.experiment.tasks.public_only_baseline`). Post-processing of the released set
  and public data."""
  public, cut = splits.public, tasks.public_cut(splits.public)
  train = dataclasses.replace(
    synthetic, images=np.concatenate([synthetic.images, public.images[:cut]]),
    labels=np.concatenate([synthetic.labels, public.labels[:cut]]),
    name=f"{synthetic.name}+public",
  )  # fmt: skip
  name = f"{label} + public"
  result = tasks.train_on_synthetic(
    name, train, public.subset(np.arange(cut, len(public))), cfg,
    validation=splits.validation, test=splits.final_test(name) if cfg.test else None,
    keys=keys, init_key=jax.random.key(cfg.seed), run=out, release=private,
    progress=cfg.progress,
  )  # fmt: skip
  result.pop("history", None)
  return {"training_rows": len(train), **result}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Command-line entry: parses ``argv`` (default ``sys.argv[1:]``), runs, returns metrics."""
  return cli.main(Config, run, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
  main(sys.argv[1:])
