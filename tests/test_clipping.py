"""The clipped sum: vmap engine against a Python loop, fast engine against the vmap engine."""

from __future__ import annotations

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_problem, tiny_vae
from flax import nnx

from jaxdp._cpu_flags import jaxpr_equations
from jaxdp.clipping import fast, reference
from jaxdp.models import vae_loss

CLIP = 3.0


def loop_clipped_sum(loss_fn, params, batch, mask, rngs, clip):
  """The definition, one example at a time in plain Python."""
  total = jax.tree_util.tree_map(jnp.zeros_like, params)
  norms = []
  grad = jax.jit(jax.grad(loss_fn))  # one example's gradient, compiled once
  for i in range(len(mask)):
    ex = jax.tree_util.tree_map(lambda x, i=i: x[i], batch)
    g = grad(params, ex, rngs[i])
    norm = float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree_util.tree_leaves(g))))
    norms.append(norm if mask[i] else 0.0)
    if mask[i]:
      f = min(1.0, clip / norm)
      total = jax.tree_util.tree_map(lambda t, x, f=f: t + f * x, total, g)
  return total, np.array(norms)


def force_norm(monkeypatch, how):
  """Every dense or conv layer with T > 1 takes the norm ``how`` ("ghost", or "gram" where
  the layer is a conv), whatever it costs; "auto" leaves the engine's own choice."""
  if how == "auto":
    return

  def rule(b, t, d, p, gram_macs=None):
    if t == 1:
      return "t1"
    return "gram" if how == "gram" and gram_macs is not None else "ghost"

  monkeypatch.setattr(fast, "_outer_rule", rule)


def clipped(engine, loss_fn, params, batch, mask, rngs, clip, **kwargs):
  """``engine.clipped_sum`` compiled (eager dispatch of the fast engine is slow)."""
  run = lambda p, b, m: engine.clipped_sum(loss_fn, p, b, m, rngs, clip, **kwargs)
  return jax.jit(run)(params, batch, jnp.asarray(mask))


def assert_trees_close(a, b, atol):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-5)


@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_reference_equals_python_loop(name):
  loss_fn, params, batch = make_problem(name)
  mask = np.array([True] * 10 + [False] * 2)
  rngs = jax.random.split(jax.random.key(1), 12)
  want, want_norms = loop_clipped_sum(loss_fn, params, batch, mask, rngs, CLIP)
  ref = lambda p: reference.clipped_sum(loss_fn, p, batch, jnp.asarray(mask), rngs, CLIP)
  got = jax.jit(ref)(params)
  # Some examples are above the bound and some below: the test exercises both branches.
  assert (want_norms[mask] > CLIP).any() and (want_norms[mask] < CLIP).any()
  np.testing.assert_allclose(np.asarray(got.per_example_norms), want_norms, rtol=1e-5, atol=1e-6)
  assert_trees_close(got.sum_of_clipped_grads, want, atol=1e-5)


# -- every engine guarantee on every model and norm rule, in one compiled program each ------
#
# One batch of 12 rows in many scenarios, stacked and run through ``vmap`` of the engine, so
# each (model, rule) compiles once: the clean batch (9 real rows, 3 padding), padding rows
# holding NaN, inf or values that overflow, a real row (the first, which padding rows copy,
# or another) whose gradient is NaN or inf, an all-padding batch, and each row alone.
# Under ``vmap`` the fast engine's ``lax.cond`` runs both branches and selects per scenario.

REAL = np.array([True] * 9 + [False] * 3)
POISONS = (np.nan, np.inf, -np.inf, 1e30)


def scenarios(batch: dict) -> tuple[dict, dict, np.ndarray]:
  """(index of each scenario, the stacked batches, the stacked masks)."""
  images, names, masks, stack = np.asarray(batch["image"]), [], [], []

  def add(name, image, mask):
    names.append(name)
    stack.append(image)
    masks.append(mask)

  add("clean", images, REAL)
  for p in POISONS:  # padding rows: one pixel of row 9, the whole of row 11, edges of row 10
    img = images.copy()
    img[9, 3, 4], img[11], img[10, -1], img[10, :, -1] = p, p, p, p
    add(f"pad {p}", img, REAL)
  for r in (0, 2):
    add(f"drop {r}", images, REAL & (np.arange(12) != r))
    for p in (np.nan, np.inf):
      img = images.copy()
      img[r, 0, 1] = p  # a pixel every model reads
      add(f"real {r} {p}", img, REAL)
  for p in (np.nan, np.inf):
    img = images.copy()
    img[:, 2, 3] = p
    add(f"empty {p}", img, np.zeros(12, bool))
  for i in range(12):
    add(f"one {i}", images, np.arange(12) == i)
  index = {name: k for k, name in enumerate(names)}
  stacked = {"image": np.stack(stack), "label": np.broadcast_to(batch["label"], (len(stack), 12))}
  return index, stacked, np.stack(masks)


