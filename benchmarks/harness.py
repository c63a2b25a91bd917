"""What ``pytest benchmarks/`` runs, in which order, and where the results go.

Imports nothing heavy: the pytest process plans and collects, every measurement runs in its
own ``python -m benchmarks.workers`` process.

Modes (environment variable ``JAXDP_BENCH``):

- ``quick`` (default, what CI runs): every implementation once at batch 32 on the TF-Privacy
  CNN, one more on each other model, 2 short rounds; results go to the git-ignored
  ``benchmarks/results/quick/``. Its numbers only show that nothing rotted.
- ``full`` (for humans): every model x batch x implementation, each configuration run
  ``repeats`` times in alternation with the others of its batch (so machine noise hits all
  alike), rounds of about a second; results are merged into ``benchmarks/results/<device>.json``
  with ``<device>.md`` and ``<device>.png`` beside it.

Overrides (comma lists or numbers): ``JAXDP_BENCH_DEVICE`` (cpu|gpu; default: gpu when
``nvidia-smi`` lists one), ``JAXDP_BENCH_MODELS``, ``JAXDP_BENCH_BATCHES``,
``JAXDP_BENCH_IMPLS``, ``JAXDP_BENCH_REPEATS``, ``JAXDP_BENCH_ROUNDS``,
``JAXDP_BENCH_ROUND_SECONDS``, ``JAXDP_BENCH_TIMEOUT``, ``JAXDP_BENCH_RESULTS`` (a folder).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import report, workers
from benchmarks.report import MEMORY_BATCH
from jaxdp._cpu_flags import MALLOC_ENV

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
MODES = ("quick", "full")
LOOP_BATCH = 64  # the naive per-example loop runs at this batch only (it is ~100x slower)
MEMORY_MODEL = "tf_cnn"
FULL_BATCHES = {"cpu": (64, 256, 1024), "gpu": (256, 1024, 4096, 16384)}
# Quick mode: every implementation on the TF-Privacy CNN at batch 32 (Opacus "ew" fails on
# convolutions below 32), one or two implementations on each other model.
QUICK_BATCH = 32
QUICK_IMPLS = {
  "tf_cnn": workers.IMPLS,
  "dp_cnn": ("torch_nonprivate",),
  "scatter_cnn": ("jaxdp_private", "opacus_hooks"),
  "mlp": ("jaxdp_nonprivate",),
  "vae": ("jaxdp_private", "opacus_ghost"),
  "vit": ("jaxdp_private", "opacus_hooks"),
  "critic": ("jaxdp_private", "opacus_hooks"),
}


@dataclasses.dataclass(frozen=True)
class Case:
  """One worker process: an implementation on a model at a batch size, ``repeat``-th run."""

  model: str
  batch: int
  impl: str
  repeat: int = 0
  devices: int = 1  # jaxdp: devices each physical batch's rows are split over
  logical: int | None = None  # jaxdp: examples per step, in physical batches of ``batch``

  @property
  def id(self) -> str:
    """The pytest id, e.g. ``tf_cnn-b256-r0-jaxdp_private`` (``-d4``, ``-l4096`` appended)."""
    extra = (f"-d{self.devices}" if self.devices > 1 else "") + (
      f"-l{self.logical}" if self.logical else ""
    )
    return f"{self.model}-b{self.batch}-r{self.repeat}-{self.impl}{extra}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
  """Everything a benchmark session runs, resolved from the environment."""

  mode: str
  device: str  # "cpu" | "gpu": what the workers run on
  device_name: str  # "cpu" or the GPU's name as a file-name slug; names the results files
  cases: tuple[Case, ...]
  rounds: int
  warmup: int
  round_seconds: float
  timeout_s: float
  memory_batch: int
  results_dir: Path

  @property
  def json_path(self) -> Path:
    """``<results_dir>/<device_name>.json``."""
    return self.results_dir / f"{self.device_name}.json"


def slug(name: str) -> str:
  """A file-name-safe lower-case name: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
  return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def detect_gpu() -> str | None:
  """The first GPU's name from ``nvidia-smi``, or None (no GPU, no driver)."""
  exe = shutil.which("nvidia-smi")
  if exe is None:
    return None
  try:
    out = subprocess.run(
      [exe, "--query-gpu=name", "--format=csv,noheader"],
      capture_output=True,
      text=True,
      timeout=30,
      check=True,
    ).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  names = [line.strip() for line in out.splitlines() if line.strip()]
  return names[0] if names else None


def _env_list(name: str, allowed: tuple[Any, ...], cast=str) -> tuple[Any, ...] | None:
  text = os.environ.get(name, "").strip()
  if not text:
    return None
  try:
    values = tuple(cast(v.strip()) for v in text.split(",") if v.strip())
  except ValueError as e:
    raise ValueError(f"{name}={text!r}: {e}") from e
  bad = [v for v in values if allowed and v not in allowed]
  if bad or not values:
    raise ValueError(f"{name}={text!r}: allowed values are {', '.join(map(str, allowed))}")
  return values


