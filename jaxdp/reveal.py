"""What a trained classifier reveals: its first-layer filters, input-gradient (saliency)
maps, per-example losses of members against non-members, and class reconstructions by
model inversion (gradient ascent on the input).

These are views of a model's weights, not privacy measurements: they let a reader see how
DP-SGD changes what the weights carry (smoother, less specific filters; saliency that
follows the digit's shape less sharply; inversions that look less like training digits),
while :mod:`jaxdp.audit` gives the numbers.

References:
  Simonyan, Vedaldi, Zisserman, "Deep inside convolutional networks: visualising image
  classification models and saliency maps", ICLR workshop 2014, arXiv:1312.6034.
  Smilkov, Thorat, Kim, Viegas, Wattenberg, "SmoothGrad: removing noise by adding noise",
  2017, arXiv:1706.03825.
  Fredrikson, Jha, Ristenpart, "Model inversion attacks that exploit confidence information
  and basic countermeasures", CCS 2015.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["first_layer_filters", "invert_classes", "per_example_losses", "saliency_maps"]

PyTree = Any


def first_layer_filters(params: PyTree) -> np.ndarray:
  """The kernels of the first convolution (the first 4-d parameter in the tree's order) as
  (filters, height, width) images, summed over input channels.

  Raises:
    ValueError: if the model has no convolution kernel.
  """
  leaves = jax.tree_util.tree_leaves_with_path(params)
  for _, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    if np.ndim(leaf) == 4:  # (H, W, C_in, C_out)
      return np.transpose(np.asarray(leaf, np.float32).sum(axis=2), (2, 0, 1))
  raise ValueError("the model has no convolution kernel (a 4-d parameter)")


def _logits(model: nn.Module, params: PyTree, images: jax.Array) -> jax.Array:
  return model.apply({"params": params}, images)


def per_example_losses(
  model: nn.Module, params: PyTree, images: Any, labels: Any, chunk: int = 2048
) -> np.ndarray:
  """Softmax cross-entropy of each example (no privacy: diagnostics of whatever data is
  passed in)."""
  fn = jax.jit(
    lambda x, y: optax.softmax_cross_entropy_with_integer_labels(_logits(model, params, x), y)
  )
  images, labels = np.asarray(images), np.asarray(labels)
  return np.concatenate(
    [
      np.asarray(fn(images[i : i + chunk], labels[i : i + chunk]))
      for i in range(0, len(images), chunk)
    ]
  )


def saliency_maps(
  model: nn.Module,
  params: PyTree,
  images: Any,
  labels: Any,
  *,
  samples: int = 32,
  noise: float = 0.15,
  seed: int = 0,
) -> np.ndarray:
  """|d logit_y / d x| per pixel (summed over channels), averaged over ``samples`` copies
  of each input with Gaussian noise of std ``noise`` (SmoothGrad, Smilkov et al. 2017;
  ``samples=1, noise=0`` is the plain gradient of Simonyan et al.), each map scaled to max 1.

  Returns:
    (n, H, W) maps in [0, 1].
  """

  def one(x: jax.Array, y: jax.Array) -> jax.Array:
    return _logits(model, params, x[None])[0, y]

  grad = jax.vmap(jax.grad(one))

  @jax.jit
  def smooth(x: jax.Array, y: jax.Array, key: jax.Array) -> jax.Array:
    def body(i, acc):
      z = noise * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
      return acc + jnp.abs(grad(x + z, y))

    return jax.lax.fori_loop(0, samples, body, jnp.zeros_like(x)) / samples

  g = smooth(jnp.asarray(images, jnp.float32), jnp.asarray(labels), jax.random.key(seed))
  s = np.asarray(g, np.float32).sum(axis=-1)
  return s / np.maximum(s.max(axis=(1, 2), keepdims=True), 1e-12)


def invert_classes(
  model: nn.Module,
  params: PyTree,
  image_shape: tuple[int, ...],
  num_classes: int,
  *,
  steps: int = 300,
  learning_rate: float = 0.05,
  l2: float = 1e-3,
  tv: float = 1e-2,
) -> np.ndarray:
  """One reconstruction per class by gradient ascent on the input (Fredrikson et al. 2015):
  maximise ``log softmax(f(x))_y - l2 ||x||^2 - tv TV(x)`` over x in [0, 1] (a sigmoid
  parameterisation), from a grey image, with Adam.

  Returns:
    (num_classes, *image_shape) images in [0, 1].
  """
  ys = jnp.arange(num_classes)

  def objective(z: jax.Array) -> jax.Array:
    x = jax.nn.sigmoid(z)
    logp = jax.nn.log_softmax(_logits(model, params, x), axis=-1)[ys, ys]
    dx = jnp.abs(jnp.diff(x, axis=1)).sum(axis=(1, 2, 3))
    dy = jnp.abs(jnp.diff(x, axis=2)).sum(axis=(1, 2, 3))
    reg = l2 * jnp.sum(x**2, axis=(1, 2, 3)) + tv * (dx + dy)
    return -jnp.sum(logp - reg)

  opt = optax.adam(learning_rate)

  @jax.jit
  def run(z: jax.Array) -> jax.Array:
    def body(_, carry):
      z, state = carry
      updates, state = opt.update(jax.grad(objective)(z), state)
      return optax.apply_updates(z, updates), state

    return jax.lax.fori_loop(0, steps, body, (z, opt.init(z)))[0]

  z0 = jnp.zeros((num_classes, *image_shape), jnp.float32)
  return np.asarray(jax.nn.sigmoid(run(z0)))
