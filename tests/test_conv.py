"""jaxdp.conv: strided convs by space-to-depth, small-output ones by matmul and shifted sum."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen.linear import _conv_dimension_numbers

from jaxdp import conv

pytestmark = pytest.mark.slow  # jaxdp.conv's numerics (not a privacy property)


# (input shape, kernel shape, strides, padding): all take the space-to-depth route.
S2D_CASES = [
  ((2, 28, 28, 1), (8, 8, 1, 16), (2, 2), "SAME"),  # the TF-Privacy CNN's first conv
  ((2, 13, 13, 16), (4, 4, 16, 32), (2, 2), "VALID"),  # and its second
  ((2, 15, 17, 3), (4, 6, 3, 5), (2, 3), "SAME"),
  ((2, 15, 17, 3), (4, 6, 3, 5), (2, 3), ((1, 2), (0, 3))),
  ((2, 15, 17, 3), (4, 6, 3, 5), (2, 3), ((-1, 2), (0, -2))),  # negative padding crops
  ((2, 16, 3), (4, 3, 5), (2,), "VALID"),  # 1-D
  ((2, 9, 9, 9, 2), (2, 2, 2, 2, 3), (2, 2, 2), "SAME"),  # 3-D
]


def _both(x_shape, w_shape, strides, padding, seed=0, **kwargs):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
  dn = kwargs.pop("dimension_numbers", _conv_dimension_numbers(x_shape))
  kw = dict(dimension_numbers=dn, precision="highest", **kwargs)

  def f(fn):
    return lambda x, w: fn(x, w, strides, padding, **kw)

  return x, w, f(jax.lax.conv_general_dilated), f(conv.conv_general_dilated)


@pytest.mark.parametrize("x_shape, w_shape, strides, padding", S2D_CASES)
def test_space_to_depth_conv_equals_lax(x_shape, w_shape, strides, padding):
  x, w, lax_conv, ours = _both(x_shape, w_shape, strides, padding)
  assert conv.applies(w_shape[: len(strides)], strides)
  want, got = lax_conv(x, w), ours(x, w)
  assert got.shape == want.shape
  scale = float(jnp.max(jnp.abs(want)))
  np.testing.assert_allclose(got, want, atol=2e-6 * scale)
  # The gradients too (the input's and the kernel's), for a random output cotangent.
  r = jnp.asarray(np.random.default_rng(1).standard_normal(want.shape), jnp.float32)
  loss = lambda fn: lambda x, w: jnp.sum(fn(x, w) * r)
  for g_want, g_got in zip(
    jax.grad(loss(lax_conv), (0, 1))(x, w), jax.grad(loss(ours), (0, 1))(x, w), strict=True
  ):
    np.testing.assert_allclose(g_got, g_want, atol=2e-6 * float(jnp.max(jnp.abs(g_want))))


@pytest.mark.parametrize(
  "x_shape, w_shape, strides, padding, kwargs",
  [
    ((2, 12, 12, 3), (3, 3, 3, 8), (1, 1), "SAME", {}),  # stride 1, 72 outputs per position
    ((2, 12, 12, 3), (3, 3, 3, 4), (2, 2), "SAME", {}),  # kernel not a multiple of the stride
    ((2, 12, 12, 3), (2, 2, 3, 4), (2, 2), "VALID", {"rhs_dilation": (2, 2)}),
    ((2, 12, 12, 4), (2, 2, 2, 4), (2, 2), "VALID", {"feature_group_count": 2}),
    (
      (2, 3, 12, 12),
      (4, 3, 2, 2),
      (2, 2),
      "VALID",
      {"dimension_numbers": ("NCHW", "OIHW", "NCHW")},
    ),
  ],
)
def test_other_convolutions_go_to_lax_unchanged(x_shape, w_shape, strides, padding, kwargs):
  x, w, lax_conv, ours = _both(x_shape, w_shape, strides, padding, **kwargs)
  np.testing.assert_array_equal(ours(x, w), lax_conv(x, w))


# (input shape, kernel shape, strides, padding): all take the matmul-and-shifted-sum route.
TAP_CASES = [
  ((2, 14, 14, 8), (3, 3, 8, 4), (1, 1), "SAME"),  # the VAE decoder's last conv
  ((2, 9, 7, 3), (3, 2, 3, 5), (1, 1), ((1, 2), (0, 1))),
  ((2, 1, 1, 4), (3, 3, 4, 4), (1, 1), "SAME"),  # every tap but the centre reads padding
  ((2, 12, 12, 2), (4, 4, 2, 3), (2, 2), "SAME"),  # after space-to-depth: 2x2 taps, 3 outputs
  # The GAN critic's first conv: after space-to-depth 2x2 taps, 4 -> 16 channels, so its
  # kernel gradient comes from the input's patches (C_in < C_out; so do the 2nd, 5th, 6th).
  ((2, 28, 28, 1), (4, 4, 1, 16), (2, 2), "SAME"),
  ((2, 9, 3), (3, 3, 4), (1,), "SAME"),  # 1-D
  ((2, 5, 5, 5, 2), (2, 2, 2, 2, 3), (1, 1, 1), "SAME"),  # 3-D
]


def _has_conv(fn, x, w) -> bool:
  return "conv_general_dilated" in str(jax.make_jaxpr(fn)(x, w))


@pytest.mark.parametrize("x_shape, w_shape, strides, padding", TAP_CASES)
def test_tap_matmul_conv_equals_lax(x_shape, w_shape, strides, padding):
  x, w, lax_conv, ours = _both(x_shape, w_shape, strides, padding)
  assert not _has_conv(ours, x, w), "expected the matmul-and-shifted-sum route"
  want, got = lax_conv(x, w), ours(x, w)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=2e-6 * float(jnp.max(jnp.abs(want))))
  # Its hand-written backward pass, under vmap over examples of one (as the DP step runs it).
  r = jnp.asarray(np.random.default_rng(1).standard_normal(want.shape), jnp.float32)
  one = lambda fn: lambda x, w, r: jnp.sum(fn(x[None], w) * r[None])
  grads = lambda fn: jax.vmap(jax.grad(one(fn), (0, 1)), (0, None, 0))(x, w, r)
  for g_want, g_got in zip(grads(lax_conv), grads(ours), strict=True):
    np.testing.assert_allclose(g_got, g_want, atol=2e-6 * float(jnp.max(jnp.abs(g_want))))


def test_tap_matmul_route_stops_at_its_bound():
  bound = conv.TAP_MATMUL_MAX_OUT
  for c_out, route in ((bound // 9, True), (bound // 9 + 1, False)):
    x, w, _, ours = _both((1, 6, 6, 2), (3, 3, 2, c_out), (1, 1), "SAME")
    assert _has_conv(ours, x, w) != route, c_out


def test_applies():
  assert conv.applies((8, 8), (2, 2))
  assert conv.applies((4, 6), (2, 3))
  assert not conv.applies((3, 3), (2, 2))
  assert not conv.applies((4, 4), (1, 1))
  assert not conv.applies((4, 4), (2, 2), dilation=(2, 1))


def test_space_to_depth_rejects_sizes_not_a_multiple_of_the_stride():
  with pytest.raises(ValueError, match="multiple"):
    conv.space_to_depth(jnp.zeros((1, 5, 4, 1)), (2, 2))


@pytest.mark.parametrize("shape, strides", [((2, 6, 4, 3), (2, 2)), ((2, 6, 8, 3), (3, 2)),
                                            ((2, 6, 5), (3,))])  # fmt: skip
def test_depth_to_space_inverts_space_to_depth(shape, strides):
  x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
  blocks = conv.space_to_depth(x, strides)
  # Position (i, j) holds the s_0 x s_1 patch at (s_0 i, s_1 j), rows then columns, channels last.
  if len(strides) == 2:
    sy, sx = strides
    np.testing.assert_array_equal(blocks[:, 1, 1], x[:, sy : 2 * sy, sx : 2 * sx].reshape(2, -1))
  np.testing.assert_array_equal(conv.depth_to_space(blocks, strides), x)
  with pytest.raises(ValueError, match="depth_to_space"):
    conv.depth_to_space(jnp.zeros((1, 2, 2, 5)), (2, 2))


def test_flax_conv_takes_it_as_its_conv_function():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 28, 28, 1)), jnp.float32)
  plain = nn.Conv(16, (8, 8), strides=2, padding="SAME", precision="highest")
  ours = nn.Conv(
    16,
    (8, 8),
    strides=2,
    padding="SAME",
    precision="highest",
    conv_general_dilated=conv.conv_general_dilated,
  )
  params = plain.init(jax.random.key(0), x)
  np.testing.assert_allclose(ours.apply(params, x), plain.apply(params, x), atol=1e-5)


def test_upsample_nearest_equals_image_resize():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 5, 4)), jnp.float32)
  want = jax.image.resize(x, (2, 6, 10, 4), "nearest")
  np.testing.assert_array_equal(conv.upsample_nearest(x), want)
  x1 = x[:, 0]  # 1-D
  np.testing.assert_array_equal(
    conv.upsample_nearest(x1, 3), jax.image.resize(x1, (2, 15, 4), "nearest")
  )


# (input shape, kernel shape, padding, whether the sub-pixel route applies)
UPSAMPLE_CASES = [
  ((2, 7, 7, 8), (3, 3, 8, 16), "SAME", True),  # the DP-GAN generator's convs
  ((2, 4, 6, 3), (3, 3, 3, 5), ((1, 1), (1, 1)), True),
  ((2, 4, 6, 3), (3, 3, 3, 2), "SAME", True),  # few outputs: 4 * 2 per phase conv
  ((2, 4, 6, 3), (3, 3, 3, 5), "VALID", False),
  ((2, 4, 6, 3), (5, 5, 3, 5), "SAME", False),
  ((2, 5, 3), (3, 3, 4), "SAME", False),  # 1-D
]


@pytest.mark.parametrize("x_shape, w_shape, padding, sub_pixel", UPSAMPLE_CASES)
def test_upsample_conv_equals_the_conv_of_the_upsampled_map(x_shape, w_shape, padding, sub_pixel):
  """Same values and gradients (input and kernel) as lax's conv of the upsampled map, on
  the sub-pixel route and on the fallback alike."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
  up_shape = (x_shape[0], *(2 * s for s in x_shape[1:-1]), x_shape[-1])
  kw = dict(dimension_numbers=_conv_dimension_numbers(up_shape), precision="highest")
  strides = (1,) * (len(x_shape) - 2)
  want_fn = lambda x, w: jax.lax.conv_general_dilated(
    conv.upsample_nearest(x), w, strides, padding, **kw
  )
  got_fn = lambda x, w: conv.upsample_conv(x, w, strides, padding, **kw)
  want, got = want_fn(x, w), got_fn(x, w)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=2e-6 * float(jnp.max(jnp.abs(want))))
  r = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)
  loss = lambda fn: lambda x, w: jnp.sum(fn(x, w) * r)
  for g_want, g_got in zip(
    jax.grad(loss(want_fn), (0, 1))(x, w), jax.grad(loss(got_fn), (0, 1))(x, w), strict=True
  ):
    np.testing.assert_allclose(g_got, g_want, atol=2e-6 * float(jnp.max(jnp.abs(g_want))))
  # The route: the sub-pixel form has no upsampled map (no broadcast) in its program.
  jaxpr = str(jax.make_jaxpr(got_fn)(x, w))
  assert ("broadcast_in_dim" not in jaxpr) == sub_pixel