def _env_number(name: str, default: float, cast=int, minimum: float = 1) -> Any:
  text = os.environ.get(name, "").strip()
  if not text:
    return default
  try:
    value = cast(text)
  except ValueError as e:
    raise ValueError(f"{name}={text!r} must be a number >= {minimum}") from e
  if value < minimum:
    raise ValueError(f"{name}={text!r} must be >= {minimum}")
  return value


def _positive_batch(text: str) -> int:
  value = int(text)
  if value < 1:
    raise ValueError(f"batch sizes must be >= 1, got {value}")
  return value


@functools.cache
def get_plan() -> Plan:
  """The plan for this session, from ``JAXDP_BENCH`` and the overrides (read once)."""
  mode = os.environ.get("JAXDP_BENCH", "quick").strip().lower() or "quick"
  if mode not in MODES:
    raise ValueError(f"JAXDP_BENCH={mode!r}: allowed values are quick, full")
  device = os.environ.get("JAXDP_BENCH_DEVICE", "").strip().lower()
  gpu_name = detect_gpu() if device in ("", "gpu") else None
  if device == "gpu" and gpu_name is None:
    raise ValueError("JAXDP_BENCH_DEVICE=gpu but nvidia-smi lists no GPU")
  if device not in ("", "cpu", "gpu"):
    raise ValueError(f"JAXDP_BENCH_DEVICE={device!r}: allowed values are cpu, gpu")
  device = "gpu" if gpu_name is not None else "cpu"
  device_name = slug(gpu_name) if gpu_name is not None else "cpu"

  models = _env_list("JAXDP_BENCH_MODELS", workers.MODELS)
  impls = _env_list("JAXDP_BENCH_IMPLS", workers.IMPLS)
  batches = _env_list("JAXDP_BENCH_BATCHES", (), _positive_batch)
  memory_batch = MEMORY_BATCH[device] if mode == "full" else QUICK_BATCH
  if batches is not None and memory_batch not in batches:
    memory_batch = max(batches)
  if mode == "quick":
    repeats = _env_number("JAXDP_BENCH_REPEATS", 1)
    rounds = _env_number("JAXDP_BENCH_ROUNDS", 2)
    round_seconds = _env_number("JAXDP_BENCH_ROUND_SECONDS", 0.1, float, 0.001)
    warmup = 1
    timeout_s = _env_number("JAXDP_BENCH_TIMEOUT", 300.0, float)
    model_impls = {m: QUICK_IMPLS[m] for m in models or QUICK_IMPLS}
    model_batches = batches or (QUICK_BATCH,)
    results_dir = RESULTS_DIR / "quick"
  else:
    repeats = _env_number("JAXDP_BENCH_REPEATS", 3)
    rounds = _env_number("JAXDP_BENCH_ROUNDS", 5)
    round_seconds = _env_number("JAXDP_BENCH_ROUND_SECONDS", 1.0, float, 0.001)
    warmup = 3
    timeout_s = _env_number("JAXDP_BENCH_TIMEOUT", 900.0, float)
    model_impls = {m: workers.IMPLS for m in models or workers.MODELS}
    model_batches = batches or FULL_BATCHES[device]
    if batches is None and LOOP_BATCH not in model_batches:
      model_batches = (LOOP_BATCH, *model_batches)  # a batch-64 row for the loop alone (GPU)
    results_dir = RESULTS_DIR
  results_dir = Path(os.environ.get("JAXDP_BENCH_RESULTS", "") or results_dir)
  # The naive loop is ~100x slower than the rest: batch LOOP_BATCH only (quick: its tiny batch).
  loop_batches = model_batches if mode == "quick" else (LOOP_BATCH,)
  loop_only_batch = mode == "full" and batches is None and LOOP_BATCH not in FULL_BATCHES[device]

  cases = []
  for model, chosen_impls in model_impls.items():
    for batch in model_batches:
      chosen = [i for i in chosen_impls if not impls or i in impls]
      chosen = [i for i in chosen if i != "loop" or batch in loop_batches]
      if loop_only_batch and batch == LOOP_BATCH:
        chosen = [i for i in chosen if i == "loop"]
      for repeat in range(repeats):
        # Alternation: every impl once, then all again, each pass starting one impl later,
        # so slow drifts of the machine (other load, heat) hit all impls alike.
        shift = repeat % max(len(chosen), 1)
        for impl in chosen[shift:] + chosen[:shift]:
          cases.append(Case(model, batch, impl, repeat))
  return Plan(
    mode=mode,
    device=device,
    device_name=device_name,
    cases=tuple(cases),
    rounds=rounds,
    warmup=warmup,
    round_seconds=round_seconds,
    timeout_s=timeout_s,
    memory_batch=memory_batch,
    results_dir=results_dir,
  )


