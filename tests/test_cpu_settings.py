"""The process-level CPU settings jaxdp applies on import (jaxdp/_cpu_flags.py).

Each case runs in a fresh interpreter: the settings act at process start-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# A step whose 64 MiB intermediate is above glibc's largest mmap threshold (32 MiB): with
# default malloc every call maps it afresh and page-faults it in (16k faults of 4 KiB).
PROBE = """
import json, os, resource
import jaxdp, jax, jax.numpy as jnp
from jaxdp._cpu_flags import MALLOC_APPLIED
f = jax.jit(lambda a, b: (a @ b) @ b[0])
a, b = jnp.ones((4096, 4)), jnp.ones((4, 4096))
f(a, b).block_until_ready()
counts = []
for _ in range(15):
  f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(a, b).block_until_ready()
  counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
# The median call: the heap may still grow once or twice early on (a freed block split by a
# small allocation), after which no call faults.
faults = sorted(counts)[len(counts) // 2]
xla = os.environ.get("XLA_FLAGS", "")
print(json.dumps({"applied": MALLOC_APPLIED, "faults": faults, "xla": xla}))
"""


def _glibc() -> bool:
  try:
    return sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None
  except (AttributeError, ValueError, OSError):
    return False


linux_glibc = pytest.mark.skipif(not _glibc(), reason="malloc tuning is for glibc on Linux")


def _probe(**env: str) -> dict:
  base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
  base.pop("XLA_FLAGS", None)
  base.update(JAX_PLATFORMS="cpu", **env)
  out = subprocess.run(
    [sys.executable, "-c", PROBE], env=base, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@linux_glibc
def test_malloc_tuning_stops_per_step_page_faults():
  tuned = _probe()
  assert all(tuned["applied"].values()), tuned
  assert tuned["faults"] < 200, tuned
  # Control: the same program with default malloc faults its buffer in on every call, so the
  # assertion above would fail if the tuning did nothing.
  plain = _probe(JAXDP_MALLOC="0")
  assert not any(plain["applied"].values())
  assert plain["faults"] > 10_000, plain


@linux_glibc
def test_user_malloc_environment_wins():
  res = _probe(MALLOC_ARENA_MAX="4")
  assert res["applied"]["MALLOC_ARENA_MAX"] is False
  assert res["applied"]["MALLOC_MMAP_MAX_"] is True


def test_xla_flags_added_unless_disabled():
  assert "--xla_cpu_use_onednn=true" in _probe()["xla"]
  assert _probe(JAXDP_XLA_FLAGS="0")["xla"] == ""
  # A flag the user set is kept as the user set it.
  mine = _probe(XLA_FLAGS="--xla_cpu_use_onednn=false")["xla"]
  assert "--xla_cpu_use_onednn=false" in mine and "--xla_cpu_use_onednn=true" not in mine