def run_scenarios(engine, loss_fn, params, batch, clip=CLIP, has_aux=False):
  index, stacked, masks = scenarios(batch)
  rngs = jax.random.split(jax.random.key(1), 12)
  one = lambda b, m: engine.clipped_sum(loss_fn, params, b, m, rngs, clip, has_aux=has_aux)
  out = jax.jit(jax.vmap(one))(stacked, masks)
  return index, jax.tree_util.tree_map(np.asarray, out)


@functools.cache
def reference_scenarios(name: str):
  """The reference engine on a model's scenarios (shared by its rules' tests)."""
  loss_fn, params, batch = make_problem(name)
  return run_scenarios(reference, loss_fn, params, batch)


def pick(out, k):
  return jax.tree_util.tree_map(lambda x: x[k], out)


def check_scenarios(got, index, ref=None, clip=CLIP, unit=1.0):
  """Every guarantee, scenario by scenario; ``ref``: the reference engine's results. Sums
  are compared to 1e-5 (engines) and 1e-6 (padding, non-finite rows) in units of ``unit``."""
  atol = 1e-5 * unit
  leaves = lambda out, k: jax.tree_util.tree_leaves(pick(out, k).sum_of_clipped_grads)
  clean = pick(got, index["clean"])
  for k in range(len(index)):
    for x in leaves(got, k):
      assert np.all(np.isfinite(x)), list(index)[k]
  if ref is not None:  # equal to the definition wherever no row is poisoned
    for name in ["clean", "drop 0", "drop 2"] + [f"one {i}" for i in range(12)]:
      g, r = pick(got, index[name]), pick(ref, index[name])
      np.testing.assert_allclose(g.per_example_norms, r.per_example_norms, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(g.clip_factors, r.clip_factors, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(g.losses, r.losses, rtol=1e-5, atol=1e-6)
      assert_trees_close(g.sum_of_clipped_grads, r.sum_of_clipped_grads, atol=atol)
  for p in POISONS:  # padding adds exactly nothing, whatever it holds
    g = pick(got, index[f"pad {p}"])
    assert_trees_close(g.sum_of_clipped_grads, clean.sum_of_clipped_grads, atol=1e-6 * unit)
    np.testing.assert_allclose(g.per_example_norms[:9], clean.per_example_norms[:9], rtol=1e-5)
    assert np.all(g.per_example_norms[9:] == 0) and np.all(g.clip_factors[9:] == 0)
    assert np.all(g.losses[9:] == 0)
  for r in (0, 2):  # a real row with a NaN or inf gradient: factor 0, adds nothing
    want = pick(got, index[f"drop {r}"])
    others = np.arange(9) != r
    for p in (np.nan, np.inf):
      g = pick(got, index[f"real {r} {p}"])
      assert g.clip_factors[r] == 0 and not np.isfinite(g.per_example_norms[r])
      assert_trees_close(g.sum_of_clipped_grads, want.sum_of_clipped_grads, atol=1e-6 * unit)
      np.testing.assert_allclose(
        g.per_example_norms[:9][others], want.per_example_norms[:9][others], rtol=1e-5
      )
  for p in (np.nan, np.inf):  # no real row at all: exactly zero everywhere
    g = pick(got, index[f"empty {p}"])
    assert all(np.all(x == 0) for x in leaves(got, index[f"empty {p}"]))
    assert np.all(g.per_example_norms == 0) and np.all(g.clip_factors == 0)
  for i in range(12):  # each row's share of the sum has norm <= C (padding rows none)
    g = pick(got, index[f"one {i}"])
    norm = np.sqrt(
      sum(np.sum(np.asarray(x, np.float64) ** 2) for x in leaves(got, index[f"one {i}"]))
    )
    assert norm <= clip * (1 + 1e-5), (i, norm / clip)
    assert g.clip_factors[i] == min(1.0, clip / g.per_example_norms[i]) or np.isclose(
      g.clip_factors[i], clip / g.per_example_norms[i], rtol=1e-6
    )


ENGINE_CASES = [
  (m, h)
  for m in (
    "nnx",
    "vit",
    "nnx_vit",
    "cnn",
    "mlp",
    "groupnorm",
    "scatter",
    "tied",
    "shared",
    "smallmaps",
    "strided",
    "s2d",
    "customconv",
    "pairs",
    "unread",
    "customdot",
  )
  for h in ("auto", "ghost")
]
GRAM_MODELS = ("nnx", "cnn", "shared", "smallmaps", "strided", "s2d", "pairs", "unread")
ENGINE_CASES += [(m, "gram") for m in GRAM_MODELS]


@pytest.mark.parametrize("name, how", ENGINE_CASES)
def test_engines_on_every_scenario(name, how, monkeypatch):
  """The fast engine equals the reference engine, padding and non-finite rows add exactly
  nothing, an empty batch adds zero, and every row's share is bounded by C, on each model
  and norm rule (the reference engine's own scenarios are checked once per model)."""
  loss_fn, params, batch = make_problem(name)
  index, ref = reference_scenarios(name)
  if how == "auto":
    check_scenarios(ref, index)
  force_norm(monkeypatch, how)
  _, got = run_scenarios(fast, loss_fn, params, batch)
  check_scenarios(got, index, ref)


# The Gaussian decoder differs from the Bernoulli one only in its likelihood (one more
# parameter, its log-scale, on the vmap fallback): the fast loop runs the Bernoulli ones.
VAE_CASES = [("bernoulli", h) for h in ("auto", "ghost", "gram")] + [
  pytest.param("gaussian", h, marks=pytest.mark.slow) for h in ("auto", "ghost", "gram")
]


@pytest.mark.parametrize("decoder, how", VAE_CASES)
def test_engines_on_the_vae(decoder, how, monkeypatch):
  """The tiny VAE (GroupNorm in its encoder, its decoder conv on jaxdp.conv's matmul route,
  a per-example key for the reparameterisation): every scenario, in units of the bound."""
  model = tiny_vae(decoder, groups=2)
  k1, k2, k3 = jax.random.split(jax.random.key(5), 3)
  images = jax.random.uniform(k1, (12, 12, 12, 1))
  labels = jax.random.randint(k2, (12,), 0, 5)
  params = model.init(k3, images[:1], labels[:1], k3)["params"]
  batch, loss_fn = {"image": images, "label": labels}, vae_loss(model)
  plan = fast.discover(loss_fn, params, jax.tree_util.tree_map(lambda x: x[0], batch), k1, True)
  # Both convs, all 5 Dense layers and the GroupNorm by rule.
  assert (plan.summary()["conv"], plan.summary()["dense"], plan.summary()["norm"]) == (2, 5, 1)
  # A bound between the smallest and the largest norm: some rows clipped, some not.
  rngs = jax.random.split(jax.random.key(1), 12)
  norms = clipped(reference, loss_fn, params, batch, REAL, rngs, 1.0, has_aux=True)
  clip = float(np.median(np.asarray(norms.per_example_norms)[:9]))
  index, ref = run_scenarios(reference, loss_fn, params, batch, clip, has_aux=True)
  force_norm(monkeypatch, how)
  _, got = run_scenarios(fast, loss_fn, params, batch, clip, has_aux=True)
  # In units of the bound (each clipped gradient has norm <= clip; the VAE's norms are ~100).
  check_scenarios(got, index, ref, clip=clip, unit=clip)


def _plan_summary(name):
  loss_fn, params, batch = make_problem(name)
  ex = jax.tree_util.tree_map(lambda x: x[0], batch)
  return fast.discover(loss_fn, params, ex, jax.random.key(0), False).summary()


def test_fast_engine_plans_the_expected_rules():
  # Flax NNX, no rewrite: Linear and Conv take the dense and conv rules, Embed its own (token
  # equality ghost norm, scattered sum), LayerNorm, GroupNorm and RMSNorm the norm rule, and
  # the Linear called twice (weight sharing) the dense rule on both calls; nothing on vmap.
  assert _plan_summary("nnx") == {"embed": 1, "norm": 3, "conv": 2, "dense": 4, "vmap_leaves": 0}
  # Attention: the query / key / value / output projections (DenseGeneral over the tokens)
  # take the dense rule, Linen and NNX alike; the learned positions (a self.param) vmap.
  assert _plan_summary("vit") == {"dense": 8, "norm": 2, "vmap_leaves": 1}
  assert _plan_summary("nnx_vit") == {"dense": 8, "norm": 2, "vmap_leaves": 0}
  assert _plan_summary("cnn") == {"conv": 2, "dense": 1, "vmap_leaves": 0}
  # GroupNorm by the norm rule, the custom self.param via vmap.
  assert _plan_summary("groupnorm") == {"conv": 1, "norm": 1, "dense": 1, "vmap_leaves": 1}
  # The ScatterCNN's Affine (a norm's scale and bias) takes its own vjp, with no note.
  assert _plan_summary("scatter") == {"vjp": 1, "conv": 2, "dense": 2, "vmap_leaves": 0}
  # Weight sharing: every call of a shared Dense, Conv, Embed or LayerNorm keeps its rule.
  assert _plan_summary("tied") == {"dense": 3, "vmap_leaves": 0}
  want = {"conv": 2, "norm": 4, "dense": 3, "embed": 2, "vmap_leaves": 0}
  assert _plan_summary("shared") == want
  # jaxdp's space-to-depth conv computes the standard convolution: the im2col rule applies.
  assert _plan_summary("s2d") == {"conv": 2, "dense": 1, "vmap_leaves": 0}
  # An unknown conv function may compute anything: the layer's own vjp, never the rule.
  assert _plan_summary("customconv") == {"vjp": 1, "dense": 1, "vmap_leaves": 0}


def test_fast_engine_sees_weights_used_outside_layer_calls():
  """A Dense kernel also used directly in the loss must not be normed from its call alone."""
  import flax.linen as nn

  class Leaky(nn.Module):
    @nn.compact
    def __call__(self, x):
      d = nn.Dense(5)
      y = d(x.reshape(x.shape[0], -1))
      return y, d.variables["params"]["kernel"]

  model = Leaky()
  _, params, batch = make_problem("mlp")
  params = model.init(jax.random.key(0), batch["image"][:1])["params"]

  def loss_fn(p, ex, rng):
    y, kernel = model.apply({"params": p}, ex["image"][None])
    return jnp.sum(y**2) + jnp.sum(kernel**2) * ex["image"].mean()

  ex = jax.tree_util.tree_map(lambda x: x[0], batch)
  plan = fast.discover(loss_fn, params, ex, jax.random.key(0), False)
  assert plan.summary()["vmap_leaves"] >= 1
  mask = jnp.ones(12, bool)
  rngs = jax.random.split(jax.random.key(1), 12)
  ref = clipped(reference, loss_fn, params, batch, mask, rngs, CLIP)
  got = clipped(fast, loss_fn, params, batch, mask, rngs, CLIP)
  np.testing.assert_allclose(got.per_example_norms, ref.per_example_norms, rtol=1e-5)


@pytest.mark.parametrize("engine", [reference, fast])
def test_engine_contractions_run_in_full_float32(engine):
  """Under a reduced default matmul precision (TF32 on a GPU, bfloat16 on a TPU) the clip
  factors and the clipped sum still come from float32 contractions: a norm computed in lower
  precision than the sum could let an example's share exceed the bound. XLA's CPU backend
  ignores the precision, so this checks the traced program: at least one contraction per
  parameter leaf (its share of the sum) asks for HIGHEST."""
  loss_fn, params, batch = make_problem("cnn")
  mask = jnp.ones(12, bool)
  rngs = jax.random.split(jax.random.key(1), 12)
  with jax.default_matmul_precision("bfloat16"):
    jaxpr = jax.make_jaxpr(lambda p: engine.clipped_sum(loss_fn, p, batch, mask, rngs, CLIP))(
      params
    )
  highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
  count = sum(
    e.primitive.name in ("dot_general", "conv_general_dilated")
    and e.params.get("precision") == highest
    for e in jaxpr_equations(jaxpr)
  )
  assert count >= len(jax.tree_util.tree_leaves(params))


def test_per_layer_clipping_bounds_each_group():
  loss_fn, params, batch = make_problem("mlp")
  bounds = {"Dense_0": 0.3, "Dense_1": 0.1}
  rngs = jax.random.split(jax.random.key(1), 12)
  for i in range(3):
    one = jnp.zeros(12, bool).at[i].set(True)
    got = clipped(reference, loss_fn, params, batch, one, rngs, bounds)
    for name, c in bounds.items():
      g = got.sum_of_clipped_grads[name]
      norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree_util.tree_leaves(g)))
      assert float(norm) <= c * (1 + 1e-5)
      assert float(norm) >= 0.5 * c  # these gradients are large: each group is clipped


