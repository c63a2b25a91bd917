"""jaxdp's own step: private (the fast engine), the reference engine, non-private."""

from __future__ import annotations

from typing import Any

from benchmarks.workers.common import L2_NORM_CLIP, LEARNING_RATE, NOISE_MULTIPLIER
from benchmarks.workers.jax_setup import JaxSetup


def build(s: JaxSetup, impl: str) -> tuple[Any, Any, Any]:
  """``(fn, call, state)`` of ``jaxdp_private`` / ``jaxdp_reference`` / ``jaxdp_nonprivate``."""
  import jax
  import optax

  from jaxdp import DPConfig, init_state, make_step

  opt = optax.sgd(LEARNING_RATE)
  privacy = None
  if impl != "jaxdp_nonprivate":
    engine = "reference" if impl == "jaxdp_reference" else "auto"
    privacy = DPConfig(l2_norm_clip=L2_NORM_CLIP, noise_multiplier=NOISE_MULTIPLIER, engine=engine)
  step = make_step(
    s.per_example_loss,
    opt,
    privacy,
    expected_batch_size=s.batch if privacy is not None else None,
    has_aux=True,
  )
  s.info["engine"] = step.engine
  # The step object is its own jitted function (lowering it again for XLA's buffer plan
  # reuses the compilation).
  return step, step, init_state(s.params, opt, jax.random.key(1))
