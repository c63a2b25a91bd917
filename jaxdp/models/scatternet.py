"""A 2-D scattering transform (ScatterNet) as fixed, data-independent image features.

The scattering transform of Mallat (2012) and Bruna & Mallat (2013) cascades wavelet
convolutions and complex moduli and averages the result with a low-pass filter:

    S0 x           = (x * phi_J)(2^J u)
    S1 x[j1, t1]   = (|x * psi_{j1,t1}| * phi_J)(2^J u)
    S2 x[.., j2, t2] = (||x * psi_{j1,t1}| * psi_{j2,t2}| * phi_J)(2^J u),   j2 > j1,

with Morlet wavelets psi_{j,t} at scales 2^j (j < J) and L orientations t, and a Gaussian
low-pass phi_J of width 2^J. For J = 2, L = 8 a 28x28 image gives 1 + 16 + 64 = 81 channels
on a 7x7 grid. The filters are fixed numbers computed from (J, L) alone: the transform reads
nothing of the private data, so features can be computed once for a whole dataset before
training at no privacy cost (Tramer & Boneh train a small DP model on top of them).

The filters follow the Morlet parameterisation of Kymatio (sigma = 0.8 * 2^j,
xi = 3 pi / 4 / 2^j, slant 4 / L); convolutions are circular, computed by FFT on a grid
padded by reflection to limit wrap-around. The numbers are close to, not identical with,
Kymatio's.

References:
  Bruna, Mallat. "Invariant Scattering Convolution Networks", IEEE TPAMI 2013.
  arXiv:1203.1513
  Tramer, Boneh. "Differentially Private Learning Needs Better Features (or Much More
  Data)", ICLR 2021. arXiv:2011.11660
  Andreux et al. "Kymatio: Scattering Transforms in Python", JMLR 2020. arXiv:1812.11214
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdp import _validate

# The version of the transform's numbers: caches of features (jaxdp.experiment.tasks) are
# keyed by it. Raise it with any change that moves a feature by more than float rounding.
FEATURES_VERSION = 1


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
  """Periodic coordinates centred at 0 on an n x n grid."""
  c = np.fft.fftfreq(n, d=1.0 / n)
  return np.meshgrid(c, c, indexing="ij")


def _gabor(n: int, sigma: float, theta: float, xi: float, slant: float) -> np.ndarray:
  x, y = _grid(n)
  rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
  curv = rot @ np.diag([1.0, slant**2]) @ rot.T / (2 * sigma**2)
  quad = curv[0, 0] * x * x + (curv[0, 1] + curv[1, 0]) * x * y + curv[1, 1] * y * y
  g = np.exp(-quad) * np.exp(1j * xi * (x * np.cos(theta) + y * np.sin(theta)))
  return g / (2 * np.pi * sigma**2 / slant)


@functools.cache
def scattering_filters(size: int, J: int, L: int) -> tuple[np.ndarray, np.ndarray]:
  """Fourier transforms of the wavelets (J*L, size, size) and of the low-pass (size, size)."""
  psis = []
  for j in range(J):
    for t in range(L):
      theta = (int(L - L / 2 - 1) - t) * np.pi / L
      sigma, xi, slant = 0.8 * 2**j, 3.0 / 4.0 * np.pi / 2**j, 4.0 / L
      gab = _gabor(size, sigma, theta, xi, slant)
      env = _gabor(size, sigma, theta, 0.0, slant)
      morlet = gab - (gab.sum() / env.sum()) * env  # zero mean
      psis.append(np.fft.fft2(morlet))
  phi = np.outer(*(2 * [_lowpass_profile(size, J)]))  # an isotropic Gaussian is separable
  return np.stack(psis).astype(np.complex64), phi.astype(np.complex64)


@functools.cache
def _lowpass_profile(size: int, J: int) -> np.ndarray:
  """The 1-D spectrum (float64) of the low-pass phi_J, a Gaussian of width 0.8 * 2^J with
  unit sum: phi_J's 2-D spectrum is its outer product with itself."""
  c = np.fft.fftfreq(size, d=1.0 / size)
  g = np.exp(-c * c / (2.0 * (0.8 * 2**J) ** 2))
  return np.fft.fft(g / g.sum())


def _periodize(xf: jax.Array, k: int) -> jax.Array:
  """Spectrum of the signal subsampled by k: the mean over the k x k aliases of each frequency."""
  if k == 1:
    return xf
  n = xf.shape[-1] // k
  return xf.reshape(*xf.shape[:-2], k, n, k, n).mean(axis=(-4, -2))