# -- low-precision layers, custom layers, lifted transforms ----------------------------------


@pytest.mark.parametrize(
  "engine, how", [(reference, "auto"), (fast, "auto"), (fast, "ghost"), (fast, "gram")]
)
def test_low_precision_shares_stay_within_the_bound(engine, how, monkeypatch):
  """bfloat16 layers: norms, clip factors and sums in float32, so every example's share of
  the sum has norm <= C (1 + 1e-6) (rounding them to bfloat16 gave 1.0023 C)."""
  force_norm(monkeypatch, how)
  loss_fn, params, batch = make_problem("bf16")
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(params))
  rngs = jax.random.split(jax.random.key(1), 12)
  clip = 0.01  # below every example's norm: each share is clipped to exactly C
  one = jax.jit(lambda p, m: engine.clipped_sum(loss_fn, p, batch, m, rngs, clip))
  for i in range(12):
    got = one(params, jnp.zeros(12, bool).at[i].set(True))
    leaves = jax.tree_util.tree_leaves(got.sum_of_clipped_grads)
    assert all(x.dtype == jnp.float32 for x in leaves)
    norm = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in leaves))
    assert float(got.per_example_norms[i]) > clip
    assert norm <= clip * (1 + 1e-6), (i, norm / clip)


def test_dense_with_custom_dot_general_takes_the_vjp_rule(monkeypatch):
  loss_fn, params, batch = make_problem("customdot")
  first = jax.tree_util.tree_map(lambda x: x[0], batch)
  monkeypatch.setattr(fast, "_WARNED", set())
  with pytest.warns(UserWarning, match="no rule for Dense .* its own per-example vjp"):
    plan = fast.discover(loss_fn, params, first, jax.random.key(0), False)
  assert [c.rule for c in plan.calls] == ["conv", "vjp"]
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # said once
    fast.discover(loss_fn, params, first, jax.random.key(0), False)
  mask = jnp.array([True] * 9 + [False] * 3)
  rngs = jax.random.split(jax.random.key(1), 12)
  ref = clipped(reference, loss_fn, params, batch, mask, rngs, CLIP)
  got = clipped(fast, loss_fn, params, batch, mask, rngs, CLIP)
  np.testing.assert_allclose(got.per_example_norms, ref.per_example_norms, rtol=1e-5)
  assert_trees_close(got.sum_of_clipped_grads, ref.sum_of_clipped_grads, atol=1e-5)


