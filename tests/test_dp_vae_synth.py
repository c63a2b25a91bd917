"""The conditional VAE, synthetic datasets, feature-network FID and the dp_vae_synth pipeline."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg
from conftest import tiny_vae

from jaxdp import accounting, data, synth
from jaxdp.experiment import runs, splits, tasks
from jaxdp.metrics import feature_scores, feature_statistics, frechet_distance, inception_score
from jaxdp.models import MLP
from jaxdp.models.vae import ConditionalVAE, evaluate_elbo, sample_images, vae_loss
from jaxdp.step import DPConfig, make_step

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "dp_vae_synth.py"


def tiny_batch(n: int = 9, seed: int = 0) -> dict[str, jax.Array]:
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {
    "image": jax.random.uniform(k1, (n, 12, 12, 1)),
    "label": jax.random.randint(k2, (n,), 0, 5),
  }


def init_params(model: ConditionalVAE, batch: dict[str, jax.Array]):
  key = jax.random.key(1)
  return jax.jit(model.init)(key, batch["image"][:1], batch["label"][:1], key)["params"]


@pytest.fixture(scope="module")
def exp():
  spec = importlib.util.spec_from_file_location("dp_vae_synth", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through it
  spec.loader.exec_module(module)
  return module


# -- the model ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("decoder", ["bernoulli", "gaussian"])
def test_per_example_elbo_vmapped_equals_one_at_a_time(decoder):
  model, batch = tiny_vae(decoder), tiny_batch()
  params = init_params(model, batch)
  loss_fn = vae_loss(model, beta=0.5)
  one_at_a_time = jax.jit(loss_fn)
  keys = jax.random.split(jax.random.key(3), 9)
  vmapped, aux = jax.jit(jax.vmap(loss_fn, in_axes=(None, 0, 0)))(params, batch, keys)
  for i in range(9):
    one = {"image": batch["image"][i], "label": batch["label"][i]}
    loss_i, aux_i = one_at_a_time(params, one, keys[i])
    np.testing.assert_allclose(vmapped[i], loss_i, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(aux["neg_elbo"][i], aux_i["nll"] + aux_i["kl"], rtol=1e-5)
    np.testing.assert_allclose(loss_i, aux_i["nll"] + 0.5 * aux_i["kl"], rtol=1e-5)
    assert aux_i["kl"] >= 0
  # The DP step (fast engine) sees the same per-example losses, one key per example.
  privacy = DPConfig(l2_norm_clip=1.0, noise_multiplier=1.0)
  step = make_step(loss_fn, optax.sgd(0.1), privacy, expected_batch_size=9, has_aux=True)
  rng = jax.random.key(4)
  cs = jax.jit(step.clipped_sum)(params, batch, jnp.ones(9, bool), rng)
  step_keys = jax.random.split(rng, 9)
  expected = [
    one_at_a_time(params, {"image": batch["image"][i], "label": batch["label"][i]}, step_keys[i])[0]
    for i in range(9)
  ]
  np.testing.assert_allclose(cs.losses, np.array(expected), rtol=1e-5, atol=1e-4)
  # The reparameterisation noise comes from the example's key: another key, another loss.
  other = one_at_a_time(params, {"image": batch["image"][0], "label": batch["label"][0]}, keys[1])
  other = other[0]
  assert float(other) != float(vmapped[0])


@pytest.mark.slow
@pytest.mark.parametrize("decoder", ["bernoulli", "gaussian"])
def test_loss_equals_the_elbo_of_the_decoded_image_in_raster_order(decoder):
  # The loss pairs the decoder output with the image in the decoder's sub-pixel order; the
  # negative ELBO written plainly on decode()'s raster image (optax's BCE) must agree.
  model, batch = tiny_vae(decoder), tiny_batch()
  params = init_params(model, batch)
  loss_fn = jax.jit(vae_loss(model))
  v = {"params": params}
  for i in range(4):
    x, y, key = batch["image"][i : i + 1], batch["label"][i : i + 1], jax.random.key(10 + i)
    mu, logvar = model.apply(v, x, y, method=ConditionalVAE.encode)
    z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(key, mu.shape)
    out = model.apply(v, z, y, method=ConditionalVAE.decode)
    assert out.shape == x.shape
    if decoder == "bernoulli":
      nll = jnp.sum(optax.sigmoid_binary_cross_entropy(out, x))
    else:
      s = model.apply(v, method=ConditionalVAE.decoder_log_scale)
      nll = jnp.sum(0.5 * jnp.square((x - out) / jnp.exp(s)) + s + 0.5 * jnp.log(2 * jnp.pi))
    prior = model.apply(v, y, method=ConditionalVAE.prior_mean)
    kl = 0.5 * jnp.sum(jnp.exp(logvar) + jnp.square(mu - prior) - 1.0 - logvar)
    _, aux = loss_fn(params, {"image": x[0], "label": y[0]}, key)
    np.testing.assert_allclose(aux["nll"], nll, rtol=1e-5)
    np.testing.assert_allclose(aux["neg_elbo"], nll + kl, rtol=1e-5)


@pytest.mark.slow
def test_sampling_and_elbo_evaluation():
  model, batch = tiny_vae("gaussian"), tiny_batch(n=7)
  params = init_params(model, batch)
  labels = jnp.array([0, 1, 2, 3, 4, 0, 1])
  images = sample_images(model, params, labels, jax.random.key(5), temperature=0.7, chunk_size=3)
  assert images.shape == (7, 12, 12, 1) and images.dtype == jnp.float32
  assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
  again = sample_images(model, params, labels, jax.random.key(5), temperature=0.7, chunk_size=4)
  np.testing.assert_allclose(images, again, atol=1e-6)  # chunking does not change samples
  res = evaluate_elbo(
    model, params, batch["image"], batch["label"], jax.random.key(0), chunk_size=4
  )
  loss_fn = jax.jit(vae_loss(model))
  keys = jax.random.split(jax.random.key(0), 7)
  per_ex = [
    loss_fn(params, {"image": batch["image"][i], "label": batch["label"][i]}, keys[i])[0]
    for i in range(7)
  ]
  assert res["neg_elbo"] == pytest.approx(float(np.mean(per_ex)), rel=1e-5)
  with pytest.raises(ValueError, match="temperature"):
    sample_images(model, params, labels, jax.random.key(5), temperature=0.0)


# -- synthetic datasets ------------------------------------------------------------------


def test_class_counts_and_labels():
  counts = synth.class_counts(10, 3)
  assert counts.sum() == 10 and sorted(counts.tolist()) == [3, 3, 4]
  counts = synth.class_counts(100, 3, np.array([0.5, 0.3, 0.2]))
  assert counts.tolist() == [50, 30, 20]
  counts = synth.class_counts(7, 3, np.array([1.0, 1.0, 0.0]))
  assert counts.sum() == 7 and counts[2] == 0
  labels = synth.labels_for_counts(np.array([2, 0, 3]), seed=1)
  assert labels.dtype == np.int32 and np.bincount(labels, minlength=3).tolist() == [2, 0, 3]
  with pytest.raises(ValueError, match="proportions"):
    synth.class_counts(10, 3, np.array([1.0, -1.0, 0.5]))


def test_dp_label_proportions_are_noised_and_recorded():
  labels = np.repeat(np.arange(4), [100, 200, 300, 400]).astype(np.int32)
  ledger = accounting.PrivacyLedger()
  p, noisy = synth.dp_label_proportions(labels, 4, 5.0, ledger, seed=0)
  assert p.shape == (4,) and p.sum() == pytest.approx(1.0)
  assert not np.allclose(noisy, [100, 200, 300, 400])  # noised
  np.testing.assert_allclose(noisy, [100, 200, 300, 400], atol=5 * 5)
  (entry,) = ledger.entries()
  assert entry["kind"] == "gaussian" and entry["noise_multiplier"] == 5.0
  expected = accounting.epsilon(dp_accounting.GaussianDpEvent(5.0), 1e-5, "rdp")
  assert ledger.epsilon(1e-5, "rdp") == pytest.approx(expected)


def test_sample_dataset_and_npz_roundtrip(tmp_path):
  def generator(labels, key):
    del key
    return jnp.broadcast_to(
      jnp.asarray(labels, jnp.float32)[:, None, None, None] / 4, (len(labels), 6, 6, 1)
    )

  ds = synth.sample_dataset(generator, 11, 5, jax.random.key(0), seed=3)
  assert len(ds) == 11 and ds.images.shape == (11, 6, 6, 1)
  np.testing.assert_allclose(ds.images[:, 0, 0, 0], ds.labels / 4)  # each image has its label
  path = synth.save_npz(tmp_path / "s.npz", ds)
  back = synth.load_npz(path)
  np.testing.assert_array_equal(back.images, ds.images)
  np.testing.assert_array_equal(back.labels, ds.labels)
  assert back.num_classes == 5 and back.images.dtype == np.float32


def test_random_shifts_move_each_image_by_at_most_max_shift():
  images = np.zeros((50, 7, 7, 1), np.float32)
  images[:, 3, 3, 0] = 1.0  # one bright pixel in the middle
  ds = data.Dataset(images, np.arange(50, dtype=np.int32) % 3, 3, "dots")
  shifted = data.random_shifts(ds, 2, seed=0)
  assert shifted.images.shape == images.shape and shifted.images.dtype == np.float32
  np.testing.assert_array_equal(shifted.labels, ds.labels)
  where = np.array([np.argwhere(im[..., 0])[0] for im in shifted.images])
  assert np.abs(where - 3).max() == 2 and len({tuple(w) for w in where}) > 10
  assert data.random_shifts(ds, 0) is ds
  with pytest.raises(ValueError, match="max_shift"):
    data.random_shifts(ds, 7)


# -- feature-network FID and IS ----------------------------------------------------------


def test_frechet_distance_matches_the_sqrtm_formula():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(200, 6)), rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 0.5
  (m1, c1), (m2, c2) = feature_statistics(a), feature_statistics(b)
  covmean = scipy.linalg.sqrtm(c1 @ c2).real
  expected = np.sum((m1 - m2) ** 2) + np.trace(c1 + c2 - 2 * covmean)
  assert frechet_distance(m1, c1, m2, c2) == pytest.approx(expected, rel=1e-6)
  assert frechet_distance(m2, c2, m1, c1) == pytest.approx(expected, rel=1e-6)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise():
  ds = data.synthetic_dataset(400, seed=0)
  model = MLP(num_classes=10, hidden=(32,))
  params = jax.jit(model.init)(jax.random.key(0), ds.images[:1])["params"]
  same = feature_scores(model, params, ds.images, ds.images, chunk_size=150)
  assert abs(same["fid"]) < 1e-6 * max(1.0, same["inception_score"])
  rng = np.random.default_rng(0)
  fids = []
  for noise in (0.05, 0.2, 0.5):
    noised = np.clip(ds.images + noise * rng.normal(size=ds.images.shape), 0, 1)
    fids.append(feature_scores(model, params, ds.images, noised.astype(np.float32))["fid"])
  assert 0 < fids[0] < fids[1] < fids[2]
  assert 1.0 <= same["inception_score"] <= 10.0


def test_inception_score_limits():
  confident = np.eye(4)[np.arange(8) % 4] * 50.0
  assert inception_score(confident) == pytest.approx(4.0, rel=1e-6)
  assert inception_score(np.zeros((8, 4))) == pytest.approx(1.0)


# -- the experiment ----------------------------------------------------------------------


def _image_hashes(images) -> set[bytes]:
  return {np.asarray(x, np.float32).tobytes() for x in images}


def test_pipeline_accounts_every_private_use_and_releases_no_training_data(
  exp, tmp_path, capsys, spy
):
  """A DP pipeline (noisy label counts + DP-VAE): every private use in the ledger and the
  noise calibrated to it; no array written (.npz) or plotted (image grids) holds an image of
  the training split (private, validation or public); no statistic of the training batches
  is in the released metrics."""
  grids, fits = spy(runs, "plot_image_grids"), spy(tasks, "fit")
  args = ["--dataset", "synthetic", "--quick", "--out", str(tmp_path), "--name", "q"]
  args += ["--public-pretrain-epochs", "1"]
  args += ["--train-size", "800", "--validation-size", "200", "--public-size", "300"]
  args += ["--epochs", "2", "--classifier-epochs", "2", "--feature-epochs", "1"]
  args += ["--dp-label-counts", "--label-noise-multiplier", "20", "--accountant", "rdp"]
  args += ["--target-epsilon", "4", "--images-per-class", "3", "--no-progress"]
  args += ["--num-samples", "400"]
  metrics = exp.main(args)
  seen = {c.arguments["label"]: np.asarray(c.arguments["train_data"]["image"]) for c in fits}
  shown = [panel for c in grids for panel in c.arguments["panels"].values()]
  out = tmp_path / "q"
  (run,) = metrics["pipelines"]
  released = ["config.json", "metrics.json", "plots/synthetic_grid.png", "plots/elbo.png"]
  for name in [*released, "nondp/diagnostics.jsonl"]:
    assert (out / name).is_file(), name
  assert (out / run["vae_checkpoint"]).is_file()
  saved = json.loads((out / "metrics.json").read_text())
  assert saved["run_dir"] == str(out)

  with np.load(out / run["synthetic_npz"]) as f:
    images, labels = f["images"], f["labels"]
  assert images.shape == (400, 28, 28, 1) and images.dtype == np.float32
  assert images.min() >= 0.0 and images.max() <= 1.0
  assert labels.dtype == np.int32 and labels.min() >= 0 and labels.max() < 10
  # The classes follow the noisy counts (the first 400 of 440 labels, held-out ones after).
  noisy = np.maximum(np.array(run["noisy_counts"]), 0)
  expected = synth.class_counts(440, 10, noisy / noisy.sum())
  assert np.all(np.bincount(labels, minlength=10) <= expected)

  # Every private use is in the pipeline's ledger, and its epsilon is the ledger's total.
  ledger = accounting.PrivacyLedger.from_dict(run["ledger"])
  kinds = {e["name"]: e for e in ledger.entries()}
  assert set(kinds) == {"label_counts", "vae"}
  assert kinds["label_counts"]["noise_multiplier"] == 20.0
  vae = run["vae"]
  assert kinds["vae"]["steps"] == vae["steps"] == 2 * round(1 / vae["sampling_prob"])
  delta = saved["privacy"]["delta"]
  assert run["epsilon_rdp"] == ledger.epsilon(delta, "rdp") <= 4.0
  assert run["epsilon_rdp"] >= 0.95 * 4.0  # the noise was calibrated for the whole ledger
  assert run["epsilon_pld"] == ledger.epsilon(delta, "pld") <= run["epsilon_rdp"]
  vae_alone = accounting.epsilon(
    accounting.dpsgd_event(vae["sampling_prob"], vae["noise_multiplier"], vae["steps"]),
    delta,
    "rdp",
  )
  assert vae_alone < run["epsilon_rdp"]  # the label counts cost something
  # The folder releases one pipeline: its composed epsilon is the pipeline's, from the run's
  # ledger.
  entries = {e["name"] for e in saved["privacy"]["ledger"]["entries"]}
  assert entries == {"DP eps=4", "DP eps=4/label_counts"}
  assert saved["privacy"]["epsilon_rdp"] == pytest.approx(run["epsilon_rdp"], rel=1e-9)

  assert len(run["vae_history"]) == 2
  assert {"validation_neg_elbo", "epsilon_rdp"} <= set(run["vae_history"][-1])
  down = run["downstream"]
  assert 0.0 <= down["test_accuracy"] <= 1.0 and 0.0 <= down["validation_accuracy"] <= 1.0
  assert down["selected_epoch"] in (1, 2) and len(down["per_class_test_accuracy"]) == 10
  assert math.isfinite(run["fid"]) and run["fid"] >= -1e-6
  assert 1.0 <= run["inception_score"] <= 10.0
  assert saved["feature_network"]["trained_on"].startswith("synthetic/train[public]")
  # the public pretraining saw exactly the public partition (and cost nothing: the ledger
  # above holds the label counts and the VAE only)
  public_split = splits.load_splits("synthetic", validation_size=200, public_size=300,
                                    train_size=800).public  # fmt: skip
  np.testing.assert_array_equal(seen["VAE public pretraining"], public_split.images)

  # No training image anywhere in what was written or plotted; the grids' real column is
  # the test set's.
  s = splits.load_splits("synthetic", validation_size=200, public_size=300, train_size=800)
  training = np.concatenate([s.private.images, s.validation.images, s.public.images])
  written = [np.load(f)["images"] for f in out.rglob("*.npz")]
  assert len(written) == 1 and len(shown) == 2  # the grid: real (test set) and synthetic
  drawn = [x for arr in written + shown for x in np.asarray(arr).reshape(-1, *training.shape[1:])]
  assert not _image_hashes(drawn) & _image_hashes(training)
  assert _image_hashes(drawn) & _image_hashes(s.figure_examples().images)
  everything = splits.load_splits("synthetic").private.images  # the whole training split
  assert not _image_hashes(drawn) & _image_hashes(everything)
  text = (out / "metrics.json").read_text() + (out / "metrics.jsonl").read_text()
  for word in ("train_loss", "train_neg_elbo", "clip_fraction", "grad_norm"):
    assert word not in text, word
  assert "train_clip_fraction" in (out / "nondp" / "diagnostics.jsonl").read_text()
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[-5].split()[:2] == ["VAE", "downstream"] and lines[-3].startswith("DP eps=4")
  # the VAE started from the public data: beside it, what the public data alone gives
  assert lines[-1].startswith("public-only baseline (300 public examples): test accuracy")
  assert 0.0 <= metrics["public_only_baseline"]["test_accuracy"] <= 1.0


@pytest.mark.parametrize(
  ("flags", "needle"),
  [
    (["--epsilons", "1,-2"], "--epsilons"),
    (["--temperature", "0"], "--temperature"),
    (["--no-dp", "--target-epsilon", "2"], "--no-dp takes no"),
    (["--decoder", "laplace"], "--decoder"),
    (["--decoder-widths", "8,8,8"], "--decoder-widths"),
    (["--batch-size", "5000"], "--batch-size"),
    (["--public-size", "1500"], "--public-size"),
    (["--delta", "0.01"], "--delta"),
    (["--microbatch-size", "-4"], "--microbatch-size"),
    (["--public-size", "0", "--public-pretrain-epochs", "3"], "--public-pretrain-epochs needs"),
  ],
)
def test_bad_flags_exit_with_one_line(exp, tmp_path, capsys, flags, needle):
  with pytest.raises(SystemExit) as info:
    sizes = ["--train-size", "800", "--validation-size", "200", "--public-size", "300"]
    exp.main(["--dataset", "synthetic", "--quick", *sizes, "--out", str(tmp_path), *flags])
  assert info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "error:" in err[0] and needle in err[0], err
  assert not any(tmp_path.iterdir())  # nothing written
