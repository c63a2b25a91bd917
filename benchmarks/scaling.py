"""How jaxdp's private step scales: examples/s against the number of devices, and against the
logical batch at a fixed physical batch (``pytest benchmarks/test_scaling.py``).

Two series of ``jaxdp_private`` workers (the harness's, one process per configuration):

- devices: one physical batch of ``DEVICE_BATCH[device]`` rows per step, split over 1, 2,
  4 ... devices (on the CPU, devices forced with ``--xla_force_host_platform_device_count``:
  they share the same cores, so this measures the overhead of sharding, not a speed-up);
- logical: 256 to 16,384 examples per step on one device, in physical batches of
  ``LOGICAL_PHYSICAL`` rows whose clipped sums add up before the one noise draw.

Quick mode (CI) runs a small version of each; full mode (``JAXDP_BENCH=full``) all rows and
writes ``benchmarks/results/scaling-<device>.json`` and ``.md``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from benchmarks import harness, report

IMPL = "jaxdp_private"
MODEL = "tf_cnn"
DEVICE_BATCH = {"cpu": 1024, "gpu": 4096}  # rows per step of the devices series
LOGICAL_PHYSICAL = 256  # physical rows of the logical series
FULL_LOGICAL = (256, 1024, 4096, 16384)
FULL_CPU_DEVICES = (1, 2, 4)
QUICK = {"devices": (1, 2), "batch": 64, "logical": (64, 256)}


def gpu_count() -> int:
  """How many GPUs ``nvidia-smi`` lists (0 without one)."""
  import shutil
  import subprocess

  exe = shutil.which("nvidia-smi")
  if exe is None:
    return 0
  try:
    out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30).stdout
  except (OSError, subprocess.SubprocessError):
    return 0
  return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def _sizes(plan: harness.Plan) -> tuple[tuple[int, ...], int, tuple[int, ...], int]:
  """(device counts, rows per step of the devices series, logical batches, physical rows)."""
  if plan.mode == "quick":
    return QUICK["devices"], QUICK["batch"], QUICK["logical"], QUICK["batch"]
  if plan.device == "gpu":
    devices = tuple(d for d in (1, 2, 4, 8) if d <= max(gpu_count(), 1))
  else:
    devices = FULL_CPU_DEVICES
  return devices, DEVICE_BATCH[plan.device], FULL_LOGICAL, LOGICAL_PHYSICAL


def get_plan() -> harness.Plan:
  """The scaling cases of this session (the harness's mode, device and overrides)."""
  base = harness.get_plan()
  devices, batch, logical, physical = _sizes(base)
  cases: list[harness.Case] = []
  for repeat in range(1 if base.mode == "quick" else 3):  # alternation, as for the peers
    cases += [harness.Case(MODEL, batch, IMPL, repeat, devices=d) for d in devices]
    for n in logical:
      case = harness.Case(MODEL, physical, IMPL, repeat, logical=n if n != physical else None)
      if case not in cases:  # quick mode: one configuration is in both series
        cases.append(case)
  return dataclasses.replace(base, cases=tuple(cases))


def json_path(plan: harness.Plan) -> Path:
  """``<results>/scaling-<device>.json``."""
  return plan.results_dir / f"scaling-{plan.device_name}.json"


def markdown(rows: list[dict[str, Any]], plan: harness.Plan, command: str) -> str:
  """The two scaling tables, with ratios to one device and to one physical batch."""
  _, batch, _, physical = _sizes(plan)
  ok = [r for r in rows if r.get("examples_per_s")]
  by_devices = sorted(
    (r for r in ok if r["batch"] == batch and r.get("logical", batch) == batch),
    key=lambda r: r.get("devices", 1),
  )
  by_logical = sorted(
    (r for r in ok if r["batch"] == physical and r.get("devices", 1) == 1),
    key=lambda r: r.get("logical", physical),
  )
  lines = [f"# jaxdp_private scaling on {plan.device_name} ({MODEL})", "", f"`{command}`", ""]
  lines += ["## Devices: one physical batch per step, its rows split over the devices", ""]
  lines += ["| devices | rows per step | examples/s (median) | min - max | vs 1 device |"]
  lines += ["|---|---|---|---|---|"]
  for r in by_devices:
    lines.append(
      f"| {r.get('devices', 1)} | {r['batch']} | {report.fmt_rate(r['examples_per_s'])} | "
      f"{report.fmt_rate(r['min'])} - {report.fmt_rate(r['max'])} | "
      f"{r['examples_per_s'] / by_devices[0]['examples_per_s']:.2f}x |"
    )
  lines += ["", f"## Logical batch: physical batches of {physical} rows, one device", ""]
  lines += ["| logical batch | physical batches per step | examples/s (median) | min - max |"]
  lines += ["|---|---|---|---|"]
  for r in by_logical:
    n = r.get("logical", physical)
    lines.append(
      f"| {n} | {n // physical} | {report.fmt_rate(r['examples_per_s'])} | "
      f"{report.fmt_rate(r['min'])} - {report.fmt_rate(r['max'])} |"
    )
  loads = [r["other_load"] for r in ok if r.get("other_load") is not None]
  if loads:
    lines += ["", f"Other processes' share of the CPUs while timing: at most {max(loads):.0%}."]
  return "\n".join(lines) + "\n"


def write(results: list[dict[str, Any]], plan: harness.Plan) -> list[Path]:
  """The aggregated rows as ``scaling-<device>.json`` and its Markdown tables."""
  rows = harness.aggregate(results, plan)
  path = json_path(plan)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(rows, indent=1) + "\n")
  command = "pytest benchmarks/test_scaling.py"
  if plan.mode == "full":
    command = f"JAXDP_BENCH=full {command}"
  md = path.with_suffix(".md")
  md.write_text(markdown(rows, plan, command))
  return [path, md]


