"""Studies: the released privacy composes every DP cell, non-DP cells stay in nondp/, a
finished cell is never rerun, a failing one is named, the statistics over seeds and the
mode-coverage measures are right, and both study scripts write complete folders."""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant
from test_dp_classifier import load_script

from jaxdp import accounting
from jaxdp.experiment import study
from jaxdp.metrics import mode_coverage

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
TINY = ("--train-size 600 --validation-size 200 --public-size 300 --epochs 2 --batch-size 150 "
        "--num-samples 300 --classifier-epochs 1 --feature-epochs 1")  # fmt: skip


def _ledger(q, sigma, steps):
  ledger = accounting.PrivacyLedger()
  ledger.add_dpsgd("model", q, sigma, steps)
  return ledger.to_dict()


def test_study_privacy_composes_every_dp_cell():
  rows = [
    {"cell": "a", "private": True, "ledger": _ledger(0.01, 1.1, 300)},
    {"cell": "b", "private": True, "ledger": _ledger(0.02, 0.8, 200)},
    {"cell": "c", "private": False, "ledger": None},
  ]
  ledger = study.study_ledger(rows)
  assert [e["name"] for e in ledger.entries()] == ["a/model", "b/model"]
  events = [
    dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), n
    )
    for q, s, n in ((0.01, 1.1, 300), (0.02, 0.8, 200))
  ]
  pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
  for event in events:
    pld.compose(event)
  eps = ledger.epsilon(1e-5, "pld")
  assert eps == pytest.approx(pld.get_epsilon(1e-5), rel=1e-9)
  single = [study.study_ledger([r]).epsilon(1e-5, "pld") for r in rows[:2]]
  assert eps > max(single)  # the study costs more than any one cell


def test_aggregate_over_seeds_skips_missing_values_and_counts_divergence():
  rows = [
    {"g": "x", "acc": 0.5, "fid": 1.0, "diverged": False},
    {"g": "x", "acc": 0.7, "fid": float("nan"), "diverged": True},
    {"g": "y", "acc": None, "fid": 2.0, "diverged": False},
  ]
  x, y = study.aggregate(rows, ("g",), ("acc", "fid"))
  assert (x["g"], x["runs"], x["diverged"]) == ("x", 2, 1)
  assert x["acc_mean"] == pytest.approx(0.6) and x["acc_std"] == pytest.approx(
    np.std([0.5, 0.7], ddof=1)
  )
  assert (x["acc_min"], x["acc_max"]) == (0.5, 0.7)
  assert x["fid_mean"] == 1.0 and x["fid_std"] == 0.0  # the NaN is left out
  assert math.isnan(y["acc_mean"]) and y["fid_mean"] == 2.0


FAKE = """
import json, sys, pathlib
args = sys.argv[1:]
out = pathlib.Path(args[args.index("--out") + 1]) / args[args.index("--name") + 1]
count = pathlib.Path(args[args.index("--count") + 1])
count.write_text(count.read_text() + "x" if count.exists() else "x")
if "--fail" in args:
  sys.exit(3)
out.mkdir(parents=True)
led = {"neighboring_relation": "add_or_remove_one", "entries": [{"kind": "dpsgd",
       "name": "m", "sampling_prob": 0.01, "noise_multiplier": 1.0, "steps": 100}]}
nan = float("nan")
entry = {"label": "DP", "epsilon_pld": 1.5, "history": [{"loss": nan if "--nan" in args else 1.0}],
         "downstream": {"test_accuracy": 0.9, "validation_accuracy": 0.8}, "fid": 3.0,
         "downstream_with_public": {"test_accuracy": 0.95}}
base = {"test_accuracy": 0.85, "validation_accuracy": 0.84}
(out / "metrics.json").write_text(json.dumps({"pipelines": [entry], "privacy": {"ledger": led},
                                              "public_only_baseline": base}))
"""