def missing_peer(impl: str) -> str | None:
  """Why ``impl`` cannot run in this environment (a module is missing), or None."""
  for module in workers.REQUIRES[impl]:
    if importlib.util.find_spec(module) is None:
      return f"{impl}: Python package {module!r} is not installed (pip install -e '.[bench]')"
  return None


def worker_command(case: Case, plan: Plan) -> list[str]:
  """The command line of the worker process for ``case``."""
  cmd = [
    sys.executable,
    "-m",
    "benchmarks.workers",
    f"--impl={case.impl}",
    f"--model={case.model}",
    f"--batch={case.batch}",
    f"--device={plan.device}",
    f"--rounds={plan.rounds}",
    f"--warmup={plan.warmup}",
    f"--round-seconds={plan.round_seconds}",
  ]
  if case.impl in workers.JAX_IMPLS:  # XLA's buffer plan of the step: free, compiled already
    cmd.append("--xla-memory")
  if case.devices > 1:
    cmd.append(f"--devices={case.devices}")
  if case.logical:
    cmd.append(f"--logical={case.logical}")
  return cmd


def _worker_env(device: str, devices: int = 1) -> dict[str, str]:
  env = dict(os.environ)
  if env.get("JAXDP_MALLOC", "1") != "0":
    # jaxdp tunes glibc malloc on import; PyTorch gains as much from it, so every worker gets
    # the same settings from the environment (the user's own MALLOC_* values win).
    env = {**MALLOC_ENV, **env}
  if device == "cpu":  # keep both frameworks off any GPU the machine may have
    env["JAX_PLATFORMS"] = "cpu"
    env["CUDA_VISIBLE_DEVICES"] = ""
    if devices > 1:  # XLA splits the host into that many CPU devices (sharing its cores)
      flags = env.get("XLA_FLAGS", "")
      env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
  return env


def _parse_result(stdout: str) -> dict[str, Any] | None:
  lines = [ln for ln in stdout.splitlines() if ln.startswith(workers.RESULT_PREFIX)]
  return json.loads(lines[-1][len(workers.RESULT_PREFIX) :]) if lines else None