def test_upsampling_conv_takes_the_vjp_rule_and_equals_the_reference(monkeypatch):
  """A Conv that upsamples its input inside (jaxdp.conv.upsample_conv) must not get the
  im2col / Gram rules, which would read the low-resolution input as the conv's own: it
  takes the per-layer vjp, with the reference engine's norms and clipped sum."""
  from jaxdp.conv import upsample_conv

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.tanh(nn.Conv(3, (3, 3), conv_general_dilated=upsample_conv)(x))
      return nn.Dense(2)(x.reshape(x.shape[0], -1))

  model = Net()
  rng = np.random.default_rng(0)
  batch = {"x": jnp.asarray(rng.standard_normal((6, 4, 4, 2)), jnp.float32),
           "y": jnp.asarray(rng.integers(0, 2, 6))}  # fmt: skip
  params = model.init(jax.random.key(0), batch["x"][:1])["params"]

  def loss_fn(p, ex, _):
    logits = model.apply({"params": p}, ex["x"][None])[0]
    return -jax.nn.log_softmax(logits)[ex["y"]]

  first = jax.tree_util.tree_map(lambda x: x[0], batch)
  monkeypatch.setattr(fast, "_WARNED", set())
  with pytest.warns(UserWarning, match="its own per-example vjp"):
    plan = fast.discover(loss_fn, params, first, jax.random.key(0), False)
  assert [c.rule for c in plan.calls] == ["vjp", "dense"]
  mask = jnp.array([True] * 5 + [False])
  rngs = jax.random.split(jax.random.key(1), 6)
  ref = clipped(reference, loss_fn, params, batch, mask, rngs, 0.5)
  got = clipped(fast, loss_fn, params, batch, mask, rngs, 0.5)
  np.testing.assert_allclose(got.per_example_norms, ref.per_example_norms, rtol=1e-5)
  assert_trees_close(got.sum_of_clipped_grads, ref.sum_of_clipped_grads, atol=1e-5)


