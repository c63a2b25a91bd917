"""experiments/dp_classifier.py end to end on the tiny synthetic set (offline)."""

from __future__ import annotations

import importlib.util
import json
import struct
import sys
from pathlib import Path

import pytest

from jaxdp import accounting

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "dp_classifier.py"
TINY = ["--dataset", "synthetic", "--quick", "--model", "mlp", "--no-progress"]
TINY += [
  "--train-size",
  "1000",
  "--validation-size",
  "300",
  "--epochs",
  "2",
  "--baseline-epochs",
  "1",
]


def load_script(path: Path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through it
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def exp():
  return load_script(SCRIPT)


def event_tags(folder: Path) -> set[str]:
  """The summary tags in the TensorBoard event files of ``folder`` (TFRecord framing)."""
  from tensorboardX.proto import event_pb2

  tags = set()
  for file in folder.glob("events.out.tfevents.*"):
    raw = file.read_bytes()
    at = 0
    while at < len(raw):
      (length,) = struct.unpack("<Q", raw[at : at + 8])
      event = event_pb2.Event.FromString(raw[at + 12 : at + 12 + length])
      tags |= {v.tag for v in event.summary.value}
      at += 12 + length + 4
  return tags


def accountant_epsilon(run: dict, delta: float, accountant: str) -> float:
  event = accounting.dpsgd_event(run["sampling_prob"], run["noise_multiplier"], run["steps"])
  return accounting.epsilon(event, delta, accountant)


def test_quick_run_writes_the_run_folder(exp, tmp_path, capsys):
  metrics = exp.main([*TINY, "--out", str(tmp_path), "--name", "q", "--tensorboard"])
  out = tmp_path / "q"
  released = [
    "config.json",
    "metrics.json",
    "metrics.jsonl",
    "plots/curves.png",
    "plots/epsilon.png",
  ]
  nondp = ["README.txt", "metrics.json", "diagnostics.jsonl", "checkpoints/non-private.msgpack"]
  for name in released + [f"nondp/{n}" for n in nondp]:
    assert (out / name).is_file(), name
  config = json.loads((out / "config.json").read_text())
  assert config["quick"] and config["seed"] == 0 and config["noise"].startswith("secure")
  saved = json.loads((out / "metrics.json").read_text())
  assert saved["run_dir"] == metrics["run_dir"] == str(out)

  (run,) = saved["models"]  # only the DP model is released
  assert run["label"] == "DP-SGD eps=3" and (out / run["checkpoint"]).is_file()
  delta = saved["privacy"]["delta"]
  assert delta == 1e-5
  assert run["steps"] == run["epochs"] * round(1 / run["sampling_prob"])
  for acc in ("pld", "rdp"):  # the accountant's epsilon for the recorded q, sigma and steps
    assert run[f"epsilon_{acc}"] == accountant_epsilon(run, delta, acc)
    assert saved["privacy"][f"epsilon_{acc}"] == pytest.approx(run[f"epsilon_{acc}"], rel=1e-9)
  assert 0.95 * 3.0 <= run["epsilon"] == run["epsilon_pld"] <= 3.0
  assert run["test_accuracy"] > 0.5 and len(run["per_class_test_accuracy"]) == 10

  rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in rows] == list(range(1, run["epochs"] + 1))
  assert rows[-1]["step"] == run["steps"] and rows[-1]["epsilon_pld"] == run["epsilon_pld"]
  for r in rows:  # held-out curves and the epsilon so far; nothing of the training batches
    assert {"validation_accuracy", "validation_loss", "epsilon_rdp"} <= set(r)
    assert not any(k.startswith(("train_", "test_", "grad_norm", "clip")) for k in r)
  diagnostics = (out / "nondp" / "diagnostics.jsonl").read_text()
  assert "train_clip_fraction" in diagnostics and "train_accuracy" in diagnostics
  (base,) = json.loads((out / "nondp" / "metrics.json").read_text())["models"]
  assert not base["private"] and 0.0 <= base["test_accuracy"] <= 1.0

  assert {"DP-SGD_eps3/validation_accuracy", "DP-SGD_eps3/epsilon_rdp"} <= event_tags(
    out / "tensorboard"
  )
  nondp_tags = event_tags(out / "nondp" / "tensorboard")
  assert {"DP-SGD_eps3/train_clip_fraction", "DP-SGD_eps3/per_example_grad_norm"} <= nondp_tags

  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[-5].split()[:3] == ["model", "test", "accuracy"]
  assert lines[-3].startswith("non-private") and lines[-2].startswith("DP-SGD eps=3")
  assert lines[-1].startswith("released: epsilon")


def test_tuning_run_never_reads_the_test_set(exp, tmp_path):
  args = [*TINY, "--no-baseline", "--epochs", "2", "--no-test", "--accountant", "rdp"]
  metrics = exp.main([*args, "--target-epsilon", "1.5", "--out", str(tmp_path), "--name", "t"])
  (run,) = metrics["models"]
  assert "validation_accuracy" in run and not any(k.startswith("test_") for k in run)
  assert run["epsilon"] == run["epsilon_rdp"] == accountant_epsilon(run, 1e-5, "rdp") <= 1.5
  assert run["epsilon_pld"] <= run["epsilon_rdp"]
  assert not (tmp_path / "t" / "nondp" / "metrics.json").exists()  # no non-private model


@pytest.mark.parametrize(
  ("flags", "needle"),
  [
    (["--target-epsilon", "-1"], "--target-epsilon"),
    (["--epsilons", "1,-2"], "--epsilons"),
    (["--epsilons", "1,x"], "--epsilons"),
    (["--batch-size", "5000"], "--batch-size"),
    (["--model", "resnet"], "--model"),
    (["--clip", "0"], "--clip"),
    (["--lr", "fast"], "--lr"),
    (["--delta", "0.01"], "--delta"),
    (["--optimizer", "adam", "--momentum", "0.5"], "--momentum"),
    (["--noise-multiplier", "1", "--target-epsilon", "2"], "at most one of"),
    (["--validation-size", "2000"], "--validation-size"),
    (["--train-size", "1400"], "--train-size"),
    (["--target-epsilon", "1e-4"], "--target-epsilon"),
    (["--microbatch-size", "0"], "--microbatch-size"),
    (["--microbatch-size", "half"], "--microbatch-size"),
    (["--data-dir", "/nonexistent"], "--data-dir"),
  ],
)
def test_bad_flags_exit_with_one_line(exp, tmp_path, capsys, flags, needle):
  dataset = ["--dataset", "mnist"] if "--data-dir" in flags else []
  with pytest.raises(SystemExit) as info:
    exp.main([*TINY, "--out", str(tmp_path), *dataset, *flags])
  assert info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "error:" in err[0] and needle in err[0], err
  assert not any(tmp_path.iterdir())  # nothing written
