"""The latent route: the public autoencoder sees the public partition only, codes are
per-image functions, the latent generators sample per label, and the experiment writes its
folder with the public-only baseline beside the route."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_dp_classifier import load_script

from jaxdp import accounting
from jaxdp.experiment import splits, tasks
from jaxdp.models import latent

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "dp_latent_synth.py"


@pytest.fixture(scope="module")
def ae():
  model = latent.Autoencoder(image_shape=(12, 12, 1), code_dim=3, width=4)
  k = jax.random.key(0)
  params = model.init(k, jnp.zeros((1, 12, 12, 1)), k)["params"]
  images = jax.random.uniform(jax.random.key(1), (7, 12, 12, 1))
  return model, params, images


def test_codes_are_functions_of_their_own_image(ae):
  model, params, images = ae
  for codes_of in (
    lambda x: latent.encode(model, params, x, chunk=4),
    lambda x: latent.invert(model, params, x, steps=5, chunk=4),
  ):
    codes = codes_of(images)
    assert codes.shape == (7, 3)
    other = codes_of(images.at[1:].set(0.5))  # every other image changed
    np.testing.assert_allclose(np.asarray(other[0]), np.asarray(codes[0]), atol=1e-5)
  decoded = latent.decode(model, params, codes, chunk=4)
  assert decoded.shape == (7, 12, 12, 1) and 0 <= float(decoded.min()) <= float(decoded.max()) <= 1


def test_latent_vae_loss_and_samples():
  model = latent.LatentVAE(code_dim=3, num_classes=4, latent_dim=2, hidden=(8,))
  k = jax.random.key(0)
  params = model.init(k, jnp.zeros((1, 3)), jnp.zeros((1,), jnp.int32), k)["params"]
  example = {"code": jnp.ones(3), "label": jnp.int32(2)}
  value, aux = latent.latent_vae_loss(model)(params, example, k)
  assert np.isfinite(float(value)) and float(aux["neg_elbo"]) == pytest.approx(float(value))
  codes = latent.sample_codes(model, params, jnp.array([0, 1, 3]), k)
  assert codes.shape == (3, 3)
  vae = latent.Autoencoder(image_shape=(12, 12, 1), code_dim=3, width=4, variational=True)
  p = vae.init(k, jnp.zeros((1, 12, 12, 1)), k)["params"]
  value, aux = latent.autoencoder_loss(vae)(p, {"image": jnp.full((12, 12, 1), 0.5)}, k)
  assert float(value) > float(aux["reconstruction"])  # the KL term is in the loss


def fitted_data(fits) -> dict[str, np.ndarray]:
  """The images (autoencoder) or codes (latent generators) each ``tasks.fit`` call trained
  on, by its label."""
  data = {c.arguments["label"]: c.arguments["train_data"] for c in fits}
  return {label: np.asarray(d.get("image", d.get("code"))) for label, d in data.items()}


def test_the_public_autoencoder_never_sees_a_private_example(tmp_path, spy):
  exp = load_script(SCRIPT)
  fits, loads = spy(tasks, "fit"), spy(tasks, "load_data")
  flags = ["--dataset", "synthetic", "--quick", "--no-progress", "--train-size", "800"]
  flags += ["--validation-size", "300", "--public-size", "300", "--epochs", "2"]
  flags += ["--ae-epochs", "2", "--batch-size", "200", "--num-samples", "500"]
  flags += ["--classifier-epochs", "1", "--feature-epochs", "1", "--code-dim", "8"]
  flags += ["--hidden", "32", "--out", str(tmp_path), "--name", "l"]
  flags += ["--public-pretrain-epochs", "1"]
  metrics = exp.main(flags)
  seen = fitted_data(fits)
  (splits,) = [c.result for c in loads]
  private = {row.tobytes() for row in np.asarray(splits.private.images)}
  public = np.asarray(splits.public.images)
  assert not any(row.tobytes() in private for row in public)  # disjoint sets
  ae_data = seen["public autoencoder"]
  np.testing.assert_array_equal(ae_data, public)  # exactly the public partition
  assert not any(row.tobytes() in private for row in ae_data)
  assert seen["DP eps=10"].shape == (len(splits.private), 8)  # the generator: codes only
  # its public pretraining: the public partition's codes, nothing private
  assert seen["DP eps=10 public pretraining"].shape == (len(public), 8)
  out = tmp_path / "l"
  for name in ("config.json", "metrics.json", "plots/synthetic_grid.png"):
    assert (out / name).is_file(), name
  (p,) = metrics["pipelines"]
  (event,) = p["ledger"]["entries"]  # the generator alone: the autoencoder costs nothing
  assert event["name"] == "generator" and event["steps"] == p["generator"]["steps"]
  base = metrics["public_only_baseline"]
  assert 0.0 <= base["test_accuracy"] <= 1.0 and (out / p["synthetic_npz"]).is_file()
  # as many rows (repeated public images, each copy shifted anew) as the synthetic set
  assert base["training_rows"] == p["num_samples"] > base["public_examples"]
  mixed = p["downstream_with_public"]  # the synthetic set plus the public training images
  assert mixed["training_rows"] == p["num_samples"] + base["public_examples"]
  assert 0.0 <= mixed["test_accuracy"] <= 1.0


def test_the_latent_gan_pretrains_on_public_codes_and_charges_each_critic_step_once(tmp_path, spy):
  exp = load_script(SCRIPT)
  fits, gans = spy(tasks, "fit"), spy(tasks, "fit_gan")
  flags = ["--dataset", "synthetic", "--quick", "--no-progress", "--train-size", "800"]
  flags += ["--validation-size", "300", "--public-size", "300", "--epochs", "2"]
  flags += ["--ae-epochs", "2", "--batch-size", "200", "--num-samples", "500"]
  flags += ["--classifier-epochs", "1", "--feature-epochs", "1", "--code-dim", "8"]
  flags += ["--hidden", "32", "--out", str(tmp_path), "--name", "g", "--generator", "gan"]
  flags += ["--public-pretrain-epochs", "1", "--critic-steps", "2"]
  metrics = exp.main(flags)
  seen = fitted_data(fits)
  # The logistic loss keeps the per-class score bias: each class's real-vs-fake log-odds.
  assert [c.arguments["critic"].class_bias for c in gans] == [True]
  (p,) = metrics["pipelines"]
  critic = p["generator"]
  assert critic["steps"] == 2 * round(1 / critic["sampling_prob"]) == 8
  assert critic["generator_steps"] == critic["steps"] // 2
  (event,) = p["ledger"]["entries"]  # the critic's private steps alone
  assert event["name"] == "critic" and event["steps"] == critic["steps"]
  want = accounting.epsilon(
    accounting.dpsgd_event(critic["sampling_prob"], critic["noise_multiplier"], critic["steps"]),
    1e-5,
  )
  assert p["epsilon_pld"] == pytest.approx(want, rel=1e-9) and p["epsilon_pld"] <= 10.0
  # its public pretraining (critic and generator, no noise): the public codes, then the
  # private steps on the private codes
  public = splits.load_splits("synthetic", validation_size=300, public_size=300, train_size=800)
  assert seen["DP eps=10 public pretraining"].shape == (len(public.public), 8)
  assert seen["DP eps=10"].shape == (len(public.private), 8)
  config = json.loads((tmp_path / "g" / "config.json").read_text())
  assert config["gradient_penalty_resolved"] == 0.0 and config["loss"] == "logistic"
  for name in ("metrics.json", "plots/synthetic_grid.png", "plots/generator_loss.png"):
    assert (tmp_path / "g" / name).is_file(), name
