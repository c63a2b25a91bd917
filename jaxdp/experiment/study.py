"""Studies: many runs of the experiment scripts, collected into one table, CSV and figures.

A study is a list of :class:`Cell` s, each one experiment script with its own flags (a
generator at an epsilon and a seed; a classifier at one clip norm). :func:`run_cells` runs
them (one after another, or ``parallel`` at once), each in its own process and its own
complete run folder::

    <study folder>/
      config.json, metrics.json     the study's settings; its rows and summary, and the
                                    privacy of releasing every DP cell together
      cells.csv, summary.csv        one row per cell; mean / std / min / max over seeds
      plots/*.png                   utility and FID against the swept value; image grids
      cells/<cell>/                 each cell's own run folder (its own nondp/ inside)
      cells/<cell>/study_cell.json  the cell's command, script, flags, tags and wall time
      nondp/logs/<cell>.log         each cell's console output (not released)

Privacy: every cell draws its own secret noise and batches (nothing is shared between cells,
because each is a separate run with its own OS entropy), and its own ledger says what its
release costs. Every cell reads the same private split, so releasing the whole study costs
the COMPOSITION of the cells' ledgers: :func:`study_ledger` builds it, and the study's
``metrics.json["privacy"]`` reports it. A cell run without DP writes its results under its
own ``nondp/``, and the study copies them only into its own ``nondp/``.

Resumable: a cell whose ``study_cell.json`` exists is read, not rerun; a cell that did not
finish is deleted and run again. Reusable: a finished cell of another study folder with the
same name, script and flags is copied in (``reuse``) instead of run again, so a study can
grow from one seed to three, or join the cells of studies run apart, without rerunning any.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from jaxdp import _validate, accounting
from jaxdp.experiment.runs import NONDP, RunFolder, format_table

__all__ = [
  "Cell",
  "CellError",
  "aggregate",
  "read_cell",
  "release",
  "run_cells",
  "study_ledger",
  "write_csv",
]

# The repository root: experiment scripts are named relative to it.
ROOT = Path(__file__).resolve().parents[2]
CELL_FILE = "study_cell.json"


class CellError(RuntimeError):
  """A cell's script exited with an error."""


@dataclasses.dataclass(frozen=True)
class Cell:
  """One run of a study.

  Attributes:
    name: its run folder's name (unique within the study; a plain folder name).
    script: the experiment script, relative to the repository root.
    flags: its command-line flags (``--out``, ``--name`` and ``--no-progress`` are added).
    tags: what the cell stands for in the tables, e.g. ``{"generator": "dp-vae",
      "epsilon": 3.0, "seed": 0}``.
  """

  name: str
  script: str
  flags: tuple[str, ...]
  tags: Mapping[str, Any]

  def command(self, cells_dir: Path, python: str = sys.executable) -> list[str]:
    """The command line that runs the cell into ``cells_dir / name``."""
    return [python, str(ROOT / self.script), *self.flags, "--out", str(cells_dir),
            "--name", self.name, "--no-progress"]  # fmt: skip


def reusable(cell: Cell, folders: Sequence[Path]) -> Path | None:
  """The first finished run of ``cell`` in the study folders ``folders``: a cell folder of
  the same name whose ``study_cell.json`` records the same script (file name) and flags;
  None if there is none.

  Raises:
    ValueError: a folder is not a study folder (no ``cells/``).
  """
  for folder in map(Path, folders):
    if not (folder / "cells").is_dir():
      raise ValueError(f"--reuse: {folder} is not a study folder (no cells/ inside)")
    marker = folder / "cells" / cell.name / CELL_FILE
    if marker.is_file() and _script_and_flags(json.loads(marker.read_text())) == (
      Path(cell.script).name,
      list(cell.flags),
    ):
      return marker.parent
  return None


def _script_and_flags(info: Mapping[str, Any]) -> tuple[str, list[str]]:
  """A finished cell's script (file name) and flags, from its ``study_cell.json``. Cells
  written before these were recorded on their own give them through their command line,
  ``[script, *flags, "--out", dir, "--name", name, "--no-progress"]`` (:meth:`Cell.command`)."""
  if "flags" in info:
    return info["script"], list(info["flags"])
  command = info["command"]
  return Path(command[0]).name, list(command[1:-5])


def _link_or_copy(src: str, dst: str) -> None:
  try:  # a hard link on one file system: no second copy of the synthetic sets (nothing
    # rewrites a finished cell's files: a rerun deletes the folder first)
    os.link(src, dst)
  except OSError:
    shutil.copy2(src, dst)


