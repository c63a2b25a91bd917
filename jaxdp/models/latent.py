"""The latent-space route to private synthetic images: a PUBLIC autoencoder, and a private
class-conditional generator of its latent codes.

DPMI-style (arXiv:2201.03139, the pretrained feature-extractor variant): an autoencoder
trained on public images maps each private image to a code ``c = E(x)`` (or, as an option,
to the code that the public decoder maps closest to ``x``, :func:`invert`); a private
generator learns the codes and their labels through the one jaxdp step; its samples are
decoded by the public decoder. Each private example enters only through its own code, a
fixed public function of it, so the private generator's DP guarantee is the pipeline's.

- :class:`Autoencoder`: strided convs to a ``code_dim`` code and back (``variational=True``:
  the encoder gives a Gaussian, the loss adds its KL to N(0, I));
- :class:`LatentVAE`: a class-conditional MLP VAE on codes, Gaussian likelihood
  (:func:`latent_vae_loss`, :func:`sample_codes`); the latent GAN uses
  :mod:`jaxdp.models.gan`'s vector generator and critic.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxdp._chunks import map_chunks
from jaxdp.conv import conv_general_dilated as space_to_depth_conv
from jaxdp.conv import upsample_conv
from jaxdp.models import classifier

PyTree = Any


class Autoencoder(nn.Module):
  """Images in [0, 1] <-> codes of ``code_dim``: two stride-2 4x4 convs and a Dense; the
  decoder mirrors it with nearest-neighbour upsampling and 3x3 convs, sigmoid output."""

  image_shape: tuple[int, int, int] = (28, 28, 1)
  code_dim: int = 32
  width: int = 32
  variational: bool = False

  def setup(self) -> None:
    conv = functools.partial(nn.Conv, conv_general_dilated=space_to_depth_conv)
    self.enc1 = conv(self.width, (4, 4), strides=2)
    self.enc2 = conv(2 * self.width, (4, 4), strides=2)
    self.enc_out = nn.Dense(2 * self.code_dim if self.variational else self.code_dim)
    h, w, _ = self.image_shape
    self.dec_in = nn.Dense((h // 4) * (w // 4) * 2 * self.width)
    # Each upsamples its input 2x (nearest) first, in the sub-pixel form of
    # jaxdp.conv.upsample_conv (the same layer and numbers, half the multiply-adds).
    self.dec1 = nn.Conv(self.width, (3, 3), conv_general_dilated=upsample_conv)
    self.dec2 = nn.Conv(self.width, (3, 3), conv_general_dilated=upsample_conv)
    self.dec_out = nn.Conv(self.image_shape[-1], (3, 3), conv_general_dilated=space_to_depth_conv)

  def encode(self, x: jax.Array) -> jax.Array:
    """The code (the Gaussian's mean for the variational variant) of each image."""
    return self._stats(x)[0]

  def _stats(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    x = nn.elu(self.enc1(x))
    x = nn.elu(self.enc2(x))
    out = self.enc_out(x.reshape(x.shape[0], -1))
    if not self.variational:
      return out, None
    return out[:, : self.code_dim], out[:, self.code_dim :]

  def decode_logits(self, c: jax.Array) -> jax.Array:
    """Pre-sigmoid images of codes ``c``."""
    h, w, _ = self.image_shape
    x = nn.elu(self.dec_in(c)).reshape(c.shape[0], h // 4, w // 4, 2 * self.width)
    for layer in (self.dec1, self.dec2):
      x = nn.elu(layer(x))
    return self.dec_out(x)

  def decode(self, c: jax.Array) -> jax.Array:
    """Images in [0, 1] of codes ``c``."""
    return jax.nn.sigmoid(self.decode_logits(c))

  def __call__(self, x: jax.Array, key: jax.Array | None = None):
    """``(reconstruction logits, KL)`` of a batch; KL is 0 for the plain autoencoder."""
    mean, log_var = self._stats(x)
    if log_var is None:
      return self.decode_logits(mean), jnp.zeros(x.shape[0])
    c = mean + jnp.exp(0.5 * log_var) * jax.random.normal(key, mean.shape)
    kl = 0.5 * jnp.sum(jnp.exp(log_var) + mean**2 - 1.0 - log_var, axis=-1)
    return self.decode_logits(c), kl


def autoencoder_loss(model: Autoencoder, beta: float = 1.0):
  """Per-example loss ``(BCE(x, D(E(x))) + beta KL, {"reconstruction": BCE})``."""

  def loss(params: PyTree, ex: dict[str, jax.Array], rng: jax.Array):
    logits, kl = model.apply({"params": params}, ex["image"][None], rng)
    bce = jnp.sum(optax.sigmoid_binary_cross_entropy(logits[0], ex["image"]))
    return bce + beta * kl[0], {"reconstruction": bce}

  return loss


@functools.partial(jax.jit, static_argnums=0)
def _encode(model: Autoencoder, params: PyTree, x: jax.Array) -> jax.Array:
  return model.apply({"params": params}, x, method=Autoencoder.encode)


@functools.partial(jax.jit, static_argnums=0)
def _decode(model: Autoencoder, params: PyTree, c: jax.Array) -> jax.Array:
  return model.apply({"params": params}, c, method=Autoencoder.decode)


def encode(model: Autoencoder, params: PyTree, images: Any, chunk: int = 1000) -> jax.Array:
  """The codes of ``images``, each a function of its own image only."""
  return map_chunks(lambda x: _encode(model, params, x), (jnp.asarray(images),), chunk)


def decode(model: Autoencoder, params: PyTree, codes: Any, chunk: int = 1000) -> jax.Array:
  """Images in [0, 1] of ``codes``."""
  return map_chunks(lambda c: _decode(model, params, c), (jnp.asarray(codes),), chunk)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _invert(model: Autoencoder, params: PyTree, x: jax.Array, steps: int, lr: float):
  def recon(c):  # per-example sums: the codes of different images do not interact
    logits = model.apply({"params": params}, c, method=Autoencoder.decode_logits)
    return jnp.sum(optax.sigmoid_binary_cross_entropy(logits, x))

  opt = optax.adam(lr)
  c0 = model.apply({"params": params}, x, method=Autoencoder.encode)

  def body(_, carry):
    c, state = carry
    updates, state = opt.update(jax.grad(recon)(c), state, c)
    return optax.apply_updates(c, updates), state

  return jax.lax.fori_loop(0, steps, body, (c0, opt.init(c0)))[0]


def invert(
  model: Autoencoder,
  params: PyTree,
  images: Any,
  *,
  steps: int = 100,
  lr: float = 0.05,
  chunk: int = 1000,
) -> jax.Array:
  """Codes by gradient-descent inversion of the public decoder: from the encoder's code,
  ``steps`` Adam steps on each image's own reconstruction loss (the total loss is a sum of
  per-image terms, so each code depends on its own image only)."""
  fn = lambda x: _invert(model, params, x, steps, lr)
  return map_chunks(fn, (jnp.asarray(images),), chunk)


class LatentVAE(nn.Module):
  """A class-conditional VAE on code vectors: MLP encoder ``(c, y) -> q(z)``, MLP decoder
  ``(z, y) -> `` the mean of a Gaussian with a learned per-dimension scale."""

  code_dim: int
  num_classes: int = 10
  latent_dim: int = 16
  hidden: tuple[int, ...] = (256, 256)
  activation: str = "elu"  # any of jaxdp.models.classifier.ACTIVATIONS

  def setup(self) -> None:
    self.enc = [nn.Dense(w) for w in self.hidden]
    self.enc_out = nn.Dense(2 * self.latent_dim)
    self.dec = [nn.Dense(w) for w in self.hidden]
    self.dec_out = nn.Dense(self.code_dim)
    self.log_scale = self.param("log_scale", nn.initializers.zeros, (self.code_dim,))

  def decode(self, z: jax.Array, y: jax.Array) -> jax.Array:
    act = classifier.activation(self.activation)
    x = jnp.concatenate([z, jax.nn.one_hot(y, self.num_classes)], axis=-1)
    for layer in self.dec:
      x = act(layer(x))
    return self.dec_out(x)

  def __call__(self, c: jax.Array, y: jax.Array, key: jax.Array):
    """``(decoded mean, log scale, KL)`` of a batch of codes."""
    act = classifier.activation(self.activation)
    x = jnp.concatenate([c, jax.nn.one_hot(y, self.num_classes)], axis=-1)
    for layer in self.enc:
      x = act(layer(x))
    stats = self.enc_out(x)
    mean, log_var = stats[:, : self.latent_dim], stats[:, self.latent_dim :]
    z = mean + jnp.exp(0.5 * log_var) * jax.random.normal(key, mean.shape)
    kl = 0.5 * jnp.sum(jnp.exp(log_var) + mean**2 - 1.0 - log_var, axis=-1)
    return self.decode(z, y), self.log_scale, kl


def latent_vae_loss(model: LatentVAE, beta: float = 1.0):
  """Per-example negative ELBO of one (code, label): Gaussian NLL with the learned scale
  plus ``beta`` KL; aux ``{"neg_elbo": ...}``."""

  def loss(params: PyTree, ex: dict[str, jax.Array], rng: jax.Array):
    mean, log_scale, kl = model.apply({"params": params}, ex["code"][None], ex["label"][None], rng)
    z = (ex["code"] - mean[0]) * jnp.exp(-log_scale)
    nll = jnp.sum(0.5 * z**2 + log_scale + 0.5 * jnp.log(2 * jnp.pi))
    value = nll + beta * kl[0]
    return value, {"neg_elbo": nll + kl[0]}

  return loss


@functools.partial(jax.jit, static_argnums=(0, 4))
def sample_codes(
  model: LatentVAE, params: PyTree, labels: jax.Array, key: jax.Array, temperature: float = 1.0
) -> jax.Array:
  """Decoded means at ``z ~ N(0, temperature^2 I)`` for each label."""
  z = temperature * jax.random.normal(key, (labels.shape[0], model.latent_dim))
  return model.apply({"params": params}, z, labels, method=LatentVAE.decode)
