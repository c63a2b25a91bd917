"""Image classifiers for DP-SGD, and their per-example loss.

All models take a batch ``(B, H, W, C)`` and return logits ``(B, num_classes)``; none couples
examples (GroupNorm normalises within one example; BatchNorm is never used).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxdp import _validate
from jaxdp.conv import conv_general_dilated as space_to_depth_conv

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "relu": nn.relu,
  "tanh": jnp.tanh,
  "elu": nn.elu,
  "gelu": nn.gelu,
  # Tempered sigmoid with s=2, T=2, o=1 equals tanh (Papernot et al. 2021, arXiv:2007.14191).
  "tempered_sigmoid": lambda x: 2.0 * nn.sigmoid(2.0 * x) - 1.0,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """The activation called ``name`` (one of ``ACTIVATIONS``)."""
  _validate.one_of("activation", name, tuple(ACTIVATIONS))
  return ACTIVATIONS[name]


def _pool_slices(x: jax.Array, window: int, stride: int) -> list[jax.Array]:
  """Each window offset's strided slice of ``x``, in row-major order of the offsets."""
  h, w = x.shape[-3], x.shape[-2]
  oh, ow = (h - window) // stride + 1, (w - window) // stride + 1
  return [
    x[..., i : i + (oh - 1) * stride + 1 : stride, j : j + (ow - 1) * stride + 1 : stride, :]
    for i in range(window)
    for j in range(window)
  ]


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
  """Max pooling over ``window x window`` patches (VALID) of a ``(..., H, W, C)`` array.

  Same values and same derivatives as ``flax.linen.max_pool``: each window's derivative is
  that of its first maximum in row-major order. Written as a maximum of shifted slices with
  its own (linear, so transposable) JVP because XLA's CPU backend runs the backward of
  ``reduce_window`` (select-and-scatter) about 2x slower than the whole rest of the
  TF-Privacy CNN's backward pass, and the derivative of ``jnp.maximum`` splits ties with
  divisions that cost more than the pool itself.
  """
  return functools.reduce(jnp.maximum, _pool_slices(x, window, stride))


@max_pool.defjvp
def _max_pool_jvp(window: int, stride: int, primals: tuple, tangents: tuple) -> tuple:
  (x,), (dx,) = primals, tangents
  out = max_pool(x, window, stride)
  zero = jnp.zeros((), dx.dtype)
  d_out, taken = None, None
  for s, ds in zip(_pool_slices(x, window, stride), _pool_slices(dx, window, stride), strict=True):
    hit = s == out if taken is None else (s == out) & ~taken
    taken = hit if taken is None else taken | hit
    d_out = jnp.where(hit, ds, zero) if d_out is None else jnp.where(hit, ds, d_out)
  return out, d_out


class TFPrivacyCNN(nn.Module):
  """The TF-Privacy MNIST tutorial CNN (the usual DP-SGD baseline, ~26k parameters).

  conv 16@8x8 s2 SAME, maxpool 2 s1, conv 32@4x4 s2 VALID, maxpool 2 s1, dense 32, dense 10.
  """

  num_classes: int = 10
  act: str = "relu"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    f = activation(self.act)
    # Both strided convs run as stride-1 convs on space-to-depth inputs (jaxdp.conv).
    conv = functools.partial(nn.Conv, conv_general_dilated=space_to_depth_conv)
    x = f(conv(16, (8, 8), strides=2, padding="SAME")(x))
    x = max_pool(x, 2, 1)
    x = f(conv(32, (4, 4), strides=2, padding="VALID")(x))
    x = max_pool(x, 2, 1)
    x = x.reshape(x.shape[0], -1)
    x = f(nn.Dense(32)(x))
    return nn.Dense(self.num_classes)(x)


