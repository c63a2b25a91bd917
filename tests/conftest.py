"""Shared fixtures: tiny models and batches; everything offline and small."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxdp.conv import conv_general_dilated as space_to_depth_conv
from jaxdp.models.scatternet import ScatterCNN

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist"


class TinyCNN(nn.Module):
  """Two convs (one SAME strided, one VALID) and a dense head on 12x12 inputs."""

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(4, (3, 3), strides=2, padding="SAME")(x))
    x = jnp.tanh(nn.Conv(6, (3, 3), padding="VALID")(x))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(5)(x)


class TinyMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(5)(x)


class TinyGroupNorm(nn.Module):
  """Conv + GroupNorm + a custom self.param: exercises the norm rule and the vmap fallback."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.GroupNorm(num_groups=2)(x)
    scale = self.param("scale", nn.initializers.ones, (4,))
    x = jnp.tanh(x * scale)
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(5)(x)


class TiedDense(nn.Module):
  """The same Dense called twice (weight sharing): the rule must add both uses."""

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)[:, :8]
    d = nn.Dense(8)
    x = jnp.tanh(d(jnp.tanh(d(x))))
    return nn.Dense(5)(x)


class Shared(nn.Module):
  """Weight sharing under every rule: one Conv on the image and on its subsampled copy (two
  map sizes), one LayerNorm on both maps, one Dense over the positions of both (144 and 36
  rows), one Embed on two token sequences; plus an RMSNorm and a LayerNorm whose features
  are two axes (a (12, 4) scale and bias)."""

  @nn.compact
  def __call__(self, x):
    tokens = jnp.clip(jnp.nan_to_num(jnp.round(x[..., 0])) + 2, 0, 4).astype(jnp.int32)
    conv, norm, dense, embed = nn.Conv(4, (3, 3)), nn.LayerNorm(), nn.Dense(6), nn.Embed(5, 6)
    a = jnp.tanh(norm(conv(x)))
    a = nn.LayerNorm(reduction_axes=(-3, -2, -1), feature_axes=(-2, -1))(a)
    b = jnp.tanh(norm(conv(x[:, ::2, ::2])))
    h = jnp.tanh(dense(a.reshape(1, -1, 4))).mean(1) + jnp.tanh(dense(b.reshape(1, -1, 4))).mean(1)
    first, sparse = tokens[:, :3].reshape(1, -1), tokens[:, ::4, ::4].reshape(1, -1)
    e = embed(first).mean(1) + embed(sparse).mean(1)
    return nn.Dense(5)(nn.RMSNorm()(h + e))


class SmallMaps(nn.Module):
  """Small feature maps with many channels, and a Dense over positions (T > 1).

  With per-example materialisation switched off, its second conv and its positional
  Dense take the ghost-norm rule (2 T^2 <= d p).
  """

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(16, (3, 3), strides=3, padding="VALID")(x))  # 4x4x16
    x = jnp.tanh(nn.Conv(16, (3, 3), padding="VALID", kernel_dilation=1)(x))  # 2x2x16, T=4
    x = jnp.tanh(nn.Dense(12)(x.reshape(x.shape[0], 4, 16)))  # Dense on T=4 positions
    return nn.Dense(5)(x.reshape(x.shape[0], -1))


class Strided(nn.Module):
  """Strided convs whose kernels are multiples of their strides (the space-to-depth path)."""

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(4, (4, 4), strides=2, padding="SAME")(x))  # one input channel
    x = jnp.tanh(nn.Conv(6, (4, 2), strides=(2, 2), padding=((1, 2), (0, 1)))(x))
    return nn.Dense(5)(x.reshape(x.shape[0], -1))


class SpaceToDepth(nn.Module):
  """The strided convs of ``Strided`` computed by jaxdp.conv (stride 1 on space-to-depth)."""

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, conv_general_dilated=space_to_depth_conv)
    x = jnp.tanh(conv(4, (4, 4), strides=2, padding="SAME")(x))
    x = jnp.tanh(conv(6, (4, 2), strides=(2, 2), padding=((1, 2), (0, 1)))(x))
    return nn.Dense(5)(x.reshape(x.shape[0], -1))


def _doubled_conv(*args, **kwargs):
  return 2.0 * jax.lax.conv_general_dilated(*args, **kwargs)