def run_cells(
  cells: Sequence[Cell],
  folder: Path,
  *,
  python: str = sys.executable,
  env: Mapping[str, str] | None = None,
  echo: bool = True,
  parallel: int = 1,
  reuse: Sequence[Path] = (),
) -> list[dict[str, Any]]:
  """Runs every cell not yet finished (one process each, up to ``parallel`` at once);
  returns one row per cell, in the order of ``cells``.

  Args:
    cells: the study's cells (distinct names).
    folder: the study folder; cell ``c`` writes ``folder/cells/c.name``.
    python: the interpreter that runs the scripts.
    env: extra environment variables of the cells' processes.
    echo: print one line per cell (what runs, then its headline numbers).
    parallel: cells run at once. Each cell is its own run with its own OS noise, so running
      them side by side changes no number and no privacy. On the 2-core CPU two DP-GAN cells
      side by side took 1215-1264 s each, an earlier one alone 1229 s: a cell keeps about
      one core busy, so two at once halve a study's wall time there. With more than one,
      the cells' JAX does not pre-allocate accelerator memory (they share it).
    reuse: other study folders; a cell not finished here but finished there with the same
      name, script and flags (:func:`reusable`) is copied in with its log, not run. Its
      noise and release are that run's: the study's ledger composes it like any other cell.

  Returns:
    :func:`read_cell` of each cell, with ``tags`` merged in and ``process_time_s``.

  Raises:
    CellError: a cell's script failed; the message names the (first such) cell and its log.
      Cells not yet started are not started; those running are waited for.
  """
  names = [c.name for c in cells]
  if len(set(names)) != len(names):
    raise ValueError(f"cell names must be distinct, got {names}")
  parallel = _validate.positive_int("parallel", parallel)
  cells_dir, logs = folder / "cells", folder / NONDP / "logs"
  logs.mkdir(parents=True, exist_ok=True)
  env = {**os.environ, **(env or {})}
  if parallel > 1:
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  failed = threading.Event()
  todo = [c for c in cells if not (cells_dir / c.name / CELL_FILE).is_file()]
  sources = {c.name: reusable(c, reuse) for c in todo}

  def run_one(i: int, cell: Cell) -> None:
    run_dir = cells_dir / cell.name
    if (run_dir / CELL_FILE).is_file() or failed.is_set():
      return
    shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished cell runs again from scratch
    if (source := sources.get(cell.name)) is not None:
      shutil.copytree(source, run_dir, symlinks=True, copy_function=_link_or_copy)
      log = source.parents[1] / NONDP / "logs" / f"{cell.name}.log"
      if log.is_file():
        shutil.copy2(log, logs / log.name)
      if echo:
        print(f"[{i}/{len(cells)}] {cell.name}: read from {source}", flush=True)
      return
    command = cell.command(cells_dir, python)
    if echo:
      print(f"[{i}/{len(cells)}] {cell.name}: {' '.join(command[1:])}", flush=True)
    t0 = time.perf_counter()
    with (logs / f"{cell.name}.log").open("w") as log:
      proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    if proc.returncode != 0:
      failed.set()
      raise CellError(
        f"study cell {cell.name} failed (exit {proc.returncode}); see {logs / cell.name}.log"
      )
    info = {"command": command[1:], "script": Path(cell.script).name, "flags": list(cell.flags),
            "tags": dict(cell.tags), "process_time_s": time.perf_counter() - t0}  # fmt: skip
    (run_dir / CELL_FILE).write_text(json.dumps(info, indent=2) + "\n")
    if echo:
      row = read_cell(run_dir)
      shown = {k: row.get(k) for k in ("test_accuracy", "validation_accuracy", "fid", "epsilon")}
      print(f"      {cell.name} done in {info['process_time_s']:.0f} s: {_short(shown)}",
            flush=True)  # fmt: skip

  with ThreadPoolExecutor(max_workers=parallel) as pool:
    futures = [pool.submit(run_one, i, cell) for i, cell in enumerate(cells, 1)]
  for future in futures:  # the first failure in cell order
    future.result()
  rows = []
  for cell in cells:
    run_dir = cells_dir / cell.name
    info = json.loads((run_dir / CELL_FILE).read_text())
    row = {"cell": cell.name, **cell.tags, **read_cell(run_dir)}
    row["process_time_s"] = info["process_time_s"]
    rows.append(row)
  return rows


