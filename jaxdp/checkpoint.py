"""Checkpoint and resume a training run with ``orbax-checkpoint``.

A checkpoint is everything the rest of a run depends on, so that a resumed run takes
exactly the steps, batches and noise a straight run takes, and is charged for exactly the
same steps:

* the :class:`~jaxdp.step.TrainState`: step count, parameters, optimiser state and the
  PRNG key that every later per-example key and noise draw derives from;
* the sampler's position (its generator state, and a shuffled sampler's queue);
* the finished epochs' history (what the caller logs and plots).

The privacy ledger needs no copy: the number of steps taken is in the state, and the
accountant charges ``state.step`` steps, no more, no fewer.

Writes are atomic: orbax writes each checkpoint into a temporary folder and renames it when
complete, and :meth:`Checkpointer.restore` reads only completed ones, so a run killed while
writing resumes from the last complete checkpoint.

A checkpoint holds the secret key and sampler state: anyone who has it can replay the
noise. Keep it private (the experiments write it under the run's ``nondp/``) and delete it
once the run is done.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxdp import _validate
from jaxdp.sampling import PoissonSampler, ShuffledSampler
from jaxdp.step import TrainState

__all__ = ["Checkpointer", "sampler_state", "set_sampler_state"]


def sampler_state(sampler: PoissonSampler | ShuffledSampler) -> dict[str, Any]:
  """The sampler's position as JSON-able data (secret: it determines the next batches)."""
  out: dict[str, Any] = {"generator": sampler._rng.bit_generator.state}
  if isinstance(sampler, ShuffledSampler):
    out["queue"] = [q.tolist() for q in sampler._queue]
  return out


def set_sampler_state(sampler: PoissonSampler | ShuffledSampler, state: dict[str, Any]) -> None:
  """Puts ``sampler`` at the position :func:`sampler_state` recorded."""
  sampler._rng.bit_generator.state = state["generator"]
  if isinstance(sampler, ShuffledSampler):
    sampler._queue = [np.asarray(q, np.int32) for q in state.get("queue", [])]


def _jsonable(entry: dict[str, Any]) -> dict[str, Any]:
  """A history entry without its arrays (per-example norms are diagnostics of one step)."""
  return {
    k: float(v) if isinstance(v, np.generic) else v for k, v in entry.items() if np.ndim(v) == 0
  }


def _arrays(state: TrainState) -> dict[str, Any]:
  """The state as the array tree orbax stores (the typed key as its raw key data)."""
  return {
    "step": state.step,
    "params": state.params,
    "opt_state": state.opt_state,
    "rng": jax.random.key_data(state.rng),
  }


class Checkpointer:
  """Saves a run's state every ``every`` epochs into ``directory`` and restores the latest.

  Args:
    directory: the run's checkpoint folder (created).
    every: save after every ``every``-th epoch (and after the last).
    keep: how many checkpoints to keep (older ones are deleted).
  """

  def __init__(self, directory: str | os.PathLike[str], *, every: int = 1, keep: int = 2) -> None:
    _validate.positive_int("every", every)
    _validate.positive_int("keep", keep)
    self.directory = Path(directory).absolute()
    self.every = every
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_epoch(self) -> int | None:
    """The last epoch with a complete checkpoint, or None."""
    return self._manager.latest_step()

  def due(self, epoch: int, epochs: int) -> bool:
    """Whether epoch ``epoch`` (1-based) of ``epochs`` ends with a save."""
    return epoch % self.every == 0 or epoch == epochs

  def save(
    self,
    epoch: int,
    state: TrainState,
    sampler: PoissonSampler | ShuffledSampler,
    history: list[dict[str, Any]],
  ) -> None:
    """Writes the checkpoint of the end of ``epoch`` and waits until it is complete."""
    tree = _arrays(state)
    meta = {
      "epoch": epoch,
      "rng_impl": str(jax.random.key_impl(state.rng)),
      "sampler": sampler_state(sampler),
      "history": [_jsonable(e) for e in history],
    }
    args = ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta))
    self._manager.save(epoch, args=args, force=True)
    self._manager.wait_until_finished()

  def restore(
    self, state: TrainState, sampler: PoissonSampler | ShuffledSampler
  ) -> tuple[TrainState, int, list[dict[str, Any]]] | None:
    """The latest complete checkpoint, or None when there is none.

    Args:
      state: a state of the run's structure (e.g. the fresh one); its values are replaced.
      sampler: the run's sampler; its position is replaced.

    Returns:
      ``(state, epoch, history)``: the state after ``epoch`` epochs and their history.
    """
    epoch = self.latest_epoch()
    if epoch is None:
      return None
    args = ocp.args.Composite(
      state=ocp.args.StandardRestore(_arrays(state)), meta=ocp.args.JsonRestore()
    )
    got = self._manager.restore(epoch, args=args)
    tree, meta = got["state"], got["meta"]
    rng = jax.random.wrap_key_data(tree["rng"], impl=meta["rng_impl"])
    set_sampler_state(sampler, meta["sampler"])
    restored = TrainState(tree["step"], tree["params"], tree["opt_state"], rng)
    return restored, int(meta["epoch"]), list(meta["history"])

  def close(self) -> None:
    """Waits for pending writes and releases the manager."""
    self._manager.close()