class CustomConv(nn.Module):
  """A Conv with a conv function the fast engine does not know: it must not take the im2col
  rule (which assumes the standard convolution) but the layer's own vjp."""

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(4, (3, 3), strides=2, conv_general_dilated=_doubled_conv)(x))
    return nn.Dense(5)(x.reshape(x.shape[0], -1))


class Pairs(nn.Module):
  """Each example is two 6x12 images through the same convs: a layer input with a leading
  axis of its own (L = 2), whose cross terms the conv ghost norm must count. The second conv
  (3x3, stride 2, VALID on 3x6) never reads the last row and column of its input."""

  @nn.compact
  def __call__(self, x):
    n = x.shape[0]
    x = x.reshape(n, 2, 6, 12, 1)
    conv = functools.partial(nn.Conv, conv_general_dilated=space_to_depth_conv)
    x = jnp.tanh(conv(4, (2, 2), strides=2, padding="VALID")(x))  # (n, 2, 3, 6, 4)
    x = jnp.tanh(nn.Conv(6, (2, 3), strides=2, padding="VALID")(x))  # (n, 2, 1, 2, 6)
    return nn.Dense(5)(x.reshape(n, -1))


class Unread(nn.Module):
  """A first conv that never reads the last row and column of the 12x12 input."""

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(4, (3, 3), strides=2, padding="VALID")(x))  # reads rows 0..10
    return nn.Dense(5)(x.reshape(x.shape[0], -1))


class LowPrecision(nn.Module):
  """A bfloat16 conv and Dense (params and compute): the engines must clip in float32."""

  @nn.compact
  def __call__(self, x):
    bf16 = {"dtype": jnp.bfloat16, "param_dtype": jnp.bfloat16}
    x = jnp.tanh(nn.Conv(4, (3, 3), strides=2, **bf16)(x))
    return nn.Dense(5, **bf16)(x.reshape(x.shape[0], -1)).astype(jnp.float32)


def _scaled_dot_general(lhs, rhs, dims, precision=None, preferred_element_type=None):
  return 2.0 * jax.lax.dot_general(
    lhs, rhs, dims, precision=precision, preferred_element_type=preferred_element_type
  )


class CustomDot(nn.Module):
  """A Dense with a custom dot_general (a scaled product): its gradient is not a^T g."""

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(4, (3, 3), strides=2)(x))
    return nn.Dense(5, dot_general=_scaled_dot_general)(x.reshape(x.shape[0], -1))


class _Block(nn.Module):
  @nn.compact
  def __call__(self, c, _):
    return jnp.tanh(nn.Dense(8)(c)), None


class Scanned(nn.Module):
  """Dense layers inside nn.scan: stacked parameters, or one set broadcast to every step."""

  broadcast: bool = False

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(8)(x.reshape(x.shape[0], -1)))
    if self.broadcast:
      scan = nn.scan(_Block, variable_broadcast="params", split_rngs={"params": False}, length=3)
    else:
      scan = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    x, _ = scan()(x, None)
    return nn.Dense(5)(x)


