"""experiments/dp_audit.py end to end on the tiny synthetic set: the broken mechanisms are
flagged, the correct one holds, the folder holds the table, ROC and raw scores."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from test_dp_classifier import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "dp_audit.py"
TINY = ["--dataset", "synthetic", "--quick", "--model", "mlp", "--no-progress"]
TINY += ["--train-size", "600", "--public-size", "400", "--batch-size", "100", "--epochs", "3"]
TINY += [
  "--canaries",
  "300",
  "--epsilons",
  "1",
  "--broken-epochs",
  "6",
  "--insecure-reproducible-noise",
]
TINY += ["--mia-models", "4", "--mia-epochs", "2", "--mia-batch-size", "100", "--mia-epsilons", "3"]


@pytest.fixture(scope="module")
def exp():
  return load_script(SCRIPT)


def test_audit_flags_broken_mechanisms_and_writes_its_folder(exp, tmp_path, capsys):
  metrics = exp.main([*TINY, "--out", str(tmp_path), "--name", "a"])
  out = tmp_path / "a"
  for name in ("config.json", "metrics.json", "scores.npz", "plots/roc.png"):
    assert (out / name).is_file(), name
  rows = {r["mechanism"]: r for r in metrics["white_box"]}
  assert set(rows) == {"correct", "no_clipping", "noise_divided_by_batch"}
  assert not rows["correct"]["flagged"]
  assert rows["correct"]["epsilon"] <= rows["correct"]["claimed_epsilon"]
  for kind in ("no_clipping", "noise_divided_by_batch"):
    assert rows[kind]["flagged"] and rows[kind]["epsilon"] > rows[kind]["claimed_epsilon"]
  saved = json.loads((out / "metrics.json").read_text())
  assert saved["privacy"]["ledger"]["entries"] == []  # nothing private is released
  levels = [r["level"] for r in saved["membership_inference"]]
  assert levels == ["non-private", "DP eps=3"]
  for r in saved["membership_inference"]:
    for attack in ("loss threshold", "LiRA online", "LiRA offline"):
      assert 0.0 <= r[attack]["auc"] <= 1.0 and 0.0 <= r[attack]["tpr_at_0.1%"] <= 1.0
  scores = np.load(out / "scores.npz")
  assert scores["canary_scores_0"].shape == (300,) and scores["mia_member_0"].shape == (4 * 400,)
  lines = capsys.readouterr().out.splitlines()
  assert any(line.startswith("no_clipping") and line.rstrip().endswith("flagged") for line in lines)


@pytest.mark.parametrize(
  ("flags", "needle"),
  [
    (["--mia-models", "5"], "--mia-models must be an even number >= 4"),
    (["--amplitude", "0.5"], "--amplitude must be >= 1"),
    (["--epsilons", "inf"], "--epsilons and --mia-epsilons must be finite"),
  ],
)
def test_bad_flags_exit_with_one_line(exp, capsys, flags, needle):
  with pytest.raises(SystemExit):
    exp.main(flags)
  err = capsys.readouterr().err.strip().splitlines()
  assert needle in err[-1]


def test_a_killed_audit_resumes_from_its_finished_runs(exp, tmp_path, monkeypatch):
  """--checkpoint-every keeps each finished canary run; --resume reads it back instead of
  running it again, and runs the rest."""
  flags = [*TINY, "--no-mia", "--seeds", "1", "--checkpoint-every", "1"]
  flags += ["--out", str(tmp_path), "--name", "k"]
  real = exp.audit.white_box_audit
  done: list[str] = []

  def dies_on_the_second(*args, **kwargs):
    if done:
      raise KeyboardInterrupt  # the process is killed during the second run
    done.append(kwargs["label"])
    return real(*args, **kwargs)

  monkeypatch.setattr(exp.audit, "white_box_audit", dies_on_the_second)
  with pytest.raises(KeyboardInterrupt):
    exp.main(flags)
  kept = list((tmp_path / "k" / "nondp" / "resume").glob("*.pickle"))
  assert len(kept) == 1 and done == ["correct eps=1 run 1"]
  first = pickle.loads(kept[0].read_bytes())

  def never_twice(*args, **kwargs):
    assert kwargs["label"] not in done, "a finished run ran again"
    done.append(kwargs["label"])
    return real(*args, **kwargs)

  monkeypatch.setattr(exp.audit, "white_box_audit", never_twice)
  metrics = exp.main([*flags, "--resume", str(tmp_path / "k")])
  rows = metrics["white_box"]
  assert [r["label"] for r in rows] == done  # each run exactly once over both sittings
  assert rows[0]["epsilon"] == first["epsilon"] and rows[0]["correct"] == first["correct"]
  assert [r["flagged"] for r in rows] == [False, True, True]
  assert not (tmp_path / "k" / "nondp" / "resume").exists()  # deleted once complete
