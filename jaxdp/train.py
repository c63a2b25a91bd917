"""The training loop every experiment shares: steps, progress bars, epsilon so far, history.

:func:`train` knows nothing about the model: it draws batches from a sampler, runs the one
jitted :class:`~jaxdp.step.Step` on the device data, and keeps per-epoch means of what the
step reports (loss, clip statistics, and the masked mean of a per-example ``aux`` such as a
classifier's "correct" flag). Evaluation is the caller's, through ``on_epoch``. Running sums
stay on the device; the host reads them only to refresh the progress bar and at the end of
an epoch, so the loop does not stall the device step by step.

    state, history = train(step, state, data, sampler, epochs=10, tracker=tracker,
                           on_epoch=lambda epoch, state: evaluate(state.params))
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxdp import _validate, parallel
from jaxdp.accounting import EpsilonTracker
from jaxdp.checkpoint import Checkpointer
from jaxdp.sampling import PhysicalBatch, PoissonSampler, ShuffledSampler
from jaxdp.step import Step, TrainState

__all__ = ["EpochCallback", "train"]

PyTree = Any
EpochCallback = Callable[[int, TrainState], Mapping[str, float] | None]

# Step statistics averaged over an epoch, weighted by the real batch size.
_STEP_STATS = ("loss", "grad_norm_mean", "clip_fraction", "nonfinite_fraction")


def _aux_arrays(aux: Any, aux_name: str) -> dict[str, jax.Array]:
  """Per-example aux as named arrays: a dict as is, a single array under ``aux_name``."""
  if isinstance(aux, Mapping):
    return dict(aux)
  return {aux_name: aux}


@jax.jit
def _accumulate(sums: dict[str, jax.Array], metrics: dict[str, Any], mask: jax.Array):
  """Adds one step's weighted statistics (and masked aux sums) to the running sums."""
  n = jnp.asarray(metrics["batch_size"], jnp.float32)
  out = dict(sums)
  out["n"] = sums["n"] + n
  for key in _STEP_STATS:
    if key in sums:
      out[key] = sums[key] + n * jnp.asarray(metrics[key], jnp.float32)
  if "aux" in metrics:
    m = jnp.asarray(mask, jnp.float32)
    out["aux_n"] = sums["aux_n"] + jnp.sum(m)
    for key, value in metrics["aux"].items():
      out[f"aux_{key}"] = sums[f"aux_{key}"] + jnp.sum(m * jnp.asarray(value, jnp.float32))
  return out


def _means(sums: dict[str, jax.Array], aux_keys: list[str]) -> dict[str, float]:
  """Host means of the running sums, named train_<stat>."""
  host = jax.device_get(sums)
  n, aux_n = max(float(host["n"]), 1.0), float(host["aux_n"])
  out = {}
  for key in _STEP_STATS:
    if key in host and float(host["n"]) > 0:
      out[f"train_{key}"] = float(host[key]) / n
  if aux_n > 0:
    for key in aux_keys:
      out[f"train_{key}"] = float(host[f"aux_{key}"]) / aux_n
  return out