def test_run_cells_skips_finished_cells_reruns_unfinished_ones_and_names_a_failure(tmp_path):
  script = tmp_path / "fake.py"
  script.write_text(FAKE)
  count = tmp_path / "count"
  cells = [
    study.Cell("ok", str(script), ("--count", str(count)), {"seed": 0}),
    study.Cell("nan", str(script), ("--count", str(count), "--nan"), {"seed": 1}),
  ]
  rows = study.run_cells(cells, tmp_path / "s", echo=False)
  assert count.read_text() == "xx"
  assert [r["diverged"] for r in rows] == [False, True]  # a NaN in its history
  assert rows[0]["test_accuracy"] == 0.9 and rows[0]["epsilon"] == 1.5 and rows[0]["seed"] == 0
  assert rows[0]["process_time_s"] > 0
  # the latent route's public-only baseline travels with its cell, into the printed table
  assert rows[0]["public_only_test_accuracy"] == 0.85
  assert rows[0]["with_public_test_accuracy"] == 0.95
  values = ("test_accuracy", "fid", "inception_score", "diversity", "process_time_s",
            "public_only_test_accuracy", "with_public_test_accuracy")  # fmt: skip
  table = study.summary_table(study.aggregate(rows, ("seed",), values), ("seed",), "test_accuracy")
  assert table.splitlines()[0].rstrip().endswith("synthetic + public  public only")
  assert table.splitlines()[-1].split()[-6:] == ["95.00", "+-", "0.00%", "85.00", "+-", "0.00%"]
  # resumed: nothing runs again; an unfinished cell (no marker) is deleted and rerun
  (tmp_path / "s" / "cells" / "nan" / study.CELL_FILE).unlink()
  (tmp_path / "s" / "cells" / "nan" / "partial").write_text("")
  again = study.run_cells(cells, tmp_path / "s", echo=False)
  assert count.read_text() == "xxx"
  assert not (tmp_path / "s" / "cells" / "nan" / "partial").exists()
  assert [r["test_accuracy"] for r in again] == [0.9, 0.9]
  bad = study.Cell("bad", str(script), ("--count", str(count), "--fail"), {})
  with pytest.raises(study.CellError, match=r"study cell bad failed \(exit 3\).*bad\.log"):
    study.run_cells([bad], tmp_path / "s", echo=False)
  with pytest.raises(ValueError, match="distinct"):
    study.run_cells([cells[0], cells[0]], tmp_path / "s", echo=False)


def test_a_study_reuses_finished_cells_of_the_same_name_and_flags_from_other_studies(tmp_path):
  script = tmp_path / "fake.py"
  script.write_text(FAKE)
  count = tmp_path / "count"
  first = [study.Cell(n, str(script), ("--count", str(count), *f), {"seed": 0})
           for n, f in (("a", ()), ("b", ()))]  # fmt: skip
  study.run_cells(first, tmp_path / "one", echo=False)
  assert count.read_text() == "xx"
  grown = [
    first[0],  # the same cell: copied in with its log, not run
    study.Cell("b", str(script), ("--count", str(count), "--nan"), {"seed": 0}),  # other flags
    study.Cell("c", str(script), ("--count", str(count)), {"seed": 1}),  # new
  ]
  rows = study.run_cells(grown, tmp_path / "two", echo=False, reuse=[tmp_path / "one"])
  assert count.read_text() == "xxxx"  # b (its flags differ) and c ran, a did not
  assert [r["diverged"] for r in rows] == [False, True, False]
  copied = tmp_path / "two" / "cells" / "a"
  assert (copied / study.CELL_FILE).read_text() == (
    tmp_path / "one" / "cells" / "a" / study.CELL_FILE
  ).read_text()
  assert (tmp_path / "two" / "nondp" / "logs" / "a.log").is_file()
  assert study.reusable(grown[1], [tmp_path / "one"]) is None
  assert study.reusable(grown[0], [tmp_path / "two", tmp_path / "one"]) == copied
  marker = tmp_path / "one" / "cells" / "b" / study.CELL_FILE
  info = json.loads(marker.read_text())
  assert (info["script"], info["flags"]) == ("fake.py", ["--count", str(count)])
  # a cell written before the script and flags were recorded: read from its command line
  del info["script"], info["flags"]
  marker.write_text(json.dumps(info))
  assert study.reusable(first[1], [tmp_path / "one"]) == marker.parent
  assert study.reusable(grown[1], [tmp_path / "one"]) is None
  with pytest.raises(ValueError, match=r"--reuse: .* is not a study folder"):
    study.run_cells([first[0]], tmp_path / "three", echo=False, reuse=[tmp_path / "none"])


