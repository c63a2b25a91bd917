"""Session plumbing for ``pytest benchmarks/``: the plan, the result collector, the summary.

The pytest process never imports JAX or PyTorch; each measurement is a
``python -m benchmarks.workers`` subprocess started from the repository root.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `benchmarks` importable however pytest was started
  sys.path.insert(0, str(REPO_ROOT))

from benchmarks import harness  # noqa: E402

_written: list[Path] = []


@pytest.fixture(scope="session")
def plan() -> harness.Plan:
  """What this session runs (``JAXDP_BENCH=quick|full`` and the overrides)."""
  return harness.get_plan()


@pytest.fixture(scope="session")
def collector(plan: harness.Plan):
  """Collects worker results; writes the JSON, Markdown and plot when the session ends."""
  c = harness.Collector(plan)
  yield c
  if c.results:
    _written.extend(c.write())


try:  # pytest-benchmark provides `benchmark`; without it, a stand-in that just calls
  import pytest_benchmark  # noqa: F401
except ImportError:

  class _CallOnce:
    """Minimal stand-in for pytest-benchmark's fixture: runs the target once, untimed."""

    def __init__(self) -> None:
      self.extra_info: dict[str, Any] = {}
      self.group: str | None = None

    def pedantic(self, target, args=(), kwargs=None, **_: Any):
      return target(*args, **(kwargs or {}))

  @pytest.fixture
  def benchmark() -> _CallOnce:
    """Stand-in for pytest-benchmark's ``benchmark`` fixture (plugin not installed)."""
    return _CallOnce()


def pytest_report_header(config: pytest.Config) -> str:
  """One line saying which benchmark plan runs."""
  try:
    p = harness.get_plan()
  except ValueError as e:
    return f"jaxdp benchmarks: bad configuration: {e}"
  return (
    f"jaxdp benchmarks: mode={p.mode} device={p.device_name} cases={len(p.cases)} "
    f"rounds={p.rounds} results={p.json_path}"
  )


def pytest_terminal_summary(terminalreporter: Any) -> None:
  """Where the results went, and the ratio lines of the Markdown report."""
  if not _written:
    return
  terminalreporter.section("jaxdp benchmark results")
  for path in _written:
    terminalreporter.write_line(str(path))
  md = next((p for p in _written if p.suffix == ".md"), None)
  if md is not None and md.exists():
    terminalreporter.write_line("")
    for line in md.read_text().splitlines():
      if line.startswith(("## ", "### ", "| ", "- ", "jaxdp_private /")) and "---" not in line:
        terminalreporter.write_line(line)
