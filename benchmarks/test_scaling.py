"""Scaling of the private step: examples/s against device count and logical batch size.

One worker process per configuration (see :mod:`benchmarks.scaling`); the tables go to
``benchmarks/results/scaling-<device>.md`` (quick mode: ``results/quick/``).
"""

from __future__ import annotations

import pytest

from benchmarks import harness, scaling

pytestmark = pytest.mark.slow  # timing runs

PLAN = scaling.get_plan()


@pytest.fixture(scope="module")
def results():
  collected: list[dict] = []
  yield collected
  if collected:
    for path in scaling.write(collected, PLAN):
      print(f"wrote {path}")


@pytest.mark.parametrize("case", PLAN.cases, ids=lambda c: c.id)
def test_scaling(case: harness.Case, results: list[dict]) -> None:
  """One device count or logical batch: the worker runs and reports a rate."""
  result = harness.run_worker(case, PLAN)
  results.append(result)
  if "error" in result:
    tail = "\n".join(result.get("stderr_tail", []))
    pytest.fail(f"{case.id}: {result['error']}\n{tail}", pytrace=False)
  assert result["devices"] == case.devices
  assert result["logical"] == (case.logical or case.batch)
  assert result["examples_per_s"] > 0
