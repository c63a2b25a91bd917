"""The clipped sum: vmap engine against a Python loop, fast engine against the vmap engine."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_problem, tiny_vae

from jaxdp._cpu_flags import jaxpr_equations
from jaxdp.clipping import fast, reference
from jaxdp.models import vae_loss

CLIP = 3.0


def loop_clipped_sum(loss_fn, params, batch, mask, rngs, clip):
  """The definition, one example at a time in plain Python."""
  total = jax.tree_util.tree_map(jnp.zeros_like, params)
  norms = []
  for i in range(len(mask)):
    ex = jax.tree_util.tree_map(lambda x, i=i: x[i], batch)
    g = jax.grad(loss_fn)(params, ex, rngs[i])
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


def assert_trees_close(a, b, atol):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-5)


@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_reference_equals_python_loop(name):
  loss_fn, params, batch = make_problem(name)
  mask = np.array([True] * 10 + [False] * 2)
  rngs = jax.random.split(jax.random.key(1), 12)
  want, want_norms = loop_clipped_sum(loss_fn, params, batch, mask, rngs, CLIP)
  got = reference.clipped_sum(loss_fn, params, batch, jnp.asarray(mask), rngs, CLIP)
  # Some examples are above the bound and some below: the test exercises both branches.
  assert (want_norms[mask] > CLIP).any() and (want_norms[mask] < CLIP).any()
  np.testing.assert_allclose(np.asarray(got.per_example_norms), want_norms, rtol=1e-5, atol=1e-6)
  assert_trees_close(got.sum_of_clipped_grads, want, atol=1e-5)


@pytest.mark.parametrize("how", ["auto", "ghost", "gram"])
@pytest.mark.parametrize(
  "name",
  ["cnn", "mlp", "groupnorm", "tied", "smallmaps", "strided", "s2d", "customconv", "pairs"],
)
def test_fast_equals_reference(name, how, monkeypatch):
  force_norm(monkeypatch, how)
  loss_fn, params, batch = make_problem(name)
  mask = jnp.array([True] * 9 + [False] * 3)
  rngs = jax.random.split(jax.random.key(1), 12)
  ref = jax.jit(lambda p: reference.clipped_sum(loss_fn, p, batch, mask, rngs, CLIP))(params)
  got = jax.jit(lambda p: fast.clipped_sum(loss_fn, p, batch, mask, rngs, CLIP))(params)
  np.testing.assert_allclose(got.per_example_norms, ref.per_example_norms, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got.clip_factors, ref.clip_factors, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got.losses, ref.losses, rtol=1e-5, atol=1e-6)
  assert_trees_close(got.sum_of_clipped_grads, ref.sum_of_clipped_grads, atol=1e-5)


def _tiny_vae_problem(decoder: str, poison: float | None = None):
  """The tiny VAE (GroupNorm in its encoder; its decoder conv on jaxdp.conv's matmul route)
  with its per-example keyed loss; 9 real rows, 3 padding rows (``poison`` there if given)."""
  model = tiny_vae(decoder, groups=2)
  k1, k2, k3 = jax.random.split(jax.random.key(5), 3)
  images = jax.random.uniform(k1, (12, 12, 12, 1))
  if poison is not None:
    images = images.at[9:].set(poison)
  labels = jax.random.randint(k2, (12,), 0, 5)
  params = model.init(k3, images[:1], labels[:1], k3)["params"]
  batch = {"image": images, "label": labels}
  return vae_loss(model), params, batch


@pytest.mark.parametrize("how", ["auto", "ghost", "gram"])
@pytest.mark.parametrize("decoder", ["bernoulli", "gaussian"])
def test_fast_equals_reference_on_the_vae(decoder, how, monkeypatch):
  force_norm(monkeypatch, how)
  loss_fn, params, batch = _tiny_vae_problem(decoder)
  plan = fast.discover(
    loss_fn, params, jax.tree_util.tree_map(lambda x: x[0], batch), jax.random.key(0), True
  ).summary()
  # Both convs and all 5 Dense layers by rule, the GroupNorm by its vjp.
  assert (plan["conv"], plan["dense"], plan["vjp"]) == (2, 5, 1), plan
  mask = jnp.array([True] * 9 + [False] * 3)
  rngs = jax.random.split(jax.random.key(1), 12)
  run = lambda engine, clip: jax.jit(
    lambda p: engine.clipped_sum(loss_fn, p, batch, mask, rngs, clip, has_aux=True)
  )(params)
  # A bound between the smallest and the largest norm: some rows clipped, some not.
  clip = float(np.median(np.asarray(run(reference, 1.0).per_example_norms)[:9]))
  ref, got = run(reference, clip), run(fast, clip)
  assert 0 < float(jnp.sum(ref.clip_factors[:9] < 1)) < 9
  np.testing.assert_allclose(got.per_example_norms, ref.per_example_norms, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got.clip_factors, ref.clip_factors, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got.losses, ref.losses, rtol=1e-5, atol=1e-6)
  # In units of the bound (each clipped gradient has norm <= clip; the VAE's norms are ~100).
  in_clips = lambda tree: jax.tree_util.tree_map(lambda x: x / clip, tree)
  assert_trees_close(in_clips(got.sum_of_clipped_grads), in_clips(ref.sum_of_clipped_grads), 1e-5)
  # Padding rows add exactly zero, even when their images are NaN (up to the rounding of the
  # engine's re-taken sums): the same sums as with zero images there, and no NaN anywhere.
  loss_fn, _, poisoned = _tiny_vae_problem(decoder, poison=np.nan)
  clean = jax.tree_util.tree_map(lambda x: x.at[9:].set(0), poisoned)
  for engine in (reference, fast):
    out = [
      jax.jit(lambda p, b, e=engine: e.clipped_sum(loss_fn, p, b, mask, rngs, clip, has_aux=True))(
        params, b
      )
      for b in (poisoned, clean)
    ]
    assert_trees_close(
      in_clips(out[0].sum_of_clipped_grads), in_clips(out[1].sum_of_clipped_grads), 1e-6
    )
    assert np.all(np.asarray(out[0].clip_factors[9:]) == 0)


def _plan_summary(name):
  loss_fn, params, batch = make_problem(name)
  ex = jax.tree_util.tree_map(lambda x: x[0], batch)
  return fast.discover(loss_fn, params, ex, jax.random.key(0), False).summary()


def test_fast_engine_plans_the_expected_rules():
  assert _plan_summary("cnn") == {"conv": 2, "dense": 1, "vmap_leaves": 0}
  # GroupNorm via its own vjp, the custom self.param via vmap.
  assert _plan_summary("groupnorm") == {"conv": 1, "vjp": 1, "dense": 1, "vmap_leaves": 1}
  assert _plan_summary("tied") == {"vjp": 2, "dense": 1, "vmap_leaves": 0}
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
  ref = reference.clipped_sum(loss_fn, params, batch, mask, rngs, CLIP)
  got = fast.clipped_sum(loss_fn, params, batch, mask, rngs, CLIP)
  np.testing.assert_allclose(got.per_example_norms, ref.per_example_norms, rtol=1e-5)


@pytest.mark.parametrize("engine", [reference, fast])
def test_padding_contributes_exactly_zero_even_when_nan(engine):
  loss_fn, params, batch = make_problem("cnn")
  mask = jnp.array([True] * 8 + [False] * 4)
  # Padding rows whose loss and gradient are NaN.
  weight = jnp.where(mask, 1.0, -1.0)
  batch = {**batch, "w": weight}
  nan_loss = lambda p, ex, r: jnp.sqrt(ex["w"]) * loss_fn(p, ex, r)
  rngs = jax.random.split(jax.random.key(1), 12)
  got = jax.jit(lambda p: engine.clipped_sum(nan_loss, p, batch, mask, rngs, CLIP))(params)
  real = jax.tree_util.tree_map(lambda x: x[:8], batch)
  want = engine.clipped_sum(nan_loss, params, real, jnp.ones(8, bool), rngs[:8], CLIP)
  assert_trees_close(got.sum_of_clipped_grads, want.sum_of_clipped_grads, atol=1e-6)
  assert np.all(np.asarray(got.per_example_norms[8:]) == 0)
  assert np.all(np.asarray(got.clip_factors[8:]) == 0)
  assert np.all(np.isfinite(np.asarray(got.losses)))


@pytest.mark.parametrize("poison", [np.nan, np.inf, -np.inf, 1e30])
@pytest.mark.parametrize(
  "name, how",
  [(m, h) for m in ("cnn", "mlp", "groupnorm", "smallmaps", "s2d") for h in ("auto", "ghost")]
  + [(m, "gram") for m in ("cnn", "smallmaps", "s2d", "pairs")],
)
def test_fast_padding_rows_with_non_finite_inputs_add_exactly_zero(name, how, poison, monkeypatch):
  """The fast engine masks no per-position array: padding rows run as copies of a real row,
  so what they hold never enters, under every rule. 1e30 overflows to inf inside the model."""
  force_norm(monkeypatch, how)
  loss_fn, params, batch = make_problem(name)
  mask = jnp.array([True] * 8 + [False] * 4)
  images = batch["image"].at[9, 3, 4, 0].set(poison).at[11].set(poison)
  rngs = jax.random.split(jax.random.key(1), 12)
  got = jax.jit(lambda p, x: fast.clipped_sum(loss_fn, p, x, mask, rngs, CLIP))(
    params, {**batch, "image": images}
  )
  real = jax.tree_util.tree_map(lambda x: x[:8], batch)
  want = fast.clipped_sum(loss_fn, params, real, jnp.ones(8, bool), rngs[:8], CLIP)
  for x in jax.tree_util.tree_leaves(got.sum_of_clipped_grads):
    assert np.all(np.isfinite(np.asarray(x)))
  assert_trees_close(got.sum_of_clipped_grads, want.sum_of_clipped_grads, atol=1e-6)
  np.testing.assert_allclose(got.per_example_norms[:8], want.per_example_norms, rtol=1e-5)
  assert np.all(np.asarray(got.per_example_norms[8:]) == 0)


@pytest.mark.parametrize("poison", [np.nan, np.inf])
@pytest.mark.parametrize("how", ["auto", "ghost", "gram"])
def test_fast_padding_rows_non_finite_where_no_window_reads(how, poison, monkeypatch):
  """A padding row's non-finite input in a position no conv window reads leaves its loss
  and norm finite, yet the clipped sum must stay exact."""
  force_norm(monkeypatch, how)
  loss_fn, params, batch = make_problem("unread")
  mask = jnp.array([True] * 8 + [False] * 4)
  images = batch["image"].at[9, 11, :, 0].set(poison).at[10, :, 11, 0].set(poison)
  rngs = jax.random.split(jax.random.key(1), 12)
  got = jax.jit(lambda p, x: fast.clipped_sum(loss_fn, p, x, mask, rngs, CLIP))(
    params, {**batch, "image": images}
  )
  real = jax.tree_util.tree_map(lambda x: x[:8], batch)
  want = fast.clipped_sum(loss_fn, params, real, jnp.ones(8, bool), rngs[:8], CLIP)
  assert_trees_close(got.sum_of_clipped_grads, want.sum_of_clipped_grads, atol=1e-6)
  np.testing.assert_allclose(got.per_example_norms[:8], want.per_example_norms, rtol=1e-5)


@pytest.mark.parametrize("poison", [np.nan, np.inf])
@pytest.mark.parametrize(
  "engine, name, how",
  [(reference, "cnn", "auto")]
  + [(fast, m, h) for m in ("cnn", "mlp", "groupnorm", "s2d") for h in ("auto", "ghost")]
  + [(fast, "cnn", "gram")],
)
def test_all_padding_batch_adds_exactly_zero(engine, name, how, poison, monkeypatch):
  """A physical batch with no real row (an empty Poisson batch, a last microbatch) adds
  exactly 0, even when every row is non-finite: the fast engine has no real row to copy."""
  force_norm(monkeypatch, how)
  loss_fn, params, batch = make_problem(name)
  images = batch["image"].at[:, 2, 3, 0].set(poison)
  rngs = jax.random.split(jax.random.key(1), 12)
  got = jax.jit(lambda p, x: engine.clipped_sum(loss_fn, p, x, jnp.zeros(12, bool), rngs, CLIP))(
    params, {**batch, "image": images}
  )
  for x in jax.tree_util.tree_leaves(got.sum_of_clipped_grads):
    assert np.all(np.asarray(x) == 0)
  for x in (got.per_example_norms, got.clip_factors, got.losses):
    assert np.all(np.asarray(x) == 0)


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


@pytest.mark.parametrize("engine", [reference, fast])
def test_each_contribution_is_bounded(engine):
  loss_fn, params, batch = make_problem("cnn")
  rngs = jax.random.split(jax.random.key(1), 12)
  for i in range(12):
    one = jnp.zeros(12, bool).at[i].set(True)
    got = engine.clipped_sum(loss_fn, params, batch, one, rngs, CLIP)
    norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree_util.tree_leaves(got.sum_of_clipped_grads)))
    assert float(norm) <= CLIP * (1 + 1e-5)


def test_per_layer_clipping_bounds_each_group():
  loss_fn, params, batch = make_problem("mlp")
  bounds = {"Dense_0": 0.3, "Dense_1": 0.1}
  rngs = jax.random.split(jax.random.key(1), 12)
  for i in range(3):
    one = jnp.zeros(12, bool).at[i].set(True)
    got = reference.clipped_sum(loss_fn, params, batch, one, rngs, bounds)
    for name, c in bounds.items():
      g = got.sum_of_clipped_grads[name]
      norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree_util.tree_leaves(g)))
      assert float(norm) <= c * (1 + 1e-5)
      assert float(norm) >= 0.5 * c  # these gradients are large: each group is clipped


# -- a real example whose gradient is NaN or inf --------------------------------------------


@pytest.mark.parametrize("row", [0, 2])  # row 0 is also the row padding rows copy
@pytest.mark.parametrize("poison", [np.nan, np.inf])
@pytest.mark.parametrize(
  "engine, name, how",
  [(reference, "cnn", "auto")]
  + [(fast, "cnn", h) for h in ("auto", "ghost", "gram")]
  + [(fast, m, "auto") for m in ("mlp", "groupnorm", "s2d")],
)
def test_real_example_with_non_finite_gradient_contributes_nothing(
  engine, name, how, poison, row, monkeypatch
):
  """Clip factor 0 (no bound holds for it) and a clipped sum equal to the sum without it:
  one NaN pixel makes the loss NaN; one inf pixel keeps the loss finite (tanh saturates)
  but makes the gradient non-finite, on every rule of the fast engine."""
  force_norm(monkeypatch, how)
  loss_fn, params, batch = make_problem(name)
  mask = jnp.array([True] * 9 + [False] * 3)
  rngs = jax.random.split(jax.random.key(1), 12)
  bad = {**batch, "image": batch["image"].at[row, 5, 6, 0].set(poison)}
  got = jax.jit(lambda p, b: engine.clipped_sum(loss_fn, p, b, mask, rngs, CLIP))(params, bad)
  want = engine.clipped_sum(loss_fn, params, batch, mask.at[row].set(False), rngs, CLIP)
  for x in jax.tree_util.tree_leaves(got.sum_of_clipped_grads):
    assert np.all(np.isfinite(np.asarray(x)))
  assert_trees_close(got.sum_of_clipped_grads, want.sum_of_clipped_grads, atol=1e-6)
  assert float(got.clip_factors[row]) == 0.0
  assert not np.isfinite(float(got.per_example_norms[row]))
  others = np.arange(9) != row
  np.testing.assert_allclose(
    got.per_example_norms[:9][others], want.per_example_norms[:9][others], rtol=1e-5
  )
  if name == "cnn" and poison == np.inf:
    assert np.isfinite(float(got.losses[row]))  # the inf-gradient path, not a NaN loss


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


def test_dense_with_custom_dot_general_takes_the_vjp_rule():
  loss_fn, params, batch = make_problem("customdot")
  first = jax.tree_util.tree_map(lambda x: x[0], batch)
  plan = fast.discover(loss_fn, params, first, jax.random.key(0), False)
  assert [c.rule for c in plan.calls] == ["conv", "vjp"]
  mask = jnp.array([True] * 9 + [False] * 3)
  rngs = jax.random.split(jax.random.key(1), 12)
  ref = reference.clipped_sum(loss_fn, params, batch, mask, rngs, CLIP)
  got = fast.clipped_sum(loss_fn, params, batch, mask, rngs, CLIP)
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
    got = fast.clipped_sum(loss_fn, params, batch, mask, rngs, CLIP)
  ref = reference.clipped_sum(loss_fn, params, batch, mask, rngs, CLIP)
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
  for case in (first, second, strided, dense, small, dear):
    assert fast._outer_rule(*case) == "materialize"  # the per-example gradients fit
  assert fast._outer_rule(*scatter) == "gram"  # big patches, Gram much cheaper
  monkeypatch.setattr(fast, "MATERIALIZE_ELEMENTS", 0)  # they do not
  assert fast._outer_rule(*first) == "materialize"
  assert fast._outer_rule(*second) == "gram"
  assert fast._outer_rule(*strided) == "ghost"
  assert fast._outer_rule(*dense) == "ghost"


def test_conv_gram_norm_positions_match_the_patches():
  """Each (output, tap) position the Gram-matrix norm reads is the patch entry."""
  for model_name in ("pairs", "strided", "s2d", "smallmaps", "cnn"):
    loss_fn, params, batch = make_problem(model_name)
    ex = jax.tree_util.tree_map(lambda x: x[0], batch)
    plan = fast.discover(loss_fn, params, ex, jax.random.key(0), False)
    for call in plan.calls:
      if call.rule != "conv":
        continue
      a = jax.random.normal(jax.random.key(3), (3, *call.in_shape))
      ci = fast._conv_input(call, a)
      patches = np.asarray(fast._conv_patches(ci, 3))  # (B, T, K, C)
      q = fast._tap_positions(ci, 3)
      flat = np.asarray(ci.x).reshape(3, -1, ci.x.shape[-1])
      np.testing.assert_array_equal(flat[:, q], patches)
