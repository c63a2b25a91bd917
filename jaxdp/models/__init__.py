"""Flax modules used by the experiments; plain Linen modules, nothing DP-specific inside."""

from jaxdp.models.classifier import DPCNN, MLP, TFPrivacyCNN, classifier_loss, make_classifier

__all__ = ["DPCNN", "MLP", "TFPrivacyCNN", "classifier_loss", "make_classifier"]
