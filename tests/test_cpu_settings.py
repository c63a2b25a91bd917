"""The process-level CPU settings jaxdp applies on import (jaxdp/_cpu_flags.py).

Each case runs in a fresh interpreter: the settings act at process start-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # process settings, checked in subprocesses (not a privacy property)

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
  # The better of two probes: once, in the full suite beside the other worker, a tuned probe's
  # median call faulted 16k pages (it passed alone before and after); a broken tuning faults
  # on every call of both probes, as the control below does.
  tuned = min((_probe() for _ in range(2)), key=lambda r: r["faults"])
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


def _private_step_hlo() -> str:
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax

  import jaxdp
  from jaxdp.models import classifier_loss

  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = jnp.tanh(nn.Conv(4, (3, 3))(x))
      return nn.Dense(3)(x.reshape(x.shape[0], -1))

  model = Tiny()
  params = model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 1)))["params"]
  opt = optax.sgd(0.1)
  step = jaxdp.make_step(
    classifier_loss(model),
    opt,
    jaxdp.DPConfig(l2_norm_clip=1.0, noise_multiplier=1.0),
    expected_batch_size=4,
    has_aux=True,
  )
  data = {"image": jnp.ones((4, 6, 6, 1)), "label": jnp.zeros((4,), jnp.int32)}
  state = jaxdp.init_state(params, opt, jax.random.key(1))
  args = (state, data, jnp.arange(4), jnp.ones((4,), bool))
  return step._fused.lower(*args).compile().as_text()


def test_private_step_sends_dots_to_onednn(monkeypatch):
  import jax

  from jaxdp import _cpu_flags

  if jax.default_backend() != "cpu" or _cpu_flags._jaxlib_minor() not in (
    _cpu_flags.PRIVATE_STEP_OPTIONS
  ):
    pytest.skip("the option is for jaxlib versions it was measured on, on the CPU")
  # The per-example weight gradients of the conv are a batched dot: oneDNN runs it.
  assert "onednn_fusion" in _private_step_hlo()
  # Control: without the option XLA keeps its own dot, so the assertion above can fail.
  monkeypatch.setenv("JAXDP_XLA_FLAGS", "0")
  assert _cpu_flags.private_step_options() is None
  assert "onednn_fusion" not in _private_step_hlo()


def test_options_go_only_to_programs_with_batched_dots(monkeypatch):
  """A private step of dense layers only (no per-example product) keeps XLA's own dots."""
  import jax
  import jax.numpy as jnp
  import optax

  import jaxdp
  from jaxdp import _cpu_flags
  from jaxdp.models import classifier_loss, make_classifier

  plain = jax.make_jaxpr(lambda a, b: a @ b)(jnp.ones((3, 4)), jnp.ones((4, 5)))
  batched = jax.make_jaxpr(lambda a, b: jnp.einsum("bij,bjk->bik", a, b))(
    jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5))
  )
  body = lambda c, x: (c, jnp.einsum("bi,bi->b", x, x))
  nested = jax.make_jaxpr(lambda a: jax.lax.scan(body, 0, a))(jnp.ones((2, 3, 4)))
  assert not _cpu_flags.has_batched_dot(plain)
  assert _cpu_flags.has_batched_dot(batched)
  assert _cpu_flags.has_batched_dot(nested)

  options = {"xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
  monkeypatch.setattr(_cpu_flags, "private_step_options", lambda: options)
  data = {"image": jnp.ones((4, 28, 28, 1)), "label": jnp.zeros((4,), jnp.int32)}
  opt = optax.sgd(0.1)
  # MLP, fast: dense norms as products of norms, no batched dot; the TF-Privacy CNN, fast:
  # per-example conv gradients are batched dots; the reference engine never gets the option
  # (its WGAN-GP critic step corrupted the heap with it)
  for name, engine, expected in (("mlp", "fast", None), ("tf_cnn", "fast", options),
                                 ("mlp", "reference", None)):  # fmt: skip
    model = make_classifier(name)
    params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
    privacy = jaxdp.DPConfig(l2_norm_clip=1.0, noise_multiplier=1.0, engine=engine)
    step = jaxdp.make_step(
      classifier_loss(model), opt, privacy, expected_batch_size=4, has_aux=True
    )
    state = jaxdp.init_state(params, opt, jax.random.key(1))
    step(state, data, jnp.arange(4), jnp.ones((4,), bool))
    assert step._fused.compiler_options == expected, engine
    assert step.trace_count == 1  # choosing reused the trace
