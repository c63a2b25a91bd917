"""Class-conditional Wasserstein GANs whose critic alone sees private data.

DP-WGAN (Xie et al. 2018, arXiv:1802.06739; WGAN: Arjovsky et al. 2017, arXiv:1701.07875;
WGAN-GP: Gulrajani et al. 2017, arXiv:1704.00028). The critic is trained through the one
jaxdp step on a per-example loss that PAIRS one private example (x, y) with one generated
example (x~, y~), drawn for its row before the step (:func:`fake_rows`):

    l(w; (x, y), (x~, y~)) = D_w(x~, y~) - D_w(x, y)
                             + lambda (||grad_u D_w(u, y)|| - 1)^2,   u = e x + (1 - e) x~

with e ~ U(0, 1) from the row's key. Each pair's gradient is clipped as one example, so one
critic step is one Poisson-sampled Gaussian mechanism on the private data: the fake half
carries no separate privacy charge (Opacus's GAN example charges it twice, opacus #418).
The gradient penalty is inside the per-example loss, so the clipping bound holds for it too.
Weight clipping (:func:`jaxdp.optim.clip_weights`, the original WGAN's Lipschitz constraint)
projects the critic's parameters after each update: post-processing.

The generator update reads no private data: it differentiates ``-D_w(G(z, y), y)`` through
the current (DP) critic at fresh ``z`` and uniformly drawn labels: post-processing, no
privacy cost (:func:`generator_update`).

``loss="logistic"`` trains the same pair as the original GAN's discriminator instead, the
recipe of DP-GAN revisited (Bie et al.): the critic's score is a logit,
``l = softplus(D_w(x~, y~)) + softplus(-D_w(x, y))`` (cross-entropy of "real" against
"generated"), and the generator minimises the non-saturating ``softplus(-D_w(G(z, y), y))``.
It needs no Lipschitz constraint, so no gradient penalty, and the critic keeps the fast
engine's per-layer rules.

Two families share this: image models (:class:`ImageGenerator`, :class:`ImageCritic`) for
MNIST-sized images, and vector models (:class:`VectorGenerator`, :class:`VectorCritic`) for
the latent codes of a public autoencoder. The critic is a projection critic: a shared trunk
then ``Dense(num_classes)`` read at the label, ``D(x, y) = f(x)_y``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxdp import _validate, optim
from jaxdp._chunks import map_chunks
from jaxdp.conv import conv_general_dilated as space_to_depth_conv
from jaxdp.conv import upsample_conv
from jaxdp.models import classifier

PyTree = Any


# The critic's objectives: the WGAN's score difference, or the original GAN's cross-entropy
# with the non-saturating generator loss.
LOSSES = ("wasserstein", "logistic")

# The critic's activations: the classifier's (relu, tanh, elu, gelu, tempered sigmoid) and
# the GAN literature's leaky ReLU (slope 0.2).
CRITIC_ACTIVATIONS = ("leaky_relu", *classifier.ACTIVATIONS)


def _activation(name: str) -> Callable[[jax.Array], jax.Array]:
  _validate.one_of("activation", name, CRITIC_ACTIVATIONS)
  return (lambda x: nn.leaky_relu(x, 0.2)) if name == "leaky_relu" else classifier.activation(name)


class ImageGenerator(nn.Module):
  """(z, y) -> an image in [0, 1]: Dense to 7x7 maps, two nearest-neighbour 2x upsamplings
  with 3x3 convs (no transposed convs: no checkerboard), sigmoid output."""

  image_shape: tuple[int, int, int] = (28, 28, 1)
  num_classes: int = 10
  latent_dim: int = 32
  width: int = 64

  @nn.compact
  def __call__(self, z: jax.Array, y: jax.Array) -> jax.Array:
    h, w, c = self.image_shape
    x = jnp.concatenate([z, jax.nn.one_hot(y, self.num_classes)], axis=-1)
    x = nn.relu(nn.Dense(128)(x))
    x = nn.relu(nn.Dense((h // 4) * (w // 4) * self.width)(x))
    x = x.reshape(x.shape[0], h // 4, w // 4, self.width)
    for channels in (self.width, self.width // 2):
      # Upsampled 2x inside the conv, in its sub-pixel form (jaxdp.conv.upsample_conv: the
      # same layer and numbers as the conv of the upsampled map, half the multiply-adds).
      x = nn.relu(nn.Conv(channels, (3, 3), conv_general_dilated=upsample_conv)(x))
    return jax.nn.sigmoid(nn.Conv(c, (3, 3), conv_general_dilated=space_to_depth_conv)(x))


class ImageCritic(nn.Module):
  """x -> one score per class (read at the label): two stride-2 convs, a Dense layer of
  ``hidden`` units (0: none, the convs' features go straight to the class scores). No
  batch statistics (per-example losses must not couple examples). ``class_bias``: whether
  the scores have a per-class bias (see :func:`class_bias_for`)."""

  num_classes: int = 10
  width: int = 32
  activation: str = "leaky_relu"
  hidden: int = 128
  class_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    act = _activation(self.activation)
    # Strided convs as stride-1 convs on space-to-depth inputs (jaxdp.conv: same numbers,
    # faster on XLA's CPU backend).
    conv = functools.partial(nn.Conv, conv_general_dilated=space_to_depth_conv)
    x = act(conv(self.width, (4, 4), strides=2)(x))
    x = act(conv(2 * self.width, (4, 4), strides=2)(x))
    x = x.reshape(x.shape[0], -1)
    if self.hidden:
      x = act(nn.Dense(self.hidden)(x))
    return nn.Dense(self.num_classes, use_bias=self.class_bias)(x)


class VectorGenerator(nn.Module):
  """(z, y) -> a vector of ``out_dim`` (e.g. a public autoencoder's latent code)."""

  out_dim: int
  num_classes: int = 10
  latent_dim: int = 32
  hidden: tuple[int, ...] = (256, 256)

  @nn.compact
  def __call__(self, z: jax.Array, y: jax.Array) -> jax.Array:
    x = jnp.concatenate([z, jax.nn.one_hot(y, self.num_classes)], axis=-1)
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.out_dim)(x)


class VectorCritic(nn.Module):
  """A vector -> one score per class: an MLP trunk (``class_bias`` as for
  :class:`ImageCritic`)."""

  num_classes: int = 10
  hidden: tuple[int, ...] = (256, 256)
  activation: str = "leaky_relu"
  class_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    act = _activation(self.activation)
    for width in self.hidden:
      x = act(nn.Dense(width)(x))
    return nn.Dense(self.num_classes, use_bias=self.class_bias)(x)


def class_bias_for(loss: str) -> bool:
  """Whether a critic trained on ``loss`` gets per-class score biases: not for the WGAN.

  The pair loss ``D(fake, y~) - D(x, y)`` moves a bias ``b`` by ``e_{y~} - e_y``: a gradient
  of norm sqrt(2) whenever the two labels differ, and zero in expectation when the fakes'
  labels follow the real ones' proportions (the objective does not depend on ``b`` then).
  Under DP that label noise takes the clip budget: with the WGAN's weights clipped to 0.01
  it was 1.41 of a pair's gradient norm of 1.42 at initialisation (every kernel's ~0.005),
  so clipping and noise left the kernels nothing. The logistic loss's biases do carry
  signal (each class's real-vs-fake log-odds) and stay.
  """
  _validate.one_of("loss", loss, LOSSES)
  return loss != "wasserstein"


def critic_score(critic: nn.Module, params: PyTree, x: jax.Array, y: jax.Array) -> jax.Array:
  """D(x, y) for ONE example: the critic's score of class ``y``."""
  return critic.apply({"params": params}, x[None])[0, y]


def critic_loss(
  critic: nn.Module,
  *,
  gradient_penalty: float = 0.0,
  key: str = "image",
  loss: str = "wasserstein",
) -> Callable[[PyTree, dict[str, jax.Array], jax.Array], tuple[jax.Array, dict]]:
  """The per-example (per-pair) critic loss for the jaxdp step (``has_aux=True``).

  The example dict holds the private ``key`` and ``"label"`` and, as the step's per-row
  side inputs, ``"fake"`` and ``"fake_label"`` (:func:`fake_rows`). Returns
  ``(D(fake, y~) - D(x, y) [+ penalty], {"wasserstein": D(x, y) - D(fake, y~)})``, or with
  ``loss="logistic"`` ``softplus(D(fake, y~)) + softplus(-D(x, y)) [+ penalty]`` and the
  same score gap as aux; the penalty's interpolation weight is drawn from the row's key.
  """
  _validate.one_of("loss", loss, LOSSES)

  def pair_loss(params: PyTree, ex: dict[str, jax.Array], rng: jax.Array):
    real, fake = ex[key], ex["fake"].astype(ex[key].dtype)
    # The pair goes through the critic as ONE call on two items: each layer is then called
    # once per example (when measured, a layer called twice fell back to per-example VJPs:
    # 2.4x slower for the image critic at batch 608; it now takes the weight-sharing rule,
    # but one call keeps the conv's Gram norm available and builds one set of patches).
    scores = critic.apply({"params": params}, jnp.stack([real, fake]))
    d_real, d_fake = scores[0, ex["label"]], scores[1, ex["fake_label"]]
    if loss == "logistic":
      value = jax.nn.softplus(d_fake) + jax.nn.softplus(-d_real)
    else:
      value = d_fake - d_real
    if gradient_penalty > 0:
      e = jax.random.uniform(rng, ())
      mixed = e * real + (1.0 - e) * fake
      g = jax.grad(lambda u: critic_score(critic, params, u, ex["label"]))(mixed)
      norm = jnp.sqrt(jnp.sum(jnp.square(g)) + 1e-12)
      value = value + gradient_penalty * jnp.square(norm - 1.0)
    return value, {"wasserstein": d_real - d_fake}

  return pair_loss


def _draw(key: jax.Array, n: int, latent_dim: int, num_classes: int):
  kz, ky = jax.random.split(key)
  return jax.random.normal(kz, (n, latent_dim)), jax.random.randint(ky, (n,), 0, num_classes)


@functools.partial(jax.jit, static_argnums=(0, 3))
def fake_rows(generator: nn.Module, params: PyTree, key: jax.Array, n: int) -> dict[str, jax.Array]:
  """``n`` generated examples with uniformly drawn labels, as the critic step's per-row side
  inputs ``{"fake", "fake_label"}``: they depend on no private data."""
  z, y = _draw(key, n, generator.latent_dim, generator.num_classes)
  return {"fake": generator.apply({"params": params}, z, y), "fake_label": y}


class GeneratorState(NamedTuple):
  """The generator's parameters and optimiser state (public: post-processing)."""

  params: PyTree
  opt_state: optax.OptState


def generator_optimizer(learning_rate: float, ema: float = 0.0) -> optax.GradientTransformation:
  """The generator's Adam (b1 0.5, b2 0.9, as in WGAN-GP), wrapped in
  :func:`jaxdp.optim.param_ema` when ``ema`` > 0: the average of the iterates is then the
  released generator (post-processing of the DP critic, no privacy cost; averaging GAN
  iterates: Yazici et al., ICLR 2019, arXiv:1806.04498)."""
  adam = optax.adam(learning_rate, b1=0.5, b2=0.9)
  return optim.param_ema(adam, ema) if ema > 0 else adam


def generator_update(
  generator: nn.Module,
  critic: nn.Module,
  optimizer: optax.GradientTransformation,
  batch: int,
  loss: str = "wasserstein",
  mode_seeking: float = 0.0,
) -> Callable[[GeneratorState, PyTree, jax.Array], tuple[GeneratorState, jax.Array]]:
  """A jitted generator step ``(state, critic_params, key) -> (state, loss)``: minimises
  ``-mean D(G(z, y), y)`` (``loss="logistic"``: the non-saturating ``mean softplus(-D)``)
  over ``batch`` fresh draws. It reads no private data.

  ``mode_seeking`` = lambda > 0 adds MSGAN's regulariser (Mao et al., CVPR 2019,
  arXiv:1903.05628) against a class collapsing to a few images: the draws come in pairs
  (z1, y), (z2, y) of one label, and the objective gains
  ``lambda * mean 1 / (r + 1e-5)`` with ``r = mean|G(z1, y) - G(z2, y)| / mean|z1 - z2|``
  per pair. It reads only the generator: no privacy cost. The returned loss is the
  adversarial part alone.
  """
  _validate.one_of("loss", loss, LOSSES)
  _validate.non_negative("mode_seeking", mode_seeking)

  def objective(g_params, c_params, key):
    z, y = _draw(key, batch, generator.latent_dim, generator.num_classes)
    half = batch // 2
    if mode_seeking > 0:  # rows i and half + i share a label
      y = y.at[half : 2 * half].set(y[:half])
    images = generator.apply({"params": g_params}, z, y)
    scores = critic.apply({"params": c_params}, images)
    d = jnp.take_along_axis(scores, y[:, None], axis=1)
    adversarial = jnp.mean(jax.nn.softplus(-d)) if loss == "logistic" else -jnp.mean(d)
    if mode_seeking <= 0:
      return adversarial, adversarial
    axes = tuple(range(1, images.ndim))
    apart = jnp.mean(jnp.abs(images[:half] - images[half : 2 * half]), axis=axes)
    ratio = apart / jnp.mean(jnp.abs(z[:half] - z[half : 2 * half]), axis=1)
    return adversarial + mode_seeking * jnp.mean(1.0 / (ratio + 1e-5)), adversarial

  @jax.jit
  def step(state: GeneratorState, c_params: PyTree, key: jax.Array):
    (_, value), grads = jax.value_and_grad(objective, has_aux=True)(state.params, c_params, key)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return GeneratorState(optax.apply_updates(state.params, updates), opt_state), value

  return step


def sample(
  generator: nn.Module, params: PyTree, labels: jax.Array, key: jax.Array, chunk_size: int = 1000
) -> jax.Array:
  """Generated examples for ``labels``, in chunks of ``chunk_size`` (one compiled shape); a
  :data:`jaxdp.synth.Generator` once ``generator`` and ``params`` are bound."""
  labels = jnp.asarray(labels, jnp.int32)
  # Chunk i's latents from fold_in(key, i), drawn up front; the padding's are dropped.
  count = -(-labels.shape[0] // chunk_size)
  z = jnp.concatenate(
    [jax.random.normal(jax.random.fold_in(key, i), (chunk_size, generator.latent_dim))
     for i in range(count)]
  )[: labels.shape[0]]  # fmt: skip
  return map_chunks(lambda z, y: _apply(generator, params, z, y), (z, labels), chunk_size)


@functools.partial(jax.jit, static_argnums=0)
def _apply(generator: nn.Module, params: PyTree, z: jax.Array, y: jax.Array) -> jax.Array:
  return generator.apply({"params": params}, z, y)
