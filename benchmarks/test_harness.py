"""The benchmark harness's book-keeping: results are saved as each worker finishes.

No worker runs here: the results are made up, the point is what reaches the disk.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import harness


def _plan(results_dir: Path, mode: str = "full") -> harness.Plan:
  return harness.Plan(
    mode=mode,
    device="cpu",
    device_name="cpu",
    cases=(),
    rounds=2,
    warmup=1,
    round_seconds=0.1,
    timeout_s=60.0,
    memory_batch=256,
    results_dir=results_dir,
  )


def _result(impl: str, rate: float, repeat: int = 0) -> dict:
  return {
    "model": "mlp",
    "batch": 256,
    "impl": impl,
    "repeat": repeat,
    "examples_per_s": rate,
    "rates": [rate, rate],
    "peak_mem_bytes": 1,
    "base_mem_bytes": 0,
    "mem_kind": "rss",
    "steps_per_round": 3,
  }


def _rows(path: Path) -> dict[str, dict]:
  return {r["impl"]: r for r in json.loads(path.read_text())}


def test_each_result_is_on_disk_before_the_session_ends(tmp_path: Path) -> None:
  """A session cut off after its first worker still leaves that worker's row, merged."""
  old = [
    {**dict.fromkeys(harness.ROW_KEYS), "model": "mlp", "batch": 256, "device": "cpu", **r}
    for r in (
      {"impl": "opacus_hooks", "examples_per_s": 5.0},
      {"impl": "loop", "examples_per_s": 1.0},
    )
  ]
  path = tmp_path / "cpu.json"
  path.write_text(json.dumps(old))
  collector = harness.Collector(_plan(tmp_path))

  collector.add(_result("opacus_hooks", 7.0))  # no write(): as if killed right after
  rows = _rows(path)
  assert rows["opacus_hooks"]["examples_per_s"] == 7.0  # this session's row replaced the old
  assert rows["loop"]["examples_per_s"] == 1.0  # rows it did not measure are kept

  collector.add(_result("opacus_hooks", 9.0, repeat=1))
  rows = _rows(path)
  assert rows["opacus_hooks"]["examples_per_s"] == 8.0  # the median over both processes
  assert rows["opacus_hooks"]["processes"] == 2
  assert sorted(rows) == ["loop", "opacus_hooks"]
  assert not list(tmp_path.glob("*.tmp"))


def test_quick_mode_overwrites_and_never_merges(tmp_path: Path) -> None:
  path = tmp_path / "cpu.json"
  path.write_text(json.dumps([{"model": "mlp", "batch": 256, "impl": "loop", "device": "cpu"}]))
  collector = harness.Collector(_plan(tmp_path, mode="quick"))
  collector.add(_result("jaxdp_private", 3.0))
  assert sorted(_rows(path)) == ["jaxdp_private"]