# A cell that says it started, then waits (up to 60 s) until every cell in --wait-for has.
WAITING = """
import sys, pathlib, time
args = sys.argv[1:]
name, out = args[args.index("--name") + 1], pathlib.Path(args[args.index("--out") + 1])
marks = pathlib.Path(args[args.index("--marks") + 1])
(marks / name).write_text("")
if "--fail" in args:
  sys.exit(5)
others = args[args.index("--wait-for") + 1].split(",")
deadline = time.time() + 60
while not all((marks / o).exists() for o in others):
  if time.time() > deadline:
    sys.exit(4)
  time.sleep(0.05)
(out / name).mkdir(parents=True)
(out / name / "metrics.json").write_text(
  '{"pipelines": [{"label": "DP", "fid": 1.0}], "privacy": {"ledger": null}}'
)
"""


def test_run_cells_in_parallel_runs_cells_side_by_side_in_order_and_names_a_failure(tmp_path):
  script, marks = tmp_path / "waiting.py", tmp_path / "marks"
  script.write_text(WAITING)
  marks.mkdir()
  cell = lambda name, *more: study.Cell(
    name, str(script), ("--marks", str(marks), "--wait-for", "a,b", *more), {"seed": name}
  )
  # a and b each wait for the other: they finish only when both run at once
  rows = study.run_cells([cell("a"), cell("b")], tmp_path / "s", echo=False, parallel=2)
  assert [(r["cell"], r["seed"], r["fid"]) for r in rows] == [("a", "a", 1.0), ("b", "b", 1.0)]
  # a failure is named; cells not yet started when it failed are not started
  (marks / "a").unlink()
  (marks / "b").unlink()
  cells = [cell("x", "--fail"), cell("y", "--fail"), cell("z")]
  with pytest.raises(study.CellError, match=r"study cell x failed \(exit 5\)"):
    study.run_cells(cells, tmp_path / "t", echo=False, parallel=1)
  assert not (marks / "y").exists() and not (marks / "z").exists()
  with pytest.raises(ValueError, match="parallel must be an integer >= 1"):
    study.run_cells([cell("a")], tmp_path / "s", echo=False, parallel=0)


def test_mode_coverage_sees_collapse_and_a_faithful_copy():
  rng = np.random.default_rng(0)
  ref_labels = np.repeat(np.arange(4), 50)
  ref = rng.normal(size=(200, 8)) + 5 * np.eye(8)[ref_labels]
  logits_of = lambda f: f[:, :4]  # class c's feature is large for its images
  copy = mode_coverage(ref, logits_of(ref), ref_labels, ref, ref_labels, 4)
  assert copy["classes_predicted"] == 4 and copy["label_agreement"] > 0.99
  assert copy["diversity"] == pytest.approx(1.0) and copy["diversity_min"] == pytest.approx(1.0)
  # collapse: every image of every label is the same class-0 image
  same = np.repeat(ref[:1], 200, axis=0)
  collapsed = mode_coverage(same, logits_of(same), ref_labels, ref, ref_labels, 4)
  assert collapsed["classes_predicted"] == 1 and collapsed["label_agreement"] == 0.25
  assert collapsed["diversity"] < 1e-12


def _rows(path):
  with path.open() as f:
    return list(csv.DictReader(f))