class DPCNN(nn.Module):
  """A DP-friendly CNN in the style of Tramer & Boneh (2021, arXiv:2011.11660).

  Three blocks of (conv 3x3, [GroupNorm], activation, 2x2 average pool) with widths
  ``widths``, then a dense hidden layer and the classifier. tanh and GroupNorm are the
  DP-friendly choices: bounded activations keep per-example gradients small, and
  GroupNorm normalises within one example.
  """

  num_classes: int = 10
  widths: tuple[int, ...] = (16, 32, 64)
  hidden: int = 64
  act: str = "tanh"
  groups: int = 0  # 0: no normalisation; else GroupNorm with this many groups

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    f = activation(self.act)
    for w in self.widths:
      x = nn.Conv(w, (3, 3), padding="SAME")(x)
      if self.groups:
        x = nn.GroupNorm(num_groups=min(self.groups, w))(x)
      x = f(x)
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = f(nn.Dense(self.hidden)(x))
    return nn.Dense(self.num_classes)(x)


class MLP(nn.Module):
  """A fully connected classifier on flattened images."""

  num_classes: int = 10
  hidden: tuple[int, ...] = (256, 128)
  act: str = "relu"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    f = activation(self.act)
    x = x.reshape(x.shape[0], -1)
    for h in self.hidden:
      x = f(nn.Dense(h)(x))
    return nn.Dense(self.num_classes)(x)


# -- a small Vision Transformer ----------------------------------------------------------
#
# Non-overlapping patch x patch patches, a Dense patch embedding over the tokens, learned
# position embeddings (an nn.Embed of the token positions), `depth` pre-norm blocks of
# multi-head self-attention and an MLP, LayerNorm, mean pooling over the tokens, a Dense head
# (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021, arXiv:2010.11929). Every
# parameterised layer has a fast-engine rule: the patch embedding and the attention's
# DenseGeneral projections the dense rule over the tokens, the positions the Embed rule,
# LayerNorm the norm rule. Nothing couples examples (no dropout, no BatchNorm).


def patches(x: jax.Array, size: int) -> jax.Array:
  """``(..., H, W, C)`` images as ``(..., (H/size)(W/size), size*size*C)`` token rows."""
  *lead, h, w, c = x.shape
  if h % size or w % size:
    raise ValueError(f"image sides {h}x{w} must be multiples of the patch size {size}")
  x = x.reshape(*lead, h // size, size, w // size, size, c)
  x = jnp.moveaxis(x, -4, -3)
  return x.reshape(*lead, (h // size) * (w // size), size * size * c)


class ViT(nn.Module):
  """``(B, H, W, C)`` images -> ``(B, num_classes)`` logits."""

  num_classes: int = 10
  patch: int = 7
  dim: int = 64
  depth: int = 2
  heads: int = 4
  mlp: int = 128
  act: str = "gelu"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    f = activation(self.act)
    tokens = patches(x, self.patch)
    n = tokens.shape[-2]
    h = nn.Dense(self.dim)(tokens) + nn.Embed(n, self.dim)(jnp.arange(n))
    for _ in range(self.depth):
      y = nn.LayerNorm()(h)
      h = h + nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.dim)(y)
      y = nn.LayerNorm()(h)
      h = h + nn.Dense(self.dim)(f(nn.Dense(self.mlp)(y)))
    h = nn.LayerNorm()(jnp.mean(h, axis=-2))
    return nn.Dense(self.num_classes)(h)


MODELS = {"tf_cnn": TFPrivacyCNN, "dp_cnn": DPCNN, "mlp": MLP, "vit": ViT}


def make_classifier(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
  """A classifier by name: ``tf_cnn`` (TF-Privacy tutorial), ``dp_cnn``, ``mlp`` or ``vit``
  (:class:`jaxdp.models.vit.ViT`)."""
  _validate.one_of("model", name, tuple(MODELS))
  return MODELS[name](num_classes=num_classes, **kwargs)


def classifier_loss(model: nn.Module) -> Callable[[Any, dict[str, jax.Array], jax.Array], tuple]:
  """Per-example softmax cross-entropy for ``model``: ``loss_fn(params, example, rng)``.

  ``example`` is ``{"image": (H, W, C), "label": ()}``. The example is run as a batch of one,
  so the model sees the shapes it was written for. Returns ``(loss, correct)``.
  """

  def loss_fn(params: Any, example: dict[str, jax.Array], rng: jax.Array):
    del rng
    logits = model.apply({"params": params}, example["image"][None])[0]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, example["label"])
    return loss, jnp.argmax(logits) == example["label"]

  return loss_fn
