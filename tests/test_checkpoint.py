"""Checkpoint and resume: a resumed run equals a straight one (parameters, steps, epsilon,
history), and a checkpoint left half-written is ignored; logical batches in several
physical batches train the same model."""

from __future__ import annotations

import shutil

import jax
import numpy as np
import optax
import pytest
from conftest import make_problem

from jaxdp import accounting
from jaxdp.checkpoint import Checkpointer
from jaxdp.sampling import PoissonSampler, ShuffledSampler
from jaxdp.step import DPConfig, init_state, make_step
from jaxdp.train import train

EPOCHS = 4


class KilledError(Exception):
  """Stands for the process dying after an epoch's checkpoint."""


def _run(tmp_path, *, kill_after=None, shuffled=False, checkpoint=True):
  loss_fn, params, data = make_problem("mlp", batch_size=48)
  opt = optax.sgd(0.1, momentum=0.9)
  privacy = DPConfig(l2_norm_clip=1.0, noise_multiplier=1.1)
  if shuffled:
    with pytest.warns(UserWarning, match="not Poisson"):
      sampler = ShuffledSampler(48, batch_size=16, seed=3)
  else:
    sampler = PoissonSampler(48, expected_batch_size=12, seed=3)
  step = make_step(loss_fn, opt, privacy, expected_batch_size=12, microbatch_size=None)
  state = init_state(params, opt, jax.random.key(7))
  ckpt = Checkpointer(tmp_path / "ckpt", every=1) if checkpoint else None

  def on_entry(entry):
    if kill_after is not None and entry["epoch"] == kill_after + 1:
      raise KilledError  # dies during the epoch after the last checkpoint

  try:
    return train(step, state, data, sampler, epochs=EPOCHS, on_entry=on_entry, progress=False,
                 checkpoint=ckpt)  # fmt: skip
  finally:
    if ckpt is not None:
      ckpt.close()


def _same(a, b) -> bool:
  """Bit for bit."""
  pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in pairs)


@pytest.mark.parametrize("shuffled", [False, True])
def test_resumed_run_equals_a_straight_run(tmp_path, shuffled):
  straight, straight_history = _run(tmp_path / "a", shuffled=shuffled, checkpoint=False)
  with pytest.raises(KilledError):
    _run(tmp_path / "b", kill_after=2, shuffled=shuffled)
  resumed, history = _run(tmp_path / "b", shuffled=shuffled)
  assert int(resumed.step) == int(straight.step)
  for a, b in zip(
    jax.tree_util.tree_leaves(straight.params),
    jax.tree_util.tree_leaves(resumed.params),
    strict=True,
  ):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  assert [e["step"] for e in history] == [e["step"] for e in straight_history]
  assert history[0]["train_loss"] == pytest.approx(straight_history[0]["train_loss"])
  # The accountant charges the steps in the state: the same epsilon, no step twice.
  q = 12 / 48
  eps = lambda s: accounting.epsilon(accounting.dpsgd_event(q, 1.1, int(s.step)), 1e-5)
  assert eps(resumed) == eps(straight)


def test_a_half_written_checkpoint_is_ignored(tmp_path):
  with pytest.raises(KilledError):
    _run(tmp_path, kill_after=2)
  folder = tmp_path / "ckpt"
  # A write of epoch 3 that never finished: orbax renames a folder into place only when
  # it is complete, so what a kill leaves behind is a temporary folder.
  shutil.copytree(folder / "2", folder / "3.orbax-checkpoint-tmp-1")
  for f in (folder / "3.orbax-checkpoint-tmp-1").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  ckpt = Checkpointer(folder)
  assert ckpt.latest_epoch() == 2
  ckpt.close()
  resumed, history = _run(tmp_path)
  straight, _ = _run(tmp_path / "straight", checkpoint=False)
  assert [e["epoch"] for e in history] == [1, 2, 3, 4]
  assert _same(straight.params, resumed.params)


def test_an_experiment_killed_mid_run_resumes_to_the_straight_result(tmp_path, monkeypatch, spy):
  """dp_classifier.py with --checkpoint-every 1, killed after the DP model's first epoch,
  then --resume: the same released model and epsilon as a straight run, and the secret
  checkpoints gone at the end."""
  from test_dp_classifier import SCRIPT, TINY, load_script

  exp = load_script(SCRIPT)
  args = [*TINY, "--insecure-reproducible-noise", "--epochs", "3", "--out", str(tmp_path)]
  straight = exp.main([*args, "--name", "straight"])

  save = Checkpointer.save

  def dying_save(self, epoch, *a, **k):
    save(self, epoch, *a, **k)
    if "DP-SGD" in str(self.directory) and epoch == 1:
      raise KilledError

  monkeypatch.setattr(Checkpointer, "save", dying_save)
  with pytest.raises(KilledError):
    exp.main([*args, "--name", "run", "--checkpoint-every", "1"])
  monkeypatch.setattr(Checkpointer, "save", save)
  folder = tmp_path / "run"
  assert (folder / "nondp" / "resume").is_dir() and not (folder / "metrics.json").exists()
  with pytest.raises(SystemExit):  # other settings than the run's
    exp.main([*args, "--resume", str(folder), "--epochs", "4"])
  restores = spy(Checkpointer, "restore")
  resumed = exp.main([*args, "--resume", str(folder), "--checkpoint-every", "1"])
  restored = {c.arguments["self"].directory.name: None if c.result is None else c.result[1]
              for c in restores}  # fmt: skip
  # The non-private model had finished (its last epoch restored), the DP one resumes at 1.
  assert restored == {"non-private": 1, "DP-SGD_eps3": 1}, restored
  (a,), (b,) = straight["models"], resumed["models"]
  assert a["steps"] == b["steps"] and a["epsilon_pld"] == b["epsilon_pld"]
  assert (
    a["test_accuracy"] == b["test_accuracy"]
    and a["validation_accuracy"] == b["validation_accuracy"]
  )
  assert (folder / b["checkpoint"]).read_bytes() == (
    tmp_path / "straight" / a["checkpoint"]
  ).read_bytes()
  assert resumed["privacy"]["epsilon_pld"] == straight["privacy"]["epsilon_pld"]
  assert not (folder / "nondp" / "resume").exists()  # the secret state is deleted


def test_a_logical_batch_in_several_physical_batches_trains_the_same_model(tmp_path):
  """--physical-batch splits each Poisson batch into pieces whose clipped sums add up
  before the one noise draw: the same model as one piece (up to float summation order)."""
  from test_dp_classifier import SCRIPT, TINY, load_script

  exp = load_script(SCRIPT)
  args = [*TINY, "--insecure-reproducible-noise", "--no-baseline", "--out", str(tmp_path)]
  one = exp.main([*args, "--name", "one"])
  split = exp.main([*args, "--name", "split", "--physical-batch", "24"])
  (a,), (b,) = one["models"], split["models"]
  assert b["physical_batch_size"] == 24 < a["expected_batch_size"] < a["physical_batch_size"]
  assert a["steps"] == b["steps"] and a["epsilon_pld"] == b["epsilon_pld"]
  assert b["validation_loss"] == pytest.approx(a["validation_loss"], rel=1e-4)
