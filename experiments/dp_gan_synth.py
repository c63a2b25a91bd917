"""A private class-conditional GAN (critic trained with DP-SGD) that releases a labelled
synthetic MNIST to train on.

    python experiments/dp_gan_synth.py                          # DP-GAN at eps = 10
    python experiments/dp_gan_synth.py --quick                  # a smoke run, minutes on a CPU
    python experiments/dp_gan_synth.py --epsilons 0.8,3,8       # one grid per epsilon
    python experiments/dp_gan_synth.py --loss wasserstein       # WGAN-GP
    python experiments/dp_gan_synth.py --loss wasserstein --gradient-penalty 0 --weight-clip 0.2
    python experiments/dp_gan_synth.py --public-pretrain-epochs 200  # start from the public split

For each privacy level: (1) class proportions (balanced, or ``--dp-label-counts``); (2) the
critic (:class:`jaxdp.models.gan.ImageCritic`) trained through the one jaxdp step on the
per-example loss that pairs each private example with one generated example
(:func:`jaxdp.models.gan.critic_loss`, gradient penalty inside it); every critic step is one
accounted Poisson-sampled Gaussian mechanism, and after every ``--critic-steps`` of them the
generator takes one step through the DP critic (post-processing, no privacy cost); (3) the
released generator's labelled synthetic set, train on synthetic / test on real, and
feature-network FID / IS, as for the DP-VAE. With ``--public-pretrain-epochs`` the critic
and the generator first train without noise on the PUBLIC partition (never a private row;
no privacy cost), and every private pipeline starts from them.

References:
  Arjovsky, Chintala, Bottou, "Wasserstein GAN", ICML 2017. arXiv:1701.07875
  Gulrajani et al., "Improved Training of Wasserstein GANs", NeurIPS 2017. arXiv:1704.00028
  Xie et al., "Differentially Private Generative Adversarial Network", 2018. arXiv:1802.06739
  Bie, Kamath, Zhang, "Private GANs, Revisited", TMLR 2023. arXiv:2302.02936
"""

from __future__ import annotations

# jaxdp first: its CPU settings (malloc, XLA flags) must act before numpy and JAX start threads.
import jaxdp  # noqa: F401

# isort: split
import dataclasses
import functools
import sys
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
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
from jaxdp.models import gan
from jaxdp.plots import plot_curves


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(DataSettings, PrivacySettings, SyntheticSettings, GANSettings, RunSettings):
  """Everything a run depends on; the flags, written to ``config.json``."""

  DEFAULT_EPSILON: ClassVar[float] = 10.0
  PRESETS: ClassVar = {
    "quick": dict(epochs=3, batch_size=256, train_size=6000, validation_size=1000,
                  public_size=1000, classifier_epochs=3, feature_epochs=2, num_samples=6000),
  }  # fmt: skip

  out: str = option("runs/dp_gan_synth", "parent folder of the run folder")
  public_size: int = option(2000, "training examples set apart as public (FID network)")
  dp: bool = option(True, "train the critic with DP (--no-dp: without; results go to nondp/)")
  epochs: int = option(20, "critic epochs (round(1/q) critic steps each)", check="positive_int")
  batch_size: int = option(512, "expected (Poisson) batch size of a critic step",
                           check="positive_int")  # fmt: skip
  lr: float = option(1e-3, "critic Adam learning rate", check="positive")
  clip: float = option(1.0, "L2 clip norm of each pair's gradient", check="positive")
  latent_dim: int = option(32, "generator latent dimension", check="positive_int")
  generator_width: int = option(64, "generator channels", check="positive_int")
  critic_width: int = option(16, "critic channels of its first conv", check="positive_int")
  critic_hidden: int = option(
    128, "units of the critic's Dense layer after its convs (0: none)", check="non_negative_int"
  )
  public_pretrain_epochs: int = option(
    0, "epochs of the critic and the generator on the PUBLIC partition before the private "
    "ones (0: off; no privacy cost)", check="non_negative_int",
  )  # fmt: skip

  def check(self) -> None:
    if not self.dp and (self.noise_multiplier or self.target_epsilon or self.epsilons):
      raise ValueError("--no-dp takes no --noise-multiplier, --target-epsilon or --epsilons")
    if self.public_pretrain_epochs and self.public_size < 1:
      raise ValueError("--public-pretrain-epochs needs a public partition (--public-size >= 1)")


