"""What the experiments release: secret noise, independent jobs, no private data in files.

Each test fails if its hole reopens: noise derived from the written-down seed, two models of
a sweep sharing a noise draw or a batch, a training image in a released array or figure,
exact statistics of the private batches in the released metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant
from test_dp_classifier import TINY, load_script

from jaxdp import keys as keys_lib
from jaxdp.experiment import runs, splits

ROOT = Path(__file__).resolve().parents[1] / "experiments"
RUN = ["--no-baseline", "--epochs", "1", "--noise-multiplier", "1"]


@pytest.fixture(scope="module")
def classifier():
  return load_script(ROOT / "dp_classifier.py")


@pytest.fixture(scope="module")
def vae():
  return load_script(ROOT / "dp_vae_synth.py")


def checkpoint(metrics: dict) -> bytes:
  (model,) = metrics["models"]
  return (Path(metrics["run_dir"]) / model["checkpoint"]).read_bytes()


def test_same_seed_draws_new_noise_unless_insecure_reproducible(classifier, tmp_path, capsys):
  """The seed in config.json governs the public part only: two runs with the same --seed
  release different models (fresh noise and batches from the OS); only the debugging flag
  makes them equal, and it says so on stdout and in config.json."""
  go = lambda name, *flags: classifier.main(
    [*TINY, *RUN, "--seed", "3", "--out", str(tmp_path), "--name", name, *flags]
  )
  a, b = checkpoint(go("a")), checkpoint(go("b"))
  assert a != b
  flag = "--insecure-reproducible-noise"
  c, d = checkpoint(go("c", flag)), checkpoint(go("d", flag))
  assert c == d
  assert "NO privacy guarantee" in capsys.readouterr().out
  config = json.loads((tmp_path / "c" / "config.json").read_text())
  assert config["insecure_reproducible_noise"] and config["noise"].startswith("INSECURE")
  assert json.loads((tmp_path / "a" / "config.json").read_text())["noise"].startswith("secure")


@pytest.mark.parametrize("insecure", [False, True])
def test_sweep_jobs_never_share_noise_or_batches(classifier, tmp_path, monkeypatch, insecure):
  """Every model of a sweep gets its own noise key and sampler seed, in both modes (two
  models noised with one z give (sigma_B g_A - sigma_A g_B) / (sigma_B - sigma_A), the
  noiseless sum)."""
  drawn: dict[str, bytes] = {}
  key, seed = keys_lib.KeySource.key, keys_lib.KeySource.seed

  def record_key(self, name):
    out = key(self, name)
    drawn[name] = np.asarray(keys_lib.jax.random.key_data(out)).tobytes()
    return out

  def record_seed(self, name):
    out = seed(self, name)
    drawn[name] = out.generate_state(4).tobytes()
    return out

  monkeypatch.setattr(keys_lib.KeySource, "key", record_key)
  monkeypatch.setattr(keys_lib.KeySource, "seed", record_seed)
  flags = ["--insecure-reproducible-noise"] if insecure else []
  args = [*TINY, "--no-baseline", "--epochs", "1", "--epsilons", "2,8", "--accountant", "rdp"]
  args += ["--out", str(tmp_path), *flags]
  metrics = classifier.main(args)
  names = {"DP-SGD eps=2/noise", "DP-SGD eps=8/noise", "DP-SGD eps=2/batches"}
  assert names | {"DP-SGD eps=8/batches"} <= set(drawn)
  assert len(set(drawn.values())) == len(drawn)  # no two uses share randomness
  # The folder's epsilon is dp-accounting's own composition of both models.
  pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
  for m in metrics["models"]:
    step = dp_accounting.PoissonSampledDpEvent(
      m["sampling_prob"], dp_accounting.GaussianDpEvent(m["noise_multiplier"])
    )
    pld.compose(dp_accounting.SelfComposedDpEvent(step, m["steps"]))
  assert metrics["privacy"]["epsilon_pld"] == pytest.approx(pld.get_epsilon(1e-5), rel=1e-12)


def _image_hashes(images: np.ndarray) -> set[bytes]:
  return {np.asarray(x, np.float32).tobytes() for x in images}


def _arrays_with_images(value, shape):
  """Every (H, W, C) image inside an array of any rank whose trailing axes are ``shape``."""
  a = np.asarray(value)
  if a.ndim >= 3 and a.shape[-3:] == shape:
    yield from a.reshape(-1, *shape)


def test_no_training_image_or_batch_statistic_is_released(vae, tmp_path, monkeypatch):
  """The DP-VAE pipeline (one DP job, one non-private job in nondp/): no array written
  (.npz) or plotted (image grids) holds an image of the training split (private,
  validation or public), and the released metrics hold no statistic of training batches."""
  shown = []
  plot = runs.plot_image_grids

  def record(panels, path, **kwargs):
    shown.extend(panels.values())
    return plot(panels, path, **kwargs)

  monkeypatch.setattr(runs, "plot_image_grids", record)
  args = ["--dataset", "synthetic", "--quick", "--no-progress", "--train-size", "600"]
  args += ["--validation-size", "200", "--public-size", "300", "--num-samples", "300"]
  args += ["--epochs", "1", "--classifier-epochs", "1", "--feature-epochs", "1"]
  args += ["--epsilons", "8,inf", "--dp-label-counts", "--out", str(tmp_path), "--name", "v"]
  metrics = vae.main(args)
  out = Path(metrics["run_dir"])
  s = splits.load_splits("synthetic", validation_size=200, public_size=300, train_size=600)
  training = np.concatenate(
    [
      s.private.images,
      s.validation.images,
      s.public.images,
      splits.load_splits("synthetic").private.images,
    ]
  )
  forbidden = _image_hashes(training)
  shape = training.shape[1:]
  written = [np.load(f)["images"] for f in out.rglob("*.npz")]
  assert len(written) == 2 and shown
  images = [x for arr in written + shown for x in _arrays_with_images(arr, shape)]
  assert len(images) > 600
  assert not _image_hashes(images) & forbidden
  # The grids' real column is the test set's.
  test = s.figure_examples()
  assert _image_hashes(test.images) & _image_hashes(images)

  released = (out / "metrics.json").read_text() + (out / "metrics.jsonl").read_text()
  for word in ("train_loss", "train_neg_elbo", "clip_fraction", "grad_norm"):
    assert word not in released, word
  assert "train_clip_fraction" in (out / "nondp" / "diagnostics.jsonl").read_text()
  (pipeline,) = metrics["pipelines"]
  entries = {e["name"] for e in metrics["privacy"]["ledger"]["entries"]}
  assert entries == {"DP eps=8", "DP eps=8/label_counts"}
  assert pipeline["epsilon_pld"] <= 8.0
  assert metrics["feature_network"]["trained_on"].startswith("synthetic/train[public]")