def _short(values: Mapping[str, Any]) -> str:
  return ", ".join(f"{k} {v:.4g}" for k, v in values.items() if isinstance(v, (int, float)))


def _history_finite(history: Any) -> bool:
  """Whether every number in a model's per-epoch history is finite."""
  if isinstance(history, Mapping):
    return all(_history_finite(v) for v in history.values())
  if isinstance(history, (list, tuple)):
    return all(_history_finite(v) for v in history)
  return not isinstance(history, float) or math.isfinite(history)


def read_cell(run_dir: Path) -> dict[str, Any]:
  """The headline numbers of a finished run folder of any experiment script.

  A synthetic-data run's first pipeline, or a classifier run's first model: released
  (``metrics.json``) when private, else from ``nondp/metrics.json``.

  Returns:
    ``private``, ``epsilon`` (PLD; inf without DP), ``test_accuracy``,
    ``validation_accuracy`` (the downstream classifier's for a generator), ``fid``,
    ``inception_score``, the mode coverage (``classes_predicted``, ``label_agreement``,
    ``diversity``, ``diversity_min``), ``nonfinite_samples``, ``train_time_s``,
    ``diverged`` (a non-finite number in the training history, or non-finite samples),
    ``public_only_test_accuracy`` / ``public_only_validation_accuracy`` (the latent route's
    classifier trained on the public partition alone), ``with_public_*_accuracy`` (on the
    synthetic set plus the public partition),
    ``synthetic_npz`` (the path of a generator's synthetic set) and ``ledger`` (the cell's
    privacy ledger, None without DP); None where not measured.
  """
  metrics = json.loads((run_dir / "metrics.json").read_text())
  entries = metrics.get("pipelines") or metrics.get("models") or []
  private = bool(entries)
  if not private:
    nondp = json.loads((run_dir / NONDP / "metrics.json").read_text())
    entries = nondp.get("pipelines") or nondp.get("models") or []
  if not entries:
    raise ValueError(f"{run_dir}: metrics.json names no pipeline or model")
  e = entries[0]
  scores = e.get("downstream", e)
  keys = ("fid", "inception_score", "classes_predicted", "label_agreement", "diversity",
          "diversity_min", "nonfinite_samples", "train_time_s")  # fmt: skip
  row: dict[str, Any] = {"private": private, "epsilon": e.get("epsilon_pld", math.inf)}
  row["test_accuracy"] = scores.get("test_accuracy")
  row["validation_accuracy"] = scores.get("validation_accuracy")
  row.update({k: e.get(k) for k in keys})
  row["diverged"] = not _history_finite(e.get("history", [])) or bool(e.get("nonfinite_samples"))
  # the latent route's CNN on the public partition alone, and on synthetic + public
  baseline, mixed = metrics.get("public_only_baseline", {}), e.get("downstream_with_public", {})
  for split in ("test", "validation"):
    row[f"public_only_{split}_accuracy"] = baseline.get(f"{split}_accuracy")
    row[f"with_public_{split}_accuracy"] = mixed.get(f"{split}_accuracy")
  row["synthetic_npz"] = str(run_dir / e["synthetic_npz"]) if e.get("synthetic_npz") else None
  row["ledger"] = metrics["privacy"]["ledger"] if private else None
  return row


def study_ledger(rows: Sequence[Mapping[str, Any]]) -> accounting.PrivacyLedger:
  """The privacy of releasing every DP cell together: each cell's ledger entries, named
  ``<cell>/<entry>``, in one ledger (they all read the same private split)."""
  entries = []
  for row in rows:
    for entry in (row.get("ledger") or {}).get("entries", []):
      entries.append({**entry, "name": f"{row['cell']}/{entry['name']}"})
  return accounting.PrivacyLedger.from_dict({"entries": entries})