class NNXNet(nnx.Module):
  """A Flax NNX model with every layer the fast engine records for NNX: Embed (of pixel
  tokens), strided and VALID Conv, LayerNorm, GroupNorm, RMSNorm, Linear, and a Linear
  called twice (weight sharing)."""

  def __init__(self, rngs: nnx.Rngs) -> None:
    self.embed = nnx.Embed(5, 3, rngs=rngs)
    self.conv1 = nnx.Conv(4, 4, (3, 3), strides=2, rngs=rngs)
    self.norm = nnx.LayerNorm(4, rngs=rngs)
    self.conv2 = nnx.Conv(4, 6, (3, 3), padding="VALID", rngs=rngs)
    self.groups = nnx.GroupNorm(6, num_groups=2, rngs=rngs)
    self.hidden = nnx.Linear(6 * 4 * 4, 8, rngs=rngs)
    self.rms = nnx.RMSNorm(8, rngs=rngs)
    self.shared = nnx.Linear(8, 8, rngs=rngs)
    self.out = nnx.Linear(8, 5, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    tokens = jnp.clip(jnp.nan_to_num(jnp.round(x[..., 0])) + 2, 0, 4).astype(jnp.int32)
    x = jnp.concatenate([x, self.embed(tokens)], axis=-1)
    x = jnp.tanh(self.norm(self.conv1(x)))
    x = jnp.tanh(self.groups(self.conv2(x)))
    x = jnp.tanh(self.rms(self.hidden(x.reshape(*x.shape[:-3], -1))))
    x = jnp.tanh(self.shared(jnp.tanh(self.shared(x))))
    return self.out(x)


def _patches(x: jax.Array, size: int = 4) -> jax.Array:
  """(..., H, W, C) images as (..., tokens, size*size*C) non-overlapping patches."""
  *lead, h, w, c = x.shape
  x = x.reshape(*lead, h // size, size, w // size, size, c)
  x = jnp.moveaxis(x, -4, -3)  # (..., h/size, w/size, size, size, c)
  return x.reshape(*lead, (h // size) * (w // size), size * size * c)


class TinyViT(nn.Module):
  """Patches -> Dense over the sequence -> LayerNorm -> multi-head self-attention (its
  DenseGeneral projections) -> MLP -> mean over tokens -> Dense head."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(8)(_patches(x)) + self.param("pos", nn.initializers.normal(0.1), (9, 8))
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(nn.LayerNorm()(x))
    x = x + nn.Dense(8)(nn.gelu(nn.Dense(16)(nn.LayerNorm()(x))))
    return nn.Dense(5)(jnp.mean(x, axis=-2))


class NNXViT(nnx.Module):
  """TinyViT in Flax NNX (nnx.MultiHeadAttention's LinearGeneral projections)."""

  def __init__(self, rngs: nnx.Rngs) -> None:
    self.embed = nnx.Linear(16, 8, rngs=rngs)
    self.norm1, self.norm2 = nnx.LayerNorm(8, rngs=rngs), nnx.LayerNorm(8, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(2, 8, qkv_features=8, decode=False, rngs=rngs)
    self.up, self.down = nnx.Linear(8, 16, rngs=rngs), nnx.Linear(16, 8, rngs=rngs)
    self.head = nnx.Linear(8, 5, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.embed(_patches(x))
    x = x + self.attention(self.norm1(x))
    x = x + self.down(nnx.gelu(self.up(self.norm2(x))))
    return self.head(jnp.mean(x, axis=-2))


MODELS = {
  "vit": TinyViT,
  "nnx_vit": NNXViT,
  "nnx": NNXNet,
  "cnn": TinyCNN,
  "mlp": TinyMLP,
  "groupnorm": TinyGroupNorm,
  "scatter": functools.partial(ScatterCNN, num_classes=5, width=4, hidden=8, groups=1, affine=True),
  "tied": TiedDense,
  "shared": Shared,
  "smallmaps": SmallMaps,
  "strided": Strided,
  "s2d": SpaceToDepth,
  "customconv": CustomConv,
  "pairs": Pairs,
  "unread": Unread,
  "bf16": LowPrecision,
  "customdot": CustomDot,
  "scan": Scanned,
  "scan_broadcast": functools.partial(Scanned, broadcast=True),
}


def make_problem(name: str, batch_size: int = 12, seed: int = 0):
  """(loss_fn, params, batch) for a tiny model with 5 classes on 12x12x1 inputs."""
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  images = jax.random.normal(k1, (batch_size, 12, 12, 1))
  # Scale some examples up so that some gradients are above and some below the bound.
  images = images * jnp.linspace(0.1, 3.0, batch_size)[:, None, None, None]
  labels = jax.random.randint(k2, (batch_size,), 0, 5)
  if isinstance(MODELS[name], type) and issubclass(MODELS[name], nnx.Module):
    # NNX: the params pytree is the model's nnx.Param state, merged back inside the loss.
    graphdef, params = nnx.split(MODELS[name](nnx.Rngs(seed)), nnx.Param)
    apply = lambda p, x: nnx.merge(graphdef, p)(x)
  else:
    model = MODELS[name]()
    params = model.init(k3, images[:1])["params"]
    apply = lambda p, x: model.apply({"params": p}, x)

  def loss_fn(p, ex, rng):
    del rng
    logits = apply(p, ex["image"][None])[0]
    logz = jax.nn.logsumexp(logits)
    return logz - logits[ex["label"]]

  return loss_fn, params, {"image": images, "label": labels}


@pytest.fixture
def problem():
  return make_problem


@dataclasses.dataclass(frozen=True)
class Call:
  """One call seen by :func:`spy`: its arguments by parameter name, and what it returned."""

  arguments: dict[str, Any]
  result: Any


@pytest.fixture
def spy(monkeypatch):
  """``spy(owner, name)`` wraps ``owner.name`` for the test: the original still runs, and
  each call is appended, as a :class:`Call`, to the list it returns. Tests read which data a
  script's library tasks received (``spy(tasks, "fit")``) without changing what they do."""

  def install(owner: Any, name: str) -> list[Call]:
    calls: list[Call] = []
    original = getattr(owner, name)
    signature = inspect.signature(original)

    def wrapper(*args, **kwargs):
      result = original(*args, **kwargs)
      calls.append(Call(dict(signature.bind(*args, **kwargs).arguments), result))
      return result

    monkeypatch.setattr(owner, name, wrapper)
    return calls

  return install


def tiny_vae(decoder: str = "bernoulli", groups: int = 0):
  """A tiny ConditionalVAE on 12x12x1 images with 5 classes; its decoder conv (3x3, 4
  outputs) takes jaxdp.conv's matmul route."""
  from jaxdp.models import ConditionalVAE

  return ConditionalVAE(
    image_shape=(12, 12, 1),
    num_classes=5,
    latent_dim=3,
    encoder_widths=(4,),
    decoder_hidden=(8,),
    decoder_widths=(4,),
    groups=groups,
    decoder=decoder,
  )


def pytest_configure(config):
  """A persistent XLA compilation cache for the tests (``.jax_cache/``, git-ignored; another
  folder with ``JAXDP_TEST_JAX_CACHE``): tests that compile the same program (the
  experiments' steps, the engines on the same tiny model) compile it once, and a second run
  of the suite reuses it all. Entries are keyed by the program, options and versions."""
  default = Path(__file__).resolve().parents[1] / ".jax_cache"
  settings = {
    "jax_compilation_cache_dir": os.environ.get("JAXDP_TEST_JAX_CACHE") or str(default),
    "jax_persistent_cache_min_compile_time_secs": 0.2,
    "jax_persistent_cache_min_entry_size_bytes": 0,
  }
  # The tests' programs are tiny: XLA's optimisation passes cost more than they save (the
  # engine tests run 2x faster without them). JAXDP_TEST_OPTIMIZE=1 keeps them.
  if os.environ.get("JAXDP_TEST_OPTIMIZE") != "1":
    settings["jax_disable_most_optimizations"] = True
  for name, value in settings.items():
    jax.config.update(name, value)
    # The same for the subprocesses (the studies' cells, the multi-device run, the
    # benchmark workers), which JAX configures from the environment: a study's cells then
    # compile their shared programs once, unoptimised, instead of each its own, optimised.
    os.environ.setdefault(name.upper(), str(value))
  # Cached features (the ScatterNet transform of each split) in a folder of this session,
  # never the user's ~/.cache; subprocesses (the studies' cells) inherit it.
  if "JAXDP_CACHE_DIR" not in os.environ:
    os.environ["JAXDP_CACHE_DIR"] = config._jaxdp_cache = tempfile.mkdtemp(prefix="jaxdp-cache-")


def pytest_unconfigure(config):
  """Removes the feature cache folder this process made (see pytest_configure)."""
  made = getattr(config, "_jaxdp_cache", None)
  if made:
    shutil.rmtree(made, ignore_errors=True)


# The end-to-end runs take longest: scheduled first, they overlap with the rest on the two
# workers of ``-n 2`` instead of running alone at the end.
FIRST = (
  "test_study.py",
  "test_dp_vae_synth.py",
  "test_release.py",
  "test_dp_audit.py",
  "test_dp_classifier.py",
  "test_readme.py",
)


def pytest_collection_modifyitems(config, items):
  """Runs the modules in ``FIRST`` first (stable otherwise)."""
  rank = lambda item: FIRST.index(item.path.name) if item.path.name in FIRST else len(FIRST)
  items.sort(key=rank)
