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


def test_the_report_marks_each_ratio_that_misses_its_target() -> None:
  """The ratio table shows the shortfall: a ratio below its speed target or above its memory
  target carries the mark, one that meets it does not; the GPU's memory target is its own."""
  from benchmarks import report

  def row(impl: str, rate: float, temp: int, batch: int = 256, device: str = "cpu") -> dict:
    return {"model": "mlp", "batch": batch, "impl": impl, "device": device,
            "examples_per_s": rate, "min": rate, "max": rate, "xla_temp_bytes": temp,
            "peak_mem_bytes": 1}  # fmt: skip

  def ratios(md: str, batch: int) -> list[str]:
    (line,) = [x for x in md.splitlines() if x.startswith(f"| {batch} |") and "x" in x]
    return [c.strip() for c in line.strip("|").split("|")][3:9]

  # batch 256 misses every target: Opacus 1.5x (< 2), non-private 0.8x (< 0.85), PyTorch
  # 0.9x (< 1), XLA temp 1.6x (> 1.5); batch 1024 meets them all.
  rows = [row("jaxdp_private", 80, 16), row("opacus_ghost", 53.3, 0),
          row("jaxdp_nonprivate", 100, 10), row("torch_nonprivate", 111.1, 0)]  # fmt: skip
  big = 1024
  rows += [row("jaxdp_private", 200, 14, big), row("opacus_ghost", 100, 0, big),
           row("jaxdp_nonprivate", 220, 10, big), row("torch_nonprivate", 200, 0, big)]  # fmt: skip
  md = report.markdown(rows)
  missed = report.MISSED.strip()
  low = ratios(md, 256)
  assert [low[0], low[1], low[4], low[5]] == ["1.50x " + missed, "0.80x " + missed,
                                              "0.90x " + missed, "1.60x " + missed]  # fmt: skip
  high = ratios(md, 1024)
  assert [high[0], high[1], high[4], high[5]] == ["2.00x", "0.91x", "1.10x", "1.40x"]
  assert "<= 1.5x" in md
  gpu = [{**r, "device": "gpu"} for r in rows]  # 1.6x meets the GPU's 2x
  assert ratios(report.markdown(gpu), 256)[5] == "1.60x" and "<= 2x" in report.markdown(gpu)
