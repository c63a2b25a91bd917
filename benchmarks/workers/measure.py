"""Building one configuration (by its peer's module) and timing it, the same for all."""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
import traceback
from typing import Any

from benchmarks.workers.common import (
  JAX_IMPLS,
  OPACUS_IMPLS,
  TORCH_IMPLS,
  Runner,
  UnavailableError,
  first_line,
)


def build(
  impl: str, model_name: str, batch: int, device: str, devices: int = 1, logical: int | None = None
) -> Runner:
  """The :class:`Runner` of ``impl`` on ``model_name`` at ``batch``, from its peer's module
  (jaxdp's: on ``devices`` devices, ``logical`` examples per step in physical batches)."""
  if impl in JAX_IMPLS:
    from benchmarks.workers import jax_peers, jax_setup, jaxdp_impl

    s = jax_setup.setup(model_name, batch, device)
    if impl.startswith("jaxdp_"):
      built = jaxdp_impl.build(s, impl, devices=devices, logical=logical)
    else:
      built = jax_peers.optax_dp(s) if impl == "optax_dp" else jax_peers.jax_privacy(s)
    return jax_setup.runner(s, *built)
  if impl not in TORCH_IMPLS:
    raise ValueError(f"--impl {impl!r} is not one of {JAX_IMPLS + TORCH_IMPLS}")
  from benchmarks.workers import opacus_impl, torch_impl, torch_setup

  s = torch_setup.setup(model_name, batch, device)
  if impl in OPACUS_IMPLS:
    return torch_setup.runner(s, *opacus_impl.build(s, impl))
  return torch_setup.runner(s, torch_impl.loop(s) if impl == "loop" else torch_impl.nonprivate(s))


class OtherLoad:
  """CPU time used by OTHER processes while timing, as a fraction of all CPUs (Linux).

  A busy machine distorts the comparison unevenly: PyTorch's OpenMP threads slow down by
  up to ~40x when another process holds a core, XLA's thread pool much less.
  """

  def __init__(self) -> None:
    self._start: tuple[float, float, float] | None = None

  @staticmethod
  def _busy_seconds() -> float | None:
    try:
      with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
      return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

  def start(self) -> None:
    """Marks the start of the timed window."""
    busy = self._busy_seconds()
    if busy is not None:
      self._start = (busy, time.process_time(), time.perf_counter())

  def fraction(self) -> float | None:
    """Other processes' CPU share since :meth:`start`, in [0, 1]; None if unknown."""
    busy = self._busy_seconds()
    if busy is None or self._start is None:
      return None
    b0, own0, t0 = self._start
    wall = time.perf_counter() - t0
    other = (busy - b0) - (time.process_time() - own0)
    return min(max(other / (wall * (os.cpu_count() or 1)), 0.0), 1.0)


def measure(
  runner: Runner,
  batch: int,
  *,
  rounds: int,
  warmup: int,
  round_seconds: float,
  min_steps: int = 2,
  max_steps: int = 10_000,
) -> dict[str, Any]:
  """Warm up, pick steps per round, time ``rounds`` rounds; examples/s per round."""
  base = runner.probe.current()
  t0 = time.perf_counter()
  try:
    runner.step(0)
    runner.sync()
  except Exception as e:
    reason = None if is_out_of_memory(e) else runner.unsupported(e)
    if reason is not None:
      raise UnavailableError(reason) from e
    raise
  first_step_s = time.perf_counter() - t0
  k = 1
  for _ in range(max(warmup - 1, 0)):
    runner.step(k)
    k += 1
  runner.sync()
  t0 = time.perf_counter()
  runner.step(k)
  k += 1
  runner.sync()
  estimate = time.perf_counter() - t0
  steps = int(min(max_steps, max(min_steps, math.ceil(round_seconds / max(estimate, 1e-9)))))
  runner.probe.reset_peak()
  other = OtherLoad()
  other.start()
  rates = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    for _ in range(steps):
      runner.step(k)
      k += 1
    runner.sync()
    rates.append(steps * batch / (time.perf_counter() - t0))
  peak = runner.probe.peak()
  other_load = other.fraction()
  median = statistics.median(rates)
  out: dict[str, Any] = {
    "examples_per_s": median,
    "min": min(rates),
    "max": max(rates),
    "rates": rates,
    "steps_per_round": steps,
    "first_step_s": first_step_s,
    "peak_mem_bytes": peak,
    "base_mem_bytes": base,
    "mem_kind": runner.probe.kind,
    "other_load": other_load,
    "cpus": os.cpu_count(),
  }
  if runner.framework == "jax":  # the first call traced and compiled, then ran one step
    out["compile_s"] = max(first_step_s - batch / median, 0.0)
  return out


def is_out_of_memory(e: BaseException) -> bool:
  """True for an allocation failure of any framework (host or device)."""
  if isinstance(e, MemoryError):
    return True
  text = f"{type(e).__name__} {e}".lower()
  return any(s in text for s in ("out of memory", "outofmemory", "resource_exhausted"))


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Builds and measures one configuration; never raises."""
  result: dict[str, Any] = {
    "model": args.model,
    "batch": args.batch,
    "impl": args.impl,
    "device": args.device,
    "devices": args.devices,
    "logical": args.logical or args.batch,
    "pid": os.getpid(),
    # glibc malloc settings the process started with (the harness gives all workers the same).
    "malloc_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")},
  }
  try:
    t0 = time.perf_counter()
    runner = build(args.impl, args.model, args.batch, args.device, args.devices, args.logical)
    result.update(framework=runner.framework, device_name=runner.device_name, **runner.info)
    result["build_s"] = time.perf_counter() - t0  # imports, data, model, optimiser
    result.update(
      measure(
        runner,
        args.logical or args.batch,
        rounds=args.rounds,
        warmup=args.warmup,
        round_seconds=args.round_seconds,
        min_steps=args.min_steps,
        max_steps=args.max_steps,
      )
    )
    if args.xla_memory and runner.xla_memory is not None:
      result.update(runner.xla_memory())
  except UnavailableError as e:
    result["skipped"] = str(e)
  except ModuleNotFoundError as e:
    result["skipped"] = f"{e.name} is not installed"
  except Exception as e:
    if is_out_of_memory(e):
      result["error"] = "out of memory"
      result["detail"] = first_line(e)
    else:
      traceback.print_exc()
      result["error"] = first_line(e)
  return result
