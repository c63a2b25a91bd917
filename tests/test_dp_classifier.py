"""experiments/dp_classifier.py end to end on the tiny synthetic set (quick mode, offline)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from jaxdp import accounting

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "dp_classifier.py"


@pytest.fixture(scope="module")
def exp():
  spec = importlib.util.spec_from_file_location("dp_classifier", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through it
  spec.loader.exec_module(module)
  return module


def _accountant_epsilon(run: dict, delta: float, accountant: str) -> float:
  event = accounting.dpsgd_event(run["sampling_prob"], run["noise_multiplier"], run["steps"])
  return accounting.epsilon(event, delta, accountant)


def test_quick_run_writes_the_run_folder(exp, tmp_path, capsys):
  metrics = exp.main(
    ["--dataset", "synthetic", "--quick", "--model", "mlp", "--out", str(tmp_path), "--name", "q"]
  )
  out = tmp_path / "q"
  for name in ("config.json", "metrics.json", "plots/curves.png", "plots/epsilon.png"):
    assert (out / name).is_file(), name
  assert len(list((out / "checkpoints").glob("*.msgpack"))) == 2
  config = json.loads((out / "config.json").read_text())
  assert config["quick"] and config["target_epsilon"] == exp.DEFAULT_TARGET_EPSILON
  saved = json.loads((out / "metrics.json").read_text())
  assert saved["run_dir"] == metrics["run_dir"] == str(out)

  (run,) = saved["private"]
  delta = saved["delta"]
  assert delta == 1e-5
  assert run["steps"] == run["epochs"] * round(1 / run["sampling_prob"])
  # The recorded epsilon is the accountant's for the recorded q, sigma and steps.
  for acc in ("pld", "rdp"):
    assert math.isfinite(run[f"epsilon_{acc}"])
    assert run[f"epsilon_{acc}"] == _accountant_epsilon(run, delta, acc)
  assert run["epsilon"] == run["epsilon_pld"] <= exp.DEFAULT_TARGET_EPSILON
  assert run["epsilon"] >= 0.95 * exp.DEFAULT_TARGET_EPSILON
  assert len(run["history"]) == run["epochs"]
  last = run["history"][-1]
  assert last["step"] == run["steps"]
  assert last["epsilon_pld"] == run["epsilon_pld"]
  assert last["epsilon_rdp"] == pytest.approx(run["epsilon_rdp"], rel=1e-6)
  assert {"train_loss", "train_accuracy", "test_accuracy", "test_loss"} <= set(last)
  assert run["test_accuracy"] > 0.5  # 10 classes: chance is 0.1

  baseline = saved["non_private"]
  assert not baseline["private"] and len(baseline["history"]) == baseline["epochs"]
  assert 0.0 <= baseline["test_accuracy"] <= 1.0

  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[-4].split()[:2] == ["model", "test"]
  assert lines[-2].startswith("non-private") and lines[-1].startswith("DP-SGD eps=3")


def test_target_epsilon_is_met_and_validation_replaces_test(exp, tmp_path):
  args = ["--dataset", "synthetic", "--quick", "--model", "mlp", "--no-baseline", "--epochs", "2"]
  args += ["--target-epsilon", "1.5", "--validation-size", "200", "--accountant", "rdp"]
  metrics = exp.main([*args, "--out", str(tmp_path), "--no-progress"])
  (run,) = metrics["private"]
  assert metrics["non_private"] is None
  assert metrics["eval_split"] == "validation" and metrics["num_train"] == 800
  assert "validation_accuracy" in run and "test_accuracy" not in run
  assert run["epsilon"] == run["epsilon_rdp"] == _accountant_epsilon(run, 1e-5, "rdp") <= 1.5
  assert run["epsilon_pld"] <= run["epsilon_rdp"]


def test_epsilon_sweep_writes_privacy_utility(exp, tmp_path):
  args = ["--dataset", "synthetic", "--quick", "--model", "mlp", "--epochs", "2"]
  args += ["--baseline-epochs", "1", "--epsilons", "1,8", "--ema", "0", "--accountant", "rdp"]
  metrics = exp.main([*args, "--out", str(tmp_path), "--name", "s", "--no-progress"])
  assert [r["target_epsilon"] for r in metrics["private"]] == [1.0, 8.0]
  for run in metrics["private"]:
    assert run["epsilon"] <= run["target_epsilon"]
  assert (tmp_path / "s" / "plots" / "privacy_utility.png").is_file()
  with (tmp_path / "s" / "privacy_utility.csv").open() as f:
    rows = list(csv.DictReader(f))
  assert [r["model"] for r in rows] == ["non-private", "DP-SGD eps=1", "DP-SGD eps=8"]
  assert float(rows[1]["epsilon_pld"]) == metrics["private"][0]["epsilon_pld"]


@pytest.mark.parametrize(
  ("flags", "needle"),
  [
    (["--target-epsilon", "-1"], "--target-epsilon"),
    (["--epsilons", "1,-2"], "--epsilons"),
    (["--batch-size", "5000"], "--batch-size"),
    (["--model", "resnet"], "--model"),
    (["--clip", "0"], "--clip"),
    (["--delta", "0.01"], "--delta"),
    (["--optimizer", "adam", "--momentum", "0.5"], "--momentum"),
    (["--noise-multiplier", "1", "--target-epsilon", "2"], "not allowed with"),
    (["--validation-size", "1000"], "--validation-size"),
    (["--microbatch-size", "0"], "--microbatch-size"),
    (["--microbatch-size", "half"], "--microbatch-size"),
  ],
)
def test_bad_flags_exit_with_one_line(exp, tmp_path, capsys, flags, needle):
  with pytest.raises(SystemExit) as info:
    exp.main(["--dataset", "synthetic", "--quick", "--out", str(tmp_path), *flags])
  assert info.value.code != 0
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "error:" in err[0] and needle in err[0], err
  assert not any(tmp_path.iterdir())  # nothing written