def aggregate(
  rows: Sequence[Mapping[str, Any]], by: Sequence[str], values: Sequence[str]
) -> list[dict[str, Any]]:
  """Rows grouped by the tags ``by`` (in first-seen order): for each of ``values`` the mean,
  sample std (0 for one row), min and max over the group's finite values; ``runs`` (the
  group's size) and ``diverged`` (how many of its runs diverged)."""
  groups: dict[tuple, list[Mapping[str, Any]]] = {}
  for row in rows:
    groups.setdefault(tuple(row.get(k) for k in by), []).append(row)
  out = []
  for key, members in groups.items():
    summary: dict[str, Any] = dict(zip(by, key, strict=True))
    summary["runs"] = len(members)
    summary["diverged"] = sum(bool(m.get("diverged")) for m in members)
    for v in values:
      xs = np.asarray(
        [float(m[v]) for m in members if isinstance(m.get(v), (int, float))], np.float64
      )
      xs = xs[np.isfinite(xs)]
      stats = (
        (xs.mean(), xs.std(ddof=1) if len(xs) > 1 else 0.0, xs.min(), xs.max())
        if len(xs)
        else (math.nan,) * 4
      )
      for name, stat in zip(("mean", "std", "min", "max"), stats, strict=True):
        summary[f"{v}_{name}"] = float(stat)
    out.append(summary)
  return out


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
  """``rows`` as CSV, one column per key seen (in first-seen order); nested values (the
  ledger) are left out."""
  columns: list[str] = []
  for row in rows:
    columns += [k for k, v in row.items() if k not in columns and not isinstance(v, (dict, list))]
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("w", newline="") as f:
    writer = csv.DictWriter(f, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  return path


def summary_table(
  summary: Sequence[Mapping[str, Any]], by: Sequence[str], utility: str
) -> str:  # fmt: skip
  """The printed table of a study: the group tags, then utility (mean +- std over seeds,
  percent), FID, IS, classes predicted (min), diversity, diverged runs and wall time; and
  the utility on synthetic + public data and of the public-only baseline where a group has
  them."""
  pct = lambda s, v: "-" if math.isnan(s[f"{v}_mean"]) else (
    f"{100 * s[f'{v}_mean']:.2f} +- {100 * s[f'{v}_std']:.2f}%")  # fmt: skip
  num = lambda s, v, f=".2f": "-" if math.isnan(s.get(f"{v}_mean", math.nan)) else (
    format(s[f"{v}_mean"], f))  # fmt: skip
  rows = [
    [*(str(s[k]) for k in by), pct(s, utility), num(s, "fid"), num(s, "inception_score"),
     "-" if math.isnan(s.get("classes_predicted_min", math.nan)) else
     f"{s['classes_predicted_min']:.0f}", num(s, "diversity"), f"{s['diverged']}/{s['runs']}",
     f"{s['process_time_s_mean']:.0f} s"]
    for s in summary
  ]  # fmt: skip
  head = [*by, utility.replace("_", " "), "FID", "IS", "classes", "diversity", "diverged",
          "wall time"]  # fmt: skip
  for name, title in (("with_public", "synthetic + public"), ("public_only", "public only")):
    value = f"{name}_{utility}"
    if any(not math.isnan(s.get(f"{value}_mean", math.nan)) for s in summary):
      head.append(title)
      rows = [[*r, pct(s, value)] for r, s in zip(rows, summary, strict=True)]
  return format_table(head, rows)


def release(
  out: RunFolder,
  rows: Sequence[Mapping[str, Any]],
  *,
  by: Sequence[str],
  values: Sequence[str],
  utility: str,
  info: Mapping[str, Any],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """Writes a finished study: the DP cells' rows (``cells.csv``), their summary over seeds
  (``summary.csv``) and ``metrics.json``, whose privacy composes every DP cell's ledger
  (:func:`study_ledger`); the non-DP cells' rows and summary only under ``nondp/``. Prints
  both tables.

  Returns:
    ``(summary of the DP cells, summary of the non-DP cells)`` (:func:`aggregate` by ``by``).
  """
  private = [dict(r) for r in rows if r["private"]]
  nonprivate = [dict(r) for r in rows if not r["private"]]
  out.ledger = study_ledger(private)
  summary, reference = aggregate(private, by, values), aggregate(nonprivate, by, values)
  write_csv(out.path / "cells.csv", private)
  write_csv(out.path / "summary.csv", summary)
  if nonprivate:
    write_csv(out.file("cells.csv", released=False), nonprivate)
    write_csv(out.file("summary.csv", released=False), reference)
  cells = [{k: v for k, v in r.items() if k != "ledger"} for r in private]
  metrics = out.finish(
    {**info, "cells": cells, "summary": summary},
    nondp={"cells": nonprivate, "summary": reference} if nonprivate else None,
  )
  print(f"wrote {out.path}")
  if summary:
    print(summary_table(summary, by, utility))
    p = metrics["privacy"]
    print(f"released: every DP cell together, epsilon {p['epsilon_pld']:.3f} (PLD) at delta "
          f"{p['delta']:g}")  # fmt: skip
  if reference:
    print("without DP (nondp/, not released):")
    print(summary_table(reference, by, utility))
  return summary, reference