@pytest.mark.parametrize("name", ["scan", "scan_broadcast"])
def test_layers_inside_nn_scan_fall_back_to_vmap_with_a_warning(name):
  """Layers inside a lifted transform cannot be intercepted (their values belong to the
  transform's trace): their parameters take the reference engine's vmap, with one warning."""
  loss_fn, params, batch = make_problem(name)
  mask = jnp.array([True] * 9 + [False] * 3)
  rngs = jax.random.split(jax.random.key(1), 12)
  with pytest.warns(UserWarning, match="lifted Flax transform"):
    got = clipped(fast, loss_fn, params, batch, mask, rngs, CLIP)
  ref = clipped(reference, loss_fn, params, batch, mask, rngs, CLIP)
  np.testing.assert_allclose(got.per_example_norms, ref.per_example_norms, rtol=1e-5)
  assert_trees_close(got.sum_of_clipped_grads, ref.sum_of_clipped_grads, atol=1e-5)


def test_norm_rule_choice(monkeypatch):
  assert fast._outer_rule(8, 1, 512, 32) == "t1"
  # TF-Privacy CNN, first conv on space-to-depth input: 17x17 positions of 4 channels,
  # 14x14 outputs, 16 taps, 16 filters: ghost 3.1M, Gram 1.6M, materialising 200k.
  first = (8, 196, 64, 16, 289 * 289 * 4 + 196 * 196 * (16 + 16))
  # Its second conv: 6x6 positions of 64 channels, 5x5 outputs, 4 taps, 32 filters:
  # ghost 180k, Gram 105k, materialising 205k.
  second = (8, 25, 256, 32, 36 * 36 * 64 + 25 * 25 * (4 + 32))
  # A 3x3 stride-2 conv, 15x15 positions of 32 channels to 7x7 outputs of 64: ghost 845k,
  # Gram 1.6M (four times the positions), materialising 903k.
  strided = (8, 49, 288, 64, 225 * 225 * 32 + 49 * 49 * (9 + 64))
  # A dense layer on 4 positions: ghost 2.6k, materialising 9.2k.
  dense = (8, 4, 144, 16)
  # The ScatterNet CNN's first conv, 9x9 positions of 81 channels to 7x7 outputs of 32:
  # patches and gradients 59k entries per example, Gram 630k, materialising 1.14M.
  scatter = (8, 49, 729, 32, 81 * 81 * 81 + 49 * 49 * (9 + 32))
  # The same with 32 channels to 64: 33k entries, below the threshold.
  small = (8, 49, 288, 64, 81 * 81 * 32 + 49 * 49 * (9 + 64))
  # With big patches but Gram at 0.81x materialising (9x9x64 to 32 filters).
  dear = (8, 81, 576, 32, 121 * 121 * 64 + 81 * 81 * (9 + 32))
  # The ScatterNet CNN's second conv, 5x5 positions of 32 channels to 3x3 outputs of 32:
  # 12k entries, but 9 output positions; Gram 23k, materialising 83k.
  few = (8, 9, 288, 32, 25 * 25 * 32 + 9 * 9 * (9 + 32))
  # Few positions, but Gram dearer: 5x5 positions of 8 channels to 3x3x2, 5.9k against 1.3k.
  few_dear = (8, 9, 72, 2, 25 * 25 * 8 + 9 * 9 * (9 + 2))
  for case in (first, second, strided, dense, small, dear, few_dear):
    assert fast._outer_rule(*case) == "materialize"  # the per-example gradients fit
  assert fast._outer_rule(*scatter) == "gram"  # big patches, Gram much cheaper
  assert fast._outer_rule(*few) == "gram"  # few positions, Gram much cheaper
  monkeypatch.setattr(fast, "MATERIALIZE_ELEMENTS", 0)  # they do not
  assert fast._outer_rule(*first) == "materialize"
  assert fast._outer_rule(*second) == "gram"
  assert fast._outer_rule(*strided) == "ghost"
  assert fast._outer_rule(*dense) == "ghost"