def test_generator_and_decoder_are_their_convs_of_upsampled_maps():
  """The DP-GAN generator and the latent route's decoder upsample inside their convs: their
  outputs equal the same parameters' conv of the upsampled map (the models as written
  before, so saved generators and cached autoencoders load unchanged)."""
  from jaxdp.models import gan, latent

  def reference(params, x, names, act):
    dn = _conv_dimension_numbers((1, 1, 1, 1))
    for name in names:
      x = conv.upsample_nearest(x)
      p = params[name]
      x = act(jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), "SAME", dimension_numbers=dn)
              + p["bias"])  # fmt: skip
    return x

  key = jax.random.key(0)
  g = gan.ImageGenerator((28, 28, 1), 10, 8, 16)
  z, y = jax.random.normal(key, (3, 8)), jnp.arange(3)
  params = g.init(key, z, y)["params"]
  h = jax.nn.one_hot(y, 10)
  h = nn.relu(nn.Dense(128).apply({"params": params["Dense_0"]}, jnp.concatenate([z, h], -1)))
  h = nn.relu(nn.Dense(7 * 7 * 16).apply({"params": params["Dense_1"]}, h)).reshape(3, 7, 7, 16)
  h = reference(params, h, ("Conv_0", "Conv_1"), nn.relu)
  want = jax.nn.sigmoid(nn.Conv(1, (3, 3)).apply({"params": params["Conv_2"]}, h))
  np.testing.assert_allclose(g.apply({"params": params}, z, y), want, atol=1e-5)

  ae = latent.Autoencoder((28, 28, 1), code_dim=4, width=8)
  c = jax.random.normal(key, (3, 4))
  params = ae.init(key, jnp.zeros((1, 28, 28, 1)))["params"]
  h = nn.elu(nn.Dense(7 * 7 * 16).apply({"params": params["dec_in"]}, c)).reshape(3, 7, 7, 16)
  h = reference(params, h, ("dec1", "dec2"), nn.elu)
  want = nn.Conv(1, (3, 3)).apply({"params": params["dec_out"]}, h)
  got = ae.apply({"params": params}, c, method=latent.Autoencoder.decode_logits)
  np.testing.assert_allclose(got, want, atol=1e-5)