@pytest.mark.slow
def test_generator_study_writes_its_folder_and_releases_only_dp_cells(tmp_path):
  exp = load_script(EXPERIMENTS / "dp_generator_study.py")
  flags = ["--dataset", "synthetic", "--quick", "--generators", "dp-vae", "--epsilons", "10",
           "--seeds", "2", "--reference", "--cell-args", TINY, "--out", str(tmp_path),
           "--name", "g", "--no-progress"]  # fmt: skip
  metrics = exp.main(flags)
  out = tmp_path / "g"
  for name in ("config.json", "metrics.json", "cells.csv", "summary.csv", "grids.png",
               "test_accuracy_vs_epsilon.png", "fid_vs_epsilon.png"):  # fmt: skip
    assert (out / name).is_file() or (out / "plots" / name).is_file(), name
  cells = _rows(out / "cells.csv")
  assert [c["cell"] for c in cells] == ["dp-vae-eps10-seed0", "dp-vae-eps10-seed1"]
  (s,) = metrics["summary"]
  assert s["runs"] == 2 and s["epsilon_mean"] <= 10.0 and 0 <= s["test_accuracy_mean"] <= 1
  assert {"classes_predicted_min", "diversity_mean", "process_time_s_mean"} <= set(s)
  # the non-private reference stays in nondp/: not in any released file
  for released in ("cells.csv", "summary.csv", "metrics.json"):
    assert "nondp" not in (out / released).read_text().replace('"nondp/', "")
  assert [c["cell"] for c in _rows(out / "nondp" / "cells.csv")] == ["dp-vae-nondp"]
  # the released privacy: both DP cells composed
  saved = json.loads((out / "metrics.json").read_text())
  ledgers = [json.loads((out / "cells" / c["cell"] / "metrics.json").read_text())["privacy"]
             for c in cells]  # fmt: skip
  assert saved["privacy"]["epsilon_pld"] > max(p["epsilon_pld"] for p in ledgers)
  assert len(saved["privacy"]["ledger"]["entries"]) == 2
  # each cell drew its own secret noise: none of them recorded a key or seed for it
  for c in cells:
    config = json.loads((out / "cells" / c["cell"] / "config.json").read_text())
    assert config["noise"].startswith("secure") and config["seed"] == int(c["seed"])
  # resumed: the finished cells are read, not rerun
  again = exp.main([*flags[:-5], "--resume", str(out), "--no-progress"])
  assert again["summary"][0]["test_accuracy_mean"] == s["test_accuracy_mean"]


@pytest.mark.slow
def test_sweep_study_reads_no_test_set_and_plots_each_value(tmp_path):
  exp = load_script(EXPERIMENTS / "dp_sweep_study.py")
  flags = [
    "--dataset",
    "synthetic",
    "--quick",
    "--models",
    "classifier",
    "--sweep",
    "clip",
    "--values",
    "0.1,1",
    "--cell-args",
    "--train-size 600 --validation-size 200 --epochs 2 --batch-size 150",
    "--out",
    str(tmp_path),
    "--name",
    "c",
    "--no-progress",
  ]
  metrics = exp.main(flags)
  out = tmp_path / "c"
  assert [s["clip"] for s in metrics["summary"]] == ["0.1", "1"]
  assert all(0 <= s["validation_accuracy_mean"] <= 1 for s in metrics["summary"])
  for c in _rows(out / "cells.csv"):
    assert c["test_accuracy"] == ""  # no cell read the test set
    config = json.loads((out / "cells" / c["cell"] / "config.json").read_text())
    assert config["test"] is False and config["clip"] == float(c["clip"])
  assert (out / "plots" / "validation_accuracy_vs_clip.png").is_file()


@pytest.mark.parametrize(
  "script, flags, message",
  [
    ("dp_generator_study.py", ["--generators", "dp-vae,gan"], "--generators must be some of"),
    ("dp_generator_study.py", ["--epsilons", "inf"], "--epsilons must be finite"),
    ("dp_sweep_study.py", ["--reuse", "no/such/study"], "--reuse must name study folders"),
    ("dp_sweep_study.py", ["--sweep", "clip", "--values", "0,1"], "clip norms must be numbers"),
    ("dp_sweep_study.py", ["--sweep", "activation", "--values", "relu,sin"],
     "activations must be of"),
  ],
)  # fmt: skip
def test_study_flags_fail_in_one_line(script, flags, message, capsys):
  exp = load_script(EXPERIMENTS / script)
  with pytest.raises(SystemExit) as err:
    exp.main(flags)
  assert err.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and message in lines[0]


def test_cells_inherit_data_quick_and_noise_flags():
  exp = load_script(EXPERIMENTS / "dp_generator_study.py")
  cfg = exp.Config(dataset="synthetic", quick=True, insecure_reproducible_noise=True,
                   generators=("dp-wgan",), epsilons=(1.0,), seeds=1, reference=False,
                   cell_args="--epochs 2")  # fmt: skip
  (cell,) = exp.cells(cfg)
  flags = " ".join(cell.flags)
  assert "--gradient-penalty 0 --weight-clip" in flags and "--dataset synthetic" in flags
  assert "--quick" in flags and "--insecure-reproducible-noise" in flags
  assert flags.endswith("--epochs 2 --target-epsilon 1 --seed 0")
  assert cell.command(Path("/s"), sys.executable)[-5:] == [
    "--out",
    "/s",
    "--name",
    cell.name,
    "--no-progress",
  ]
  assert os.path.basename(cell.script) == "dp_gan_synth.py"