@pytest.mark.parametrize(
  "kernel, padding, strides, dilation, lead",
  [
    ((3, 3), "SAME", 1, 1, ()),  # the ScatterNet CNN's first conv
    ((3, 2), ((2, 1), (0, 3)), 1, 2, ()),  # uneven padding, dilated
    ((3, 3), "SAME", 2, 1, ()),  # strided, no space-to-depth (3 is not a multiple of 2)
    ((3, 3), "VALID", 1, 1, (2,)),  # a conv over 2 items of one example
    ((4, 4), "SAME", 2, 1, ()),  # space-to-depth: the Gram of the rewritten input
    ((4, 2), "VALID", 2, 1, (2,)),  # space-to-depth over 2 items
  ],
)
def test_gram_norm_without_padding_positions(kernel, padding, strides, dilation, lead):
  # The Gram matrix of the unpadded input, zero-padded and then summed over the taps, gives
  # the same norms as the Gram matrix of the padded input; both equal the materialised
  # definition, as does a space-to-depth conv's.
  import dataclasses

  import flax.linen as nn

  b, c, p = 3, 5, 4
  call = fast._Call(
    module=nn.Conv(p, kernel, strides=strides, padding=padding, kernel_dilation=dilation),
    names=("bias", "kernel"), leaf_ids=(0, 1), in_shape=(*lead, 7, 6, c),
    out_shape=(), out_dtype=jnp.float32, rule="conv",
  )  # fmt: skip
  a = jax.random.normal(jax.random.key(0), (b, *lead, 7, 6, c))
  ci = fast._conv_input(call, a)
  assert (ci.raw is None) == (ci.perm is not None)  # unpadded Gram, or space-to-depth
  t = int(np.prod(ci.out)) * int(np.prod(lead))
  g = jax.random.normal(jax.random.key(1), (b, t, p))
  fast_norm = fast._conv_gram_sq_norm(ci, g)
  if ci.raw is not None:
    padded = fast._conv_gram_sq_norm(dataclasses.replace(ci, raw=None), g)
    np.testing.assert_allclose(fast_norm, padded, rtol=1e-5)
  patches = fast._conv_patches(ci, b).reshape(b, t, -1)  # the materialised definition
  want = jnp.einsum("btd,bsd,btp,bsp->b", patches, patches, g, g)
  np.testing.assert_allclose(fast_norm, want, rtol=1e-4)