def _periodized_product(a: jax.Array, b: jax.Array, k: int) -> jax.Array:
  """``_periodize(a * b, k)`` (broadcasting ``a`` against ``b``) as the mean of the k x k
  products of their alias blocks: the full-size product is never formed, which for the
  order-2 coefficients (B x L x L spectra of 44 x 44) was the bulk of the memory traffic."""
  if k == 1:
    return a * b
  n = a.shape[-1] // k
  block = lambda x, i, j: x[..., i * n : (i + 1) * n, j * n : (j + 1) * n]
  total = sum(block(a, i, j) * block(b, i, j) for i in range(k) for j in range(k))
  return total / (k * k)


@functools.cache
def lowpass_matrix(size: int, J: int, res: int, out_lo: int, out_n: int) -> np.ndarray:
  """The low-pass of a signal at resolution ``2^res`` as a real ``(out_n, size / 2^res)``
  matrix ``M``: for an image ``u`` on that grid, ``M u M^T`` is ``u`` circularly convolved
  with ``phi_J`` (sampled every ``2^res`` pixels), subsampled to ``2^J`` and cropped to
  ``[out_lo, out_lo + out_n)``. ``phi_J`` is the outer product of a 1-D filter
  (:func:`_lowpass_profile`), so the operator is separable; ``M``'s columns are the 1-D
  operator, in Fourier form (filter, alias sum, inverse transform), applied to unit vectors.
  """
  n_r, k, s = size // 2**res, 2**res, 2 ** (J - res)
  gf = _lowpass_profile(size, J).reshape(k, n_r).mean(axis=0)  # phi's spectrum at 2^res
  spec = np.fft.fft(np.eye(n_r), axis=0) * gf[:, None]
  sub = np.fft.ifft(spec.reshape(s, n_r // s, n_r).mean(axis=0), axis=0).real
  return sub[out_lo : out_lo + out_n].astype(np.float32)


def scattering(images: jax.Array, J: int = 2, L: int = 8) -> jax.Array:
  """Order-2 scattering coefficients of a batch ``(B, H, W, 1)`` -> ``(B, H/2^J, W/2^J, K)``.

  ``K = 1 + J L + L^2 J (J - 1) / 2`` (81 for J = 2, L = 8); H = W must be a multiple of
  2^J. As in Kymatio, each modulus is taken at the resolution its wavelet allows (a wavelet
  of scale 2^j is sampled every 2^j pixels), subsampling by averaging spectral aliases. The
  final low-pass is separable (:func:`lowpass_matrix`): two small real matmuls per channel
  instead of a Fourier transform there and back, and no transform of the order-2 moduli.
  """
  _validate.positive_int("J", J)
  _validate.positive_int("L", L)
  b, h, w, c = images.shape
  if c != 1 or h != w or h % (2**J):
    raise ValueError(f"images must be (B, S, S, 1) with S a multiple of {2**J}, got {images.shape}")
  pad = 2**J * 2  # reflection border against the wrap-around of circular convolution
  size = h + 2 * pad
  psi_np, _ = scattering_filters(size, J, L)
  psi = jnp.asarray(psi_np).reshape(J, L, size, size)
  out_lo, out_n = pad // 2**J, h // 2**J
  x = jnp.pad(images[..., 0], ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
  xf = jnp.fft.fft2(x)

  def low(u: jax.Array, res: int) -> jax.Array:
    """Low-pass a real signal at resolution 2^res, subsample to 2^J, crop the border."""
    m = jnp.asarray(lowpass_matrix(size, J, res, out_lo, out_n))
    return jnp.einsum("mi,...ij,nj->...mn", m, u, m)

  channels = [low(x, 0)[:, None]]
  second = []
  for j1 in range(J):
    u1 = jnp.abs(jnp.fft.ifft2(_periodized_product(xf[:, None], psi[j1][None], 2**j1)))
    channels.append(low(u1, j1))
    if j1 + 1 < J:
      u1f = jnp.fft.fft2(u1)
    for j2 in range(j1 + 1, J):
      filt = _periodize(psi[j2], 2**j1)  # (L, n, n) at the resolution of u1
      u2f = _periodized_product(u1f[:, :, None], filt[None, None], 2 ** (j2 - j1))
      u2 = jnp.abs(jnp.fft.ifft2(u2f))  # (B, L, L, ...)
      second.append(low(u2, j2).reshape(b, L * L, out_n, out_n))
  out = jnp.concatenate([*channels, *second], axis=1)
  return jnp.transpose(out, (0, 2, 3, 1)).astype(images.dtype)


def scattering_dataset(images: np.ndarray, J: int = 2, L: int = 8, chunk: int = 256) -> np.ndarray:
  """Scattering features of a whole image array, computed in chunks (host float32; chunks
  of a few hundred images keep the spectra in cache: 1.1x faster than 2000). The last
  chunk is padded to the same shape (features are per example), so one compilation serves
  every array."""
  fn = jax.jit(functools.partial(scattering, J=J, L=L))
  parts = []
  for i in range(0, len(images), chunk):
    part = np.asarray(images[i : i + chunk])
    n = len(part)
    if n < chunk:
      part = np.concatenate([part, np.zeros((chunk - n, *part.shape[1:]), part.dtype)])
    parts.append(np.asarray(fn(jnp.asarray(part)))[:n])
  return np.concatenate(parts, axis=0)


def group_normalize(x: jax.Array, groups: int, epsilon: float = 1e-6) -> jax.Array:
  """Each example's features normalised per group of channels: GroupNorm without its
  learned scale and bias.

  For ``x`` of shape ``(B, ..., C)`` with ``C = groups * m``, channel ``c`` in group
  ``k = c // m``: ``(x - mu_bk) / sqrt(var_bk + epsilon)``, with ``mu_bk`` and ``var_bk`` the
  mean and (biased) variance over example ``b``'s positions and group ``k``'s channels
  (``E[x^2] - E[x]^2``, floored at 0, as ``flax.linen.GroupNorm`` computes it). It reads one
  example only. The group sums are one sum over positions and a small matmul with the
  ``(C, groups)`` membership matrix, a form XLA's CPU backend runs about twice as fast as
  GroupNorm's reduction over a reshaped ``(..., groups, m)`` array.
  """
  b, c = x.shape[0], x.shape[-1]
  if groups < 1 or c % groups:
    raise ValueError(f"groups must divide the {c} channels, got {groups}")
  rows = x.reshape(b, -1, c)
  member = jnp.asarray(np.kron(np.eye(groups), np.ones((c // groups, 1))), x.dtype)
  n = rows.shape[1] * (c // groups)
  mean = jnp.sum(rows, axis=1) @ member / n
  var = jnp.maximum(jnp.sum(rows * rows, axis=1) @ member / n - mean * mean, 0.0)
  scale = jax.lax.rsqrt(var + epsilon) @ member.T
  return ((rows - (mean @ member.T)[:, None]) * scale[:, None]).reshape(x.shape)


class Affine(nn.Module):
  """A learned scale and bias per feature (last axis), initialised to 1 and 0: the
  parameters of a norm layer. The fast clipping engine takes its per-layer vjp."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
    return x * scale + bias


class ScatterCNN(nn.Module):
  """The small CNN Tramer & Boneh train with DP-SGD on ScatterNet features (MNIST).

  Input: scattering features ``(B, 7, 7, 81)``. GroupNorm on the input features (27
  groups, :func:`group_normalize`) replaces the (privately estimated) data normalisation of
  the paper: it normalises each example on its own and so reads no statistic of the
  private data. As in the authors' code (``nn.GroupNorm(27, 81, affine=False)``) it has no
  learned scale and bias by default: then nothing before the first convolution has a
  parameter and no gradient flows back through it. ``affine=True`` adds them
  (:class:`Affine`, parameters ``Affine_0/{scale,bias}``: the same function and parameters
  as ``flax.linen.GroupNorm``, to float rounding).
  """

  num_classes: int = 10
  width: int = 32
  hidden: int = 32
  act: str = "tanh"
  groups: int = 27
  affine: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    from jaxdp.models.classifier import activation

    f = activation(self.act)
    x = group_normalize(x, self.groups)
    if self.affine:
      x = Affine()(x)
    x = f(nn.Conv(self.width, (3, 3), padding="SAME")(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))  # 7x7 -> 3x3
    x = f(nn.Conv(self.width, (3, 3), padding="SAME")(x))
    x = x.reshape(x.shape[0], -1)
    x = f(nn.Dense(self.hidden)(x))
    return nn.Dense(self.num_classes)(x)


class ScatterViT(nn.Module):
  """A Vision Transformer whose tokens are ScatterNet features: each of the 7x7 positions'
  81 scattering coefficients (the transform of the image around a 4x4 patch, J = 2) is one
  token, a fixed and data-independent patch embedding in place of the raw pixels.

  Input: scattering features ``(B, 7, 7, 81)``, normalised per example as
  :class:`ScatterCNN` normalises them (:func:`group_normalize`, no statistic of the data),
  then :class:`jaxdp.models.classifier.ViT` with one-position patches (49 tokens).
  """

  num_classes: int = 10
  dim: int = 64
  depth: int = 2
  heads: int = 4
  mlp: int = 128
  act: str = "gelu"
  groups: int = 27

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    from jaxdp.models.classifier import ViT

    vit = ViT(self.num_classes, 1, self.dim, self.depth, self.heads, self.mlp, self.act)
    return vit(group_normalize(x, self.groups))
