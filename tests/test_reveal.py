"""jaxdp.reveal (filters, saliency, inversion, losses) and experiments/dp_reveal.py end to
end on the tiny synthetic set."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from test_dp_classifier import load_script

from jaxdp import reveal
from jaxdp.models.classifier import make_classifier

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "dp_reveal.py"


@pytest.fixture(scope="module")
def cnn():
  model = make_classifier("tf_cnn", num_classes=3, act="tanh")
  params = model.init(jax.random.key(0), np.zeros((1, 16, 16, 1), np.float32))["params"]
  return model, params


def test_filters_saliency_and_losses(cnn):
  model, params = cnn
  w = reveal.first_layer_filters(params)
  assert w.shape == (16, 8, 8)  # 16 filters of 8x8, summed over the one input channel
  rng = np.random.default_rng(0)
  x = rng.random((4, 16, 16, 1)).astype(np.float32)
  y = np.array([0, 1, 2, 0])
  s = reveal.saliency_maps(model, params, x, y)
  assert s.shape == (4, 16, 16) and np.allclose(s.max(axis=(1, 2)), 1.0) and s.min() >= 0
  logits = model.apply({"params": params}, x)
  want = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  assert np.allclose(reveal.per_example_losses(model, params, x, y, chunk=3), want, atol=1e-6)
  with pytest.raises(ValueError, match="no convolution kernel"):
    reveal.first_layer_filters({"dense": {"kernel": np.zeros((3, 2))}})


def test_inversion_raises_each_class_probability(cnn):
  model, params = cnn
  x = reveal.invert_classes(model, params, (16, 16, 1), 3, steps=60, learning_rate=0.1)
  assert x.shape == (3, 16, 16, 1) and x.min() >= 0.0 and x.max() <= 1.0
  p = jax.nn.softmax(model.apply({"params": params}, x), axis=-1)
  grey = jax.nn.softmax(model.apply({"params": params}, np.full((1, 16, 16, 1), 0.5)), axis=-1)
  for c in range(3):
    assert p[c, c] > grey[0, c]  # each reconstruction is more its class than grey is


def test_reveal_experiment_writes_its_figures(tmp_path, capsys):
  exp = load_script(SCRIPT)
  args = ["--dataset", "synthetic", "--quick", "--no-progress", "--public-size", "400"]
  args += ["--train-size", "200", "--epochs", "2", "--baseline-epochs", "2", "--batch-size", "64"]
  args += ["--inversion-steps", "5", "--out", str(tmp_path), "--name", "r", "--tensorboard"]
  metrics = exp.main(args)
  out = tmp_path / "r"
  for name in ("filters", "saliency", "member_losses", "inversion", "curves"):
    assert (out / "plots" / f"{name}.png").is_file(), name
  assert list((out / "tensorboard").glob("events.out.tfevents.*"))
  saved = json.loads((out / "metrics.json").read_text())
  assert [m["label"] for m in saved["models"]] == ["non-private", "DP-SGD eps=3"]
  assert all(0.0 <= m["loss_attack_auc"] <= 1.0 for m in metrics["models"])
  assert capsys.readouterr().out.strip().splitlines()[-1].startswith("DP-SGD eps=3")