def run_check_models(plan: Plan) -> dict[str, Any]:
  """Runs ``python -m benchmarks.workers --check-models`` on the CPU; its result dict."""
  proc = subprocess.run(
    [sys.executable, "-m", "benchmarks.workers", "--check-models"],
    cwd=REPO_ROOT,
    env=_worker_env("cpu"),
    capture_output=True,
    text=True,
    timeout=plan.timeout_s,
  )
  result = _parse_result(proc.stdout)
  if result is None:
    return {"error": f"exit status {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
  return result


def run_worker(case: Case, plan: Plan) -> dict[str, Any]:
  """Runs one worker process and returns its result dict (never raises on worker failure)."""
  env = _worker_env(plan.device, case.devices)
  base = {"model": case.model, "batch": case.batch, "impl": case.impl, "repeat": case.repeat}
  base.update(devices=case.devices, logical=case.logical or case.batch)
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(
      worker_command(case, plan),
      cwd=REPO_ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=plan.timeout_s,
    )
  except subprocess.TimeoutExpired:
    return {**base, "error": f"timed out after {plan.timeout_s:.0f} s"}
  wall_s = time.perf_counter() - t0
  result = _parse_result(proc.stdout)
  if result is not None:
    pass
  elif proc.returncode in (-9, 137):  # SIGKILL: on a CPU run almost surely the OOM killer
    result = {"error": "out of memory", "detail": "worker killed by SIGKILL (OOM killer?)"}
  else:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    result = {"error": f"worker exited with status {proc.returncode}: {' | '.join(tail)}"}
  if "error" in result and result["error"] != "out of memory":
    result["stderr_tail"] = proc.stderr.strip().splitlines()[-15:]
  return {**base, **result, "wall_s": wall_s}


# -- aggregation ------------------------------------------------------------------------

ROW_KEYS = ("model", "batch", "impl", "device", "examples_per_s", "min", "max", "peak_mem_bytes")


def aggregate(results: list[dict[str, Any]], plan: Plan) -> list[dict[str, Any]]:
  """One row per (model, batch, impl, devices, logical): medians over the rounds of all its
  processes (rows of one device and one physical batch per step leave the last two out)."""
  groups: dict[tuple[str, int, str, int, int], list[dict[str, Any]]] = {}
  for r in results:
    key = (r["model"], r["batch"], r["impl"], r.get("devices", 1), r.get("logical") or r["batch"])
    groups.setdefault(key, []).append(r)
  stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
  rows = []
  for (model, batch, impl, devices, logical), rs in groups.items():
    ok = [r for r in rs if "examples_per_s" in r]
    row: dict[str, Any] = dict.fromkeys(ROW_KEYS)
    row.update(model=model, batch=batch, impl=impl, device=plan.device_name)
    if devices > 1 or logical != batch:
      row.update(devices=devices, logical=logical)
    if ok:
      rates = [x for r in ok for x in r["rates"]]
      row.update(
        examples_per_s=statistics.median(rates),
        min=min(rates),
        max=max(rates),
        peak_mem_bytes=int(statistics.median(r["peak_mem_bytes"] for r in ok)),
        base_mem_bytes=int(statistics.median(r["base_mem_bytes"] for r in ok)),
        mem_kind=ok[0]["mem_kind"],
        processes=len(ok),
        rounds=len(rates),
        steps_per_round=int(statistics.median(r["steps_per_round"] for r in ok)),
      )
      if any("compile_s" in r for r in ok):
        row["compile_s"] = statistics.median(r["compile_s"] for r in ok if "compile_s" in r)
      for key in ("xla_temp_bytes", "xla_argument_bytes", "xla_output_bytes"):
        vals = [r[key] for r in ok if key in r]
        if vals:
          row[key] = vals[0]
      loads = [r["other_load"] for r in ok if r.get("other_load") is not None]
      if loads:
        row["other_load"] = max(loads)
      for key in ("engine", "device_name", "jax", "torch", "opacus", "jax_privacy", "malloc_env"):
        if key in ok[0]:
          row[key] = ok[0][key]
    errors = sorted({r["error"] for r in rs if "error" in r})
    skips = sorted({r["skipped"] for r in rs if "skipped" in r})
    if errors:
      row["error" if not ok else "errors"] = errors[0] if not ok else errors
    if skips and not ok:
      row["skipped"] = skips[0]
    row.update(mode=plan.mode, timestamp=stamp)
    rows.append(row)
  return sort_rows(rows)


def sort_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Rows in (model, batch, implementation) order."""
  model_order = {m: i for i, m in enumerate(workers.MODELS)}
  impl_order = {m: i for i, m in enumerate(workers.IMPLS)}
  return sorted(
    rows,
    key=lambda r: (
      model_order.get(r["model"], 99),
      r["model"],
      r["batch"],
      impl_order.get(r["impl"], 99),
      r["impl"],
    ),
  )


def merge_rows(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """``old`` rows updated by ``new`` ones with the same (model, batch, impl, device)."""
  key = lambda r: (r["model"], r["batch"], r["impl"], r["device"])
  merged = {key(r): r for r in old}
  merged.update({key(r): r for r in new})
  return sort_rows(list(merged.values()))


class Collector:
  """Gathers worker results during the session and saves them as they come.

  The results JSON is rewritten after every worker, so a session cut off part-way (a device
  lent for a fixed time, a killed job) keeps every configuration measured so far;
  ``python -m benchmarks.report <json>`` then redoes its table and plot. The Markdown table and
  the plot are written once, when the session ends.
  """

  def __init__(self, plan: Plan) -> None:
    self.plan = plan
    self.results: list[dict[str, Any]] = []
    path = plan.json_path
    # Full mode merges into the rows on disk; read them once, so that a configuration this
    # session measures replaces the old row however often the file is rewritten.
    self._old_rows: list[dict[str, Any]] = (
      json.loads(path.read_text()) if plan.mode == "full" and path.exists() else []
    )

  def add(self, result: dict[str, Any]) -> None:
    """Records one worker's result and saves the results JSON."""
    self.results.append(result)
    self._save_json()

  def find(self, model: str, batch: int, impl: str) -> list[dict[str, Any]]:
    """The results recorded so far for one configuration."""
    return [r for r in self.results if (r["model"], r["batch"], r["impl"]) == (model, batch, impl)]

  def _save_json(self) -> list[dict[str, Any]]:
    rows = merge_rows(self._old_rows, aggregate(self.results, self.plan))
    path = self.plan.json_path
    path.parent.mkdir(parents=True, exist_ok=True)
    if self.plan.mode == "quick" and path.parent == RESULTS_DIR / "quick":
      ignore = path.parent / ".gitignore"  # quick results never get committed
      if not ignore.exists():
        ignore.write_text("*\n")
    tmp = path.with_name(path.name + ".tmp")  # never a half-written file if killed mid-write
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    tmp.replace(path)
    return rows

  def write(self) -> list[Path]:
    """Writes (full mode: merges into) the results JSON, then its Markdown table and plot."""

    rows = self._save_json()
    command = (
      "pytest benchmarks/" if self.plan.mode == "quick" else "JAXDP_BENCH=full pytest benchmarks/"
    )
    return [self.plan.json_path, *report.write_reports(rows, self.plan.json_path, command=command)]
