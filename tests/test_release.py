"""What the experiments release: secret noise, independent jobs, no private data in files.

Each test fails if its hole reopens: noise derived from the written-down seed, two models of
a sweep sharing a noise draw or a batch, a folder's epsilon that is not the composition of
its models. (No training image or batch statistic in a released file:
``test_dp_vae_synth.py::test_pipeline_accounts_every_private_use_and_releases_no_training_data``.)
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

ROOT = Path(__file__).resolve().parents[1] / "experiments"
RUN = ["--no-baseline", "--epochs", "1", "--noise-multiplier", "1"]


@pytest.fixture(scope="module")
def classifier():
  return load_script(ROOT / "dp_classifier.py")


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
def test_sweep_jobs_never_share_noise_or_batches(classifier, tmp_path, spy, insecure):
  """Every model of a sweep gets its own noise key and sampler seed, in both modes (two
  models noised with one z give (sigma_B g_A - sigma_A g_B) / (sigma_B - sigma_A), the
  noiseless sum)."""
  keys, seeds = spy(keys_lib.KeySource, "key"), spy(keys_lib.KeySource, "seed")
  flags = ["--insecure-reproducible-noise"] if insecure else []
  args = [*TINY, "--no-baseline", "--epochs", "1", "--epsilons", "2,8", "--accountant", "rdp"]
  args += ["--out", str(tmp_path), *flags]
  metrics = classifier.main(args)
  drawn = {c.arguments["name"]: np.asarray(keys_lib.jax.random.key_data(c.result)).tobytes()
           for c in keys}  # fmt: skip
  drawn |= {c.arguments["name"]: c.result.generate_state(4).tobytes() for c in seeds}
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
  assert metrics["privacy"]["epsilon_pld"] > max(m["epsilon_pld"] for m in metrics["models"])
  assert [m["label"] for m in metrics["models"]] == ["DP-SGD eps=2", "DP-SGD eps=8"]
  assert all(m["epsilon_rdp"] <= float(m["label"].split("=")[1]) for m in metrics["models"])
  assert (Path(metrics["run_dir"]) / "plots" / "privacy_utility.png").is_file()
