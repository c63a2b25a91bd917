"""jaxdp's own step: private (the fast engine), the reference engine, non-private; on one
device or a mesh of several, one physical batch per step or a logical batch of several."""

from __future__ import annotations

from typing import Any

from benchmarks.workers.common import L2_NORM_CLIP, LEARNING_RATE, NOISE_MULTIPLIER
from benchmarks.workers.jax_setup import JaxSetup


def build(
  s: JaxSetup, impl: str, *, devices: int = 1, logical: int | None = None
) -> tuple[Any, Any, Any]:
  """``(fn, call, state)`` of ``jaxdp_private`` / ``jaxdp_reference`` / ``jaxdp_nonprivate``.

  ``devices`` > 1 splits each physical batch's rows over a mesh of that many devices of the
  setup's kind; ``logical`` (a multiple of the batch) runs that many examples per step as
  ``logical / batch`` physical batches whose clipped sums add up before the one noise draw.
  """
  import jax
  import optax

  from jaxdp import DPConfig, init_state, make_step, parallel

  opt = optax.sgd(LEARNING_RATE)
  privacy = None
  if impl != "jaxdp_nonprivate":
    engine = "reference" if impl == "jaxdp_reference" else "auto"
    privacy = DPConfig(l2_norm_clip=L2_NORM_CLIP, noise_multiplier=NOISE_MULTIPLIER, engine=engine)
  mesh = parallel.mesh_for(jax.devices(s.device)[:devices]) if devices > 1 else None
  if devices > 1 and parallel.row_multiple(mesh) != devices:
    raise ValueError(f"--devices {devices}: only {parallel.row_multiple(mesh)} available")
  logical = logical or s.batch
  step = make_step(
    s.per_example_loss,
    opt,
    privacy,
    expected_batch_size=logical if privacy is not None else None,
    has_aux=True,
    mesh=mesh,
  )
  s.info.update(engine=step.engine, devices=step.num_devices, physical_batch=s.batch)
  state = init_state(s.params, opt, jax.random.key(1))
  if mesh is not None:  # once, before timing, as jaxdp.train does
    state, s.data = step.place(state), step.place(s.data)
  parts = logical // s.batch
  if parts == 1:
    # The step object is its own jitted function (lowering it again for XLA's buffer plan
    # reuses the compilation).
    return step, step, state
  call = lambda state, data, indices, mask: step.run(state, data, [(indices, mask)] * parts)
  return step, call, state