# -- how many examples fit one device -----------------------------------------------------

MEMORY_BATCHES = (256, 1024)  # two physical batches: XLA's working memory is affine in rows
DEVICE_MEMORY_GIB = {"16 GiB (T4, V100)": 16, "80 GiB (A100, H100)": 80, "141 GiB (H200)": 141}


def memory_fit(model: str, batches: tuple[int, int] = MEMORY_BATCHES) -> dict[str, Any]:
  """XLA's planned memory of one private step of ``model`` without microbatching (the GPU
  default): bytes per example (the slope between ``batches``), fixed bytes (parameters,
  optimiser state, the data set of the benchmark) and the largest physical batch that fits
  each of ``DEVICE_MEMORY_GIB`` with 10% headroom. Imports JAX: not for the pytest process."""
  import jax
  import optax

  from benchmarks.workers.common import L2_NORM_CLIP, NOISE_MULTIPLIER
  from benchmarks.workers.jax_setup import setup
  from jaxdp import DPConfig, init_state, make_step

  totals = []
  for batch in batches:
    s = setup(model, batch, "cpu")
    step = make_step(
      s.per_example_loss,
      optax.sgd(0.1),
      DPConfig(l2_norm_clip=L2_NORM_CLIP, noise_multiplier=NOISE_MULTIPLIER),
      expected_batch_size=batch,
      has_aux=True,
      microbatch_size=None,
    )
    state = init_state(s.params, optax.sgd(0.1), jax.random.key(0))
    ma = step.lower(state, s.data, s.indices[0], s.mask).compile().memory_analysis()
    data_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(s.data))
    # Arguments minus the benchmark's data set: the state; temps: the step's working memory.
    totals.append((ma.temp_size_in_bytes, ma.argument_size_in_bytes - data_bytes))
  (t0, a0), (t1, _) = totals
  per_example = (t1 - t0) / (batches[1] - batches[0])
  fixed = max(t0 - per_example * batches[0], 0.0) + a0
  fits = {
    name: int((0.9 * gib * 2**30 - fixed) // per_example) for name, gib in DEVICE_MEMORY_GIB.items()
  }
  return {"model": model, "bytes_per_example": per_example, "fixed_bytes": fixed, "fits": fits}


if __name__ == "__main__":
  from benchmarks.workers.common import MODELS

  print("| model | working memory per example | fixed | " + " | ".join(DEVICE_MEMORY_GIB) + " |")
  print("|---|---|---|" + "---|" * len(DEVICE_MEMORY_GIB))
  for name in MODELS:
    m = memory_fit(name)
    cells = " | ".join(f"{v:,}" for v in m["fits"].values())
    print(
      f"| {name} | {m['bytes_per_example'] / 1024:.0f} KiB | "
      f"{report.fmt_bytes(m['fixed_bytes'])} | {cells} |",
      flush=True,
    )
