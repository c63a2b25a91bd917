"""The DP ViT experiment: a quick run writes its folder with the accountant's epsilon, and
its model runs on the fast engine's rules with nothing on a whole-model vmap."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from test_dp_classifier import load_script

from jaxdp.clipping import fast
from jaxdp.models.classifier import classifier_loss, make_classifier

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "dp_vit.py"


def test_vit_takes_the_fast_rules_with_nothing_left_to_vmap():
  model = make_classifier("vit", 10, act="gelu", patch=7, dim=16, depth=1, heads=2, mlp=16)
  x = jnp.zeros((1, 28, 28, 1))
  params = model.init(jax.random.key(0), x)["params"]
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no parameter left to the whole-model vmap
    plan = fast.discover(classifier_loss(model), params, {"image": x[0], "label": jnp.asarray(0)},
                         jax.random.key(0), True)  # fmt: skip
  # patch embedding, q/k/v/out projections, MLP x2, head: dense; positions: embed;
  # 3 LayerNorms: the norm rule
  assert plan.summary() == {"dense": 8, "embed": 1, "norm": 3, "vmap_leaves": 0}


def test_scatter_vit_has_a_token_per_scattering_position_and_the_fast_rules():
  """--model scatter_vit: the 7x7 grid of 81 ScatterNet features is 49 tokens of 81, the
  model normalises them itself (no statistic of the data) and takes the same rules."""
  from jaxdp.experiment import tasks

  model = tasks.make_classifier("scatter_vit", 10, "gelu", dim=16, depth=1, heads=2, mlp=16)
  x = jax.random.normal(jax.random.key(1), (1, 7, 7, 81))
  params = model.init(jax.random.key(0), x)["params"]
  vit = params["ViT_0"]
  assert vit["Embed_0"]["embedding"].shape == (49, 16)  # one position per grid cell
  assert vit["Dense_0"]["kernel"].shape == (81, 16)  # a token is one cell's 81 features
  # The features enter normalised per example: scaling an example's input changes nothing.
  logits = lambda z: model.apply({"params": params}, z)
  assert jnp.allclose(logits(x), logits(3.0 * x + 1.0), atol=1e-4)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    plan = fast.discover(classifier_loss(model), params, {"image": x[0], "label": jnp.asarray(0)},
                         jax.random.key(0), True)  # fmt: skip
  assert plan.summary() == {"dense": 8, "embed": 1, "norm": 3, "vmap_leaves": 0}


@pytest.mark.slow
def test_quick_run_writes_the_run_folder(tmp_path):
  exp = load_script(SCRIPT)
  flags = ["--dataset", "synthetic", "--quick", "--no-progress", "--train-size", "800",
           "--validation-size", "200", "--epochs", "2", "--batch-size", "200",
           "--baseline-epochs", "1", "--dim", "16", "--heads", "2", "--mlp", "16",
           "--depth", "1", "--out", str(tmp_path), "--name", "v"]  # fmt: skip
  metrics = exp.main(flags)
  out = tmp_path / "v"
  for name in ("config.json", "metrics.json", "plots/curves.png", "nondp/metrics.json"):
    assert (out / name).is_file(), name
  (run,) = metrics["models"]
  assert run["label"] == "DP-SGD eps=3" and run["epsilon_pld"] <= 3.0
  assert run["steps"] == 2 * round(1 / run["sampling_prob"])
  config = json.loads((out / "config.json").read_text())
  assert config["model"] == "vit" and config["dim"] == 16


def test_bad_architecture_flags_fail_in_one_line(capsys):
  exp = load_script(SCRIPT)
  for flags, message in ((["--dim", "10", "--heads", "4"], "--heads must divide --dim"),
                         (["--patch", "5"], "--patch must divide the image side 28")):  # fmt: skip
    with pytest.raises(SystemExit):
      exp.main(flags)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