# -- each rule alone: a model that is one layer, so the example's norm is the layer's -----

_LAYERS = {  # name: (Linen layer, NNX layer, per-example input shape; None: token ids)
  "dense": (lambda: nn.Dense(6), lambda r: nnx.Linear(4, 6, rngs=r), (5, 4)),
  "dense_general": (
    lambda: nn.DenseGeneral((2, 3)),
    lambda r: nnx.LinearGeneral(4, (2, 3), rngs=r),
    (5, 4),
  ),
  "dense_general_in": (
    lambda: nn.DenseGeneral(4, axis=(-2, -1)),
    lambda r: nnx.LinearGeneral((2, 3), 4, axis=(-2, -1), rngs=r),
    (5, 2, 3),
  ),
  "conv": (lambda: nn.Conv(3, (3, 3)), lambda r: nnx.Conv(2, 3, (3, 3), rngs=r), (6, 6, 2)),
  "embed": (lambda: nn.Embed(7, 4), lambda r: nnx.Embed(7, 4, rngs=r), None),
  "layernorm": (lambda: nn.LayerNorm(), lambda r: nnx.LayerNorm(4, rngs=r), (5, 4)),
  "rmsnorm": (lambda: nn.RMSNorm(), lambda r: nnx.RMSNorm(4, rngs=r), (5, 4)),
  "groupnorm": (
    lambda: nn.GroupNorm(num_groups=2),
    lambda r: nnx.GroupNorm(4, num_groups=2, rngs=r),
    (3, 3, 4),
  ),
}
_RULE = {"dense": "dense", "dense_general": "dense", "dense_general_in": "dense", "conv": "conv",
         "embed": "embed", "layernorm": "norm", "rmsnorm": "norm", "groupnorm": "norm"}  # fmt: skip