def train(
  step: Step,
  state: TrainState,
  data: PyTree,
  sampler: PoissonSampler | ShuffledSampler,
  *,
  epochs: int,
  steps_per_epoch: int | None = None,
  tracker: EpsilonTracker | None = None,
  on_epoch: EpochCallback | None = None,
  on_entry: Callable[[dict[str, Any]], None] | None = None,
  aux_name: str = "accuracy",
  desc: str = "train",
  progress: bool = True,
  refresh_every: int | None = None,
  checkpoint: Checkpointer | None = None,
  side_inputs: Callable[[list[PhysicalBatch]], list[dict[str, Any]]] | None = None,
  after_step: Callable[[int, TrainState], None] | None = None,
) -> tuple[TrainState, list[dict[str, float]]]:
  """Runs ``epochs * steps_per_epoch`` logical steps of ``step``.

  Args:
    step: the jitted step (private or not) from :func:`jaxdp.make_step`.
    state: the starting :class:`TrainState`.
    data: the dataset as a pytree of device arrays with a leading example axis; batches are
      gathered from it by index inside the step.
    sampler: draws each logical batch (its physical batches and masks).
    epochs: number of epochs, >= 1.
    steps_per_epoch: steps per epoch; defaults to ``sampler.steps_per_epoch`` (``round(1/q)``
      for Poisson sampling).
    tracker: if given, the cheap RDP epsilon so far is shown (``eps_rdp``) and recorded per
      epoch (``epsilon_rdp``); its sampling probability and noise multiplier must be the
      step's. RDP is an upper bound a little above the PLD epsilon a run should report.
    on_epoch: called as ``on_epoch(epoch, state)`` after each epoch (1-based); the floats it
      returns (e.g. ``{"validation_accuracy": ...}``) go into that epoch's history entry.
    on_entry: called with each epoch's finished history entry, as soon as it is complete
      (e.g. to write it to a log while training goes on).
    aux_name: name of a per-example aux array (``has_aux`` steps): its masked mean is
      reported as ``train_<aux_name>``; a dict aux gives ``train_<key>`` for each key.
    desc: progress-bar label.
    progress: show a tqdm bar per epoch (on stderr).
    refresh_every: read the running means for the bar every this many steps (a device sync);
      defaults to about ten times per epoch.
    checkpoint: if given, the run starts from its latest checkpoint (state, sampler
      position, history; ``on_entry`` is not called again for restored epochs) and saves
      one at the end of every ``checkpoint.every``-th epoch and of the last: a resumed run
      takes exactly the steps, batches and noise of a straight one.
    side_inputs: ``side_inputs(batches)`` gives each physical batch's per-row side inputs
      (:meth:`Step.run`'s ``rows``, e.g. a GAN critic's generated half of each pair).
    after_step: called as ``after_step(step, state)`` after each step (its count so far),
      e.g. to update a generator from the critic. Its own state is not checkpointed.

  Returns:
    ``(state, history)``: the final state and one dict per epoch with ``epoch``, ``step``,
    ``time`` (seconds since the start, evaluation included), ``train_loss``, for private
    steps ``train_grad_norm_mean``, ``train_clip_fraction``, ``train_nonfinite_fraction``
    and ``grad_norms`` (the last step's per-example norms, a numpy array), ``train_<aux>``
    when the step has aux, ``epsilon_rdp`` with a tracker, and whatever ``on_epoch``
    returned. Every ``train_*`` value and ``grad_norms`` is a statistic of private batches
    without noise: a diagnostic, not to be released.

  Notes:
    A logical step whose Poisson draw needed more than one physical batch (rare: the
    default physical size is mean + 4 std) reports no per-example aux, so it is left out of
    ``train_<aux>``; its loss is still counted.
  """
  _validate.positive_int("epochs", epochs)
  if steps_per_epoch is None:
    steps_per_epoch = sampler.steps_per_epoch
  _validate.positive_int("steps_per_epoch", steps_per_epoch)
  if refresh_every is None:
    refresh_every = max(1, steps_per_epoch // 10)
  _validate.positive_int("refresh_every", refresh_every)
  if tracker is not None and step.privacy is not None:
    same_q = abs(tracker.sampling_prob - sampler.sampling_prob) <= 1e-12
    if not same_q or tracker.noise_multiplier != step.privacy.noise_multiplier:
      raise ValueError(
        "tracker must describe the run: sampling_prob "
        f"{tracker.sampling_prob} vs sampler {sampler.sampling_prob}, noise_multiplier "
        f"{tracker.noise_multiplier} vs step {step.privacy.noise_multiplier}"
      )

  parallel.check_rows(sampler.physical_batch_size, step.mesh)
  # On a mesh, the state and the data are copied to every device once, here.
  state, data = step.place(state), step.place(data)
  history: list[dict[str, float]] = []
  first = 1
  restored = checkpoint.restore(state, sampler) if checkpoint is not None else None
  if restored is not None:
    state, done_epochs, history = restored
    if done_epochs > epochs:
      raise ValueError(f"the checkpoint is at epoch {done_epochs}, beyond epochs={epochs}")
    first = done_epochs + 1
  start_step = int(state.step)
  done = 0
  t0 = time.perf_counter()
  for epoch in range(first, epochs + 1):
    sums: dict[str, jax.Array] = {"n": jnp.zeros(()), "aux_n": jnp.zeros(())}
    aux_keys: list[str] = []
    last_norms = None
    bar = tqdm(
      total=steps_per_epoch, desc=f"{desc} {epoch}/{epochs}", disable=not progress, leave=True
    )
    for i in range(steps_per_epoch):
      batches = sampler.sample()
      rows = None if side_inputs is None else side_inputs(batches)
      state, metrics = step.run(state, data, batches, rows)
      metrics = dict(metrics)
      norms = metrics.pop("grad_norms", None)
      # The aux rows of several physical batches come concatenated, like their masks.
      mask = np.concatenate([b.mask for b in batches])
      if "aux" in metrics:
        metrics["aux"] = _aux_arrays(metrics["aux"], aux_name)
        for key in metrics["aux"]:
          if key not in aux_keys:
            aux_keys.append(key)
            sums[f"aux_{key}"] = jnp.zeros(())
      metrics = {k: v for k, v in metrics.items() if k in ("batch_size", "aux", *_STEP_STATS)}
      for key in _STEP_STATS:
        if key in metrics and key not in sums:
          sums[key] = jnp.zeros(())
      sums = _accumulate(sums, metrics, mask)
      done += 1
      if after_step is not None:
        after_step(start_step + done, state)
      bar.update(1)
      if i + 1 == steps_per_epoch and norms is not None:
        last_norms = np.asarray(norms)[mask]
      if progress and ((i + 1) % refresh_every == 0 or i + 1 == steps_per_epoch):
        shown = _means(sums, aux_keys)
        if tracker is not None:
          shown["eps_rdp"] = tracker.epsilon(start_step + done)
        bar.set_postfix(_short(shown), refresh=False)
    entry: dict[str, Any] = {"epoch": epoch, "step": start_step + done}
    entry.update(_means(sums, aux_keys))
    if last_norms is not None:
      entry["grad_norms"] = last_norms
    if tracker is not None:
      entry["epsilon_rdp"] = tracker.epsilon(start_step + done)
    if on_epoch is not None:
      extra = on_epoch(epoch, state)
      if extra:
        entry.update({k: float(v) for k, v in extra.items()})
        if progress:
          bar.set_postfix(_short({**entry, "eps_rdp": entry.get("epsilon_rdp")}), refresh=False)
    entry["time"] = time.perf_counter() - t0
    bar.close()
    history.append(entry)
    if on_entry is not None:
      on_entry(entry)
    if checkpoint is not None and checkpoint.due(epoch, epochs):
      checkpoint.save(epoch, state, sampler, history)
  return state, history


def _short(values: Mapping[str, Any]) -> dict[str, str]:
  """Compact progress-bar fields: train_loss -> loss, 4 significant digits."""
  out = {}
  for key, value in values.items():
    if value is None or np.ndim(value) or key in ("epoch", "step", "time", "epsilon_rdp"):
      continue
    name = key.removeprefix("train_").replace("accuracy", "acc")
    if name in ("grad_norm_mean", "clip_fraction", "nonfinite_fraction"):
      continue
    out[name] = f"{value:.4g}"
  return out