def run(cfg: Config) -> dict[str, Any]:
  """Runs the pipelines of ``cfg``, writes the run folder and returns its metrics."""
  splits = tasks.load_data(cfg)
  private, k = splits.private, splits.num_classes
  n = len(private)
  generator = gan.ImageGenerator(private.image_shape, k, cfg.latent_dim, cfg.generator_width)
  critic = gan.ImageCritic(
    k, cfg.critic_width, cfg.critic_activation, cfg.critic_hidden, gan.class_bias_for(cfg.loss)
  )
  key = jax.random.key(cfg.seed)  # public: initialisation
  z, y = np.zeros((1, cfg.latent_dim), np.float32), np.zeros((1,), np.int32)
  try:
    init_g = jax.jit(lambda: generator.init(key, z, y)["params"])
    init_c = jax.jit(lambda: critic.init(key, private.images[:1])["params"])
    init_g(), init_c()
  except (ValueError, TypeError) as err:
    raise cli.UsageError(f"--dataset: the GAN needs images whose sides divide by 4: {err}") from err
  training = tasks.Training(
    epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, optimizer="adam",
    weight_clip=cfg.weight_clip, **cfg.step_options(),
  )  # fmt: skip
  jobs = cfg.jobs("DP") if cfg.dp else [Job("non-private", False)]
  out = RunFolder.start(cfg, "sweep" if len(jobs) > 1 else jobs[0].label.replace(" ", "-"))
  keys = cfg.key_source()
  features, feature_info = tasks.run_feature_network(cfg, splits)
  name = cfg.gan_name
  release = tasks.SyntheticRelease(out, splits, name, cfg.images_per_class)
  start = init_c(), init_g()
  if cfg.public_pretrain_epochs:  # public only: one starting point for every pipeline
    start = tasks.pretrain_gan_on_public(
      name, generator, critic, start, jax.device_put(splits.public.arrays()), training, cfg,
      epochs=cfg.public_pretrain_epochs, keys=keys, run=out, progress=cfg.progress,
    )  # fmt: skip

  for job in jobs:
    ledger, proportions, noisy, noise = release.start(job, cfg, keys=keys, training=training)
    trained, generator_params = tasks.fit_gan(
      job.label, generator, critic, start, jax.device_put(private.arrays()), training, cfg,
      noise=noise, keys=keys, run=out, progress=cfg.progress,
    )  # fmt: skip
    if noise is not None:  # one event per critic step; the generator's steps cost nothing
      ledger.add_dpsgd(
        "critic", trained.entry["sampling_prob"], noise.noise_multiplier, trained.entry["steps"]
      )
    entry: dict[str, Any] = {"label": job.label, "private": job.private, "noisy_counts": noisy}
    entry.update(critic=trained.entry, history=trained.history)
    entry["generator_steps"] = trained.entry["generator_steps"]
    entry["train_time_s"] = trained.entry["train_time_s"]
    entry["generator_checkpoint"] = out.save_params(
      job.label, generator_params, released=job.private
    )
    result, synthetic = tasks.evaluate_generator(
      job.label, functools.partial(gan.sample, generator, generator_params), cfg, splits,
      proportions=proportions, features=features, keys=keys, run=out, release=job.private,
      test=cfg.test, seed=cfg.seed, progress=cfg.progress,
    )  # fmt: skip
    release.add({**entry, **result}, ledger, synthetic, cfg.delta)

  curves = {e["label"]: e["history"] for e in release.entries if e["private"]}
  if curves:
    plot_curves(curves, out.file("plots/generator_loss.png"), metrics=("loss",),
                splits=("generator",))  # fmt: skip
  title = f"{cfg.dataset}: {name} samples per class, delta = {cfg.delta:g}"
  info = {"dataset": cfg.dataset, "num_private": n, "feature_network": feature_info}
  baseline = None  # the generator used the public data: what it alone gives, beside it
  if cfg.public_pretrain_epochs:
    baseline = tasks.public_only_baseline(cfg, splits, keys, out)
  return release.finish(info, title, baseline)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Command-line entry: parses ``argv`` (default ``sys.argv[1:]``), runs, returns metrics."""
  return cli.main(Config, run, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
  main(sys.argv[1:])