def _one_layer_problem(name: str, api: str, twice: bool):
  """(loss_fn, params, batch) of a model that is the layer ``name`` (called twice, on the
  input and on a transformed copy, if ``twice``), under a fixed nonlinear readout."""
  linen, make_nnx, shape = _LAYERS[name]
  k1, k2 = jax.random.split(jax.random.key(3))
  if shape is None:
    x = jax.random.randint(k1, (10, 6), 0, 7)
    other = lambda z: (z * 3 + 1) % 7
  else:
    scale = jnp.linspace(0.2, 3.0, 10).reshape(-1, *[1] * len(shape))
    x = jax.random.normal(k1, (10, *shape)) * scale
    other = lambda z: jnp.tanh(jnp.flip(z, axis=-2)) + 0.5
  if api == "linen":

    class Model(nn.Module):
      @nn.compact
      def __call__(self, z):
        layer = linen()
        return layer(z) + layer(other(z)) if twice else layer(z)

    model = Model()
    params = model.init(k2, x[:1])["params"]
    apply = lambda p, z: model.apply({"params": p}, z)
  else:

    class NNXModel(nnx.Module):
      def __init__(self, rngs):
        self.layer = make_nnx(rngs)

      def __call__(self, z):
        return self.layer(z) + self.layer(other(z)) if twice else self.layer(z)

    graphdef, params = nnx.split(NNXModel(nnx.Rngs(4)), nnx.Param)
    # Non-trivial scales and biases (NNX and Linen start them at 1 and 0).
    params = jax.tree_util.tree_map(
      lambda p: p + 0.3 * jax.random.normal(jax.random.key(p.size), p.shape), params
    )
    apply = lambda p, z: nnx.merge(graphdef, p)(z)

  def loss_fn(p, ex, rng):
    del rng
    y = apply(p, ex["x"][None])
    readout = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
    return jnp.sum(jnp.sin(y) * readout)

  return loss_fn, params, {"x": x}


@pytest.mark.parametrize("twice", [False, True], ids=["once", "twice"])
@pytest.mark.parametrize("api", ["linen", "nnx"])
@pytest.mark.parametrize("name", list(_LAYERS))
def test_each_rule_alone_equals_the_reference_per_layer(name, api, twice):
  """Every supported layer, Linen and NNX, once and shared (called twice): its rule is
  taken (no vjp, no vmap, no note) and each example's norm of that layer's gradient, its
  clip factor and the clipped sum equal the reference engine's to 1e-5."""
  loss_fn, params, batch = _one_layer_problem(name, api, twice)
  ex = jax.tree_util.tree_map(lambda x: x[0], batch)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    plan = fast.discover(loss_fn, params, ex, jax.random.key(0), False)
  assert plan.summary() == {_RULE[name]: 2 if twice else 1, "vmap_leaves": 0}
  mask, rngs = np.array([True] * 8 + [False] * 2), jax.random.split(jax.random.key(1), 10)
  norms = np.asarray(clipped(reference, loss_fn, params, batch, mask, rngs, 1.0).per_example_norms)
  clip = float(np.median(norms[:8]))  # some examples clipped, some not
  ref = clipped(reference, loss_fn, params, batch, mask, rngs, clip)
  got = clipped(fast, loss_fn, params, batch, mask, rngs, clip)
  assert np.all(norms[:8] > 0) and np.all(norms[8:] == 0)
  np.testing.assert_allclose(got.per_example_norms, norms, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got.clip_factors, ref.clip_factors, rtol=1e-5, atol=1e-6)
  assert_trees_close(got.sum_of_clipped_grads, ref.sum_of_clipped_grads, atol=1e-5 * clip)
