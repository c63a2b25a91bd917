"""Flax modules used by the experiments; plain Linen modules, nothing DP-specific inside."""

from jaxdp.models.classifier import DPCNN, MLP, TFPrivacyCNN, classifier_loss, make_classifier
from jaxdp.models.vae import DECODERS, ConditionalVAE, sample_images, vae_loss

__all__ = [
  "DECODERS",
  "DPCNN",
  "MLP",
  "ConditionalVAE",
  "TFPrivacyCNN",
  "classifier_loss",
  "make_classifier",
  "sample_images",
  "vae_loss",
]
