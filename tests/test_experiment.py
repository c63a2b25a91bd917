"""The experiment library: flags from configs, data splits, secret keys, the run folder."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from typing import ClassVar

import jax
import numpy as np
import optax
import pytest
from conftest import make_problem

import jaxdp
from jaxdp import keys as keys_lib
from jaxdp.experiment import cli, runs, splits
from jaxdp.experiment.cli import option
from jaxdp.experiment.settings import PrivacySettings, RunSettings

# -- flags -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Toy(PrivacySettings, RunSettings):
  PRESETS: ClassVar = {"quick": {"epochs": 2, "widths": (4,)}}

  epochs: int = option(30, "training epochs", check="positive_int")
  widths: tuple[int, ...] = option((8, 8), "layer widths", check="positive_ints")
  lr: float | None = option(None, "learning rate", check="positive")
  kind: str = option("a", "a choice", choices=("a", "b"))


def test_flags_come_from_the_fields_with_presets_and_types():
  cfg = cli.parse(Toy, [])
  assert (cfg.epochs, cfg.widths, cfg.lr, cfg.quick, cfg.progress) == (
    30,
    (8, 8),
    None,
    False,
    True,
  )
  cfg = cli.parse(Toy, ["--quick", "--widths", "3,5", "--lr", "0.5", "--no-progress"])
  assert (cfg.epochs, cfg.widths, cfg.lr, cfg.progress) == (2, (3, 5), 0.5, False)
  cfg = cli.parse(Toy, ["--quick", "--epochs", "7", "--epsilons", "1,inf", "--widths", "none"])
  assert cfg.epochs == 7 and cfg.epsilons == (1.0, float("inf")) and cfg.widths == ()
  assert [j.label for j in cfg.jobs()] == ["DP eps=1", "non-private"]
  assert cli.parse(Toy, ["--microbatch-size", "none"]).microbatch_size is None


@pytest.mark.parametrize(
  ("argv", "needle"),
  [
    (["--epochs", "0"], "--epochs must be an integer >= 1"),
    (["--epochs", "two"], "--epochs must be an integer"),
    (["--widths", "4,0"], "--widths must be integers >= 1"),
    (["--lr", "-1"], "--lr must be"),
    (["--kind", "c"], "--kind"),
    (["--delta", "2"], "--delta must be in (0, 1)"),
    (["--clip", "nan"], "--clip must be"),
    (["--seed", "-1"], "--seed must be an integer >= 0"),
    (["--name", "a/b"], "--name must be a plain folder name"),
    (["--target-epsilon", "1", "--epsilons", "2"], "at most one of"),
    (["--bogus"], "unrecognized arguments"),
    (["--devices", "0"], "--devices must be an integer >= 1"),
    (["--devices", "99"], "--devices must be between 1 and"),
    (["--physical-batch", "0"], "--physical-batch must be an integer >= 1"),
  ],
)
def test_a_bad_flag_exits_with_one_line(argv, needle, capsys):
  with pytest.raises(SystemExit) as info:
    cli.parse(Toy, argv)
  assert info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and needle in err[0], err


# -- splits ------------------------------------------------------------------------------


def test_splits_partition_the_training_set_and_the_test_set_is_read_once():
  s = splits.load_splits("synthetic", train_size=500, validation_size=300, public_size=200, seed=4)
  full = splits.load_splits("synthetic", seed=4)
  assert (len(s.private), len(s.validation), len(s.public)) == (500, 300, 200)
  assert len(full.private) == splits.SYNTHETIC_SIZES[0] and full.validation is None
  rows = lambda ds: {x.tobytes() for x in ds.images}
  parts = [rows(s.private), rows(s.validation), rows(s.public)]
  assert sum(map(len, parts)) == len(set.union(*parts)) == 1000  # disjoint
  assert set.union(*parts) <= rows(full.private)
  again = splits.load_splits(
    "synthetic", train_size=500, validation_size=300, public_size=200, seed=4
  )
  np.testing.assert_array_equal(again.private.labels, s.private.labels)  # the seed fixes it
  assert s.num_classes == 10
  assert len(s.final_test("model a")) == s.test_size == splits.SYNTHETIC_SIZES[1]
  with pytest.raises(RuntimeError, match="already read"):
    s.final_test("model a")
  s.final_test("model b")
  assert s.test_reads == ["model a", "model b"]
  with pytest.raises(ValueError, match="--validation-size"):
    splits.load_splits("synthetic", validation_size=1000, public_size=500)


# -- secret keys -------------------------------------------------------------------------


def test_keys_are_secret_by_default_and_independent_per_use():
  data = lambda k: np.asarray(jax.random.key_data(k)).tobytes()
  assert data(jaxdp.secure_key()) != data(jaxdp.secure_key())
  a, b = keys_lib.KeySource(), keys_lib.KeySource()
  assert a.secure and data(a.key("x/noise")) != data(b.key("x/noise"))
  c, d = keys_lib.KeySource(insecure_seed=5), keys_lib.KeySource(insecure_seed=5)
  assert not c.secure and data(c.key("x/noise")) == data(d.key("x/noise"))
  assert data(c.key("y/noise")) != data(d.key("x/other"))
  assert (
    c.seed("x/batches").generate_state(2).tolist() == d.seed("x/batches").generate_state(2).tolist()
  )
  with pytest.raises(ValueError, match="already used"):
    c.key("x/noise")
  # The noise of a seed differs from a key made from that seed by hand (a domain of its own).
  assert data(keys_lib.KeySource(insecure_seed=0).key("n")) != data(jax.random.key(0))


def test_samplers_and_states_draw_secret_randomness_by_default():
  a = jaxdp.PoissonSampler(1000, expected_batch_size=100)
  b = jaxdp.PoissonSampler(1000, expected_batch_size=100)
  assert not np.array_equal(a.sample()[0].indices, b.sample()[0].indices)
  _, params, _ = make_problem("mlp")
  opt = optax.sgd(0.1)
  s1, s2 = jaxdp.init_state(params, opt), jaxdp.init_state(params, opt)
  assert not np.array_equal(jax.random.key_data(s1.rng), jax.random.key_data(s2.rng))


# -- the run folder ----------------------------------------------------------------------


def test_run_folder_separates_released_and_non_dp_files(tmp_path):
  run = runs.RunFolder.create(tmp_path, "r", delta=1e-5)
  assert (tmp_path / "r" / "nondp" / "README.txt").read_text() == runs.NONDP_NOTE
  assert run.file("plots/a.png") == tmp_path / "r" / "plots" / "a.png"
  assert run.file("plots/a.png", released=False) == tmp_path / "r" / "nondp" / "plots" / "a.png"
  run.released.log("m", 3, {"epoch": 1, "validation_accuracy": 0.5})
  run.diagnostics.log("m", 3, {"epoch": 1, "train_loss": 0.1})
  run.ledger.add_dpsgd("m", 0.01, 1.1, 100)
  run.ledger.add_gaussian("counts", 20.0)
  metrics = run.finish({"x": 1}, nondp={"y": 2})
  saved = json.loads((tmp_path / "r" / "metrics.json").read_text())
  assert (
    saved["privacy"]["epsilon_pld"]
    == run.ledger.epsilon(1e-5, "pld")
    == metrics["privacy"]["epsilon"]
  )
  assert json.loads((tmp_path / "r" / "nondp" / "metrics.json").read_text()) == {"y": 2}
  assert json.loads((tmp_path / "r" / "metrics.jsonl").read_text()) == {
    "model": "m", "step": 3, "epoch": 1, "validation_accuracy": 0.5,
  }  # fmt: skip
  assert runs.RunFolder.create(tmp_path, "r", delta=1e-5).path.name == "r-2"
  assert runs.slug("DP-SGD eps=3") == "DP-SGD_eps3"
  table = runs.format_table(["a", "bb"], [["1", "2"], ["333", "4"]]).splitlines()
  assert table == ["a    bb", "---  --", "1    2", "333  4"]


def test_public_model_cache_trains_once_and_reads_back_the_same_params(tmp_path):
  from jaxdp.experiment import tasks

  calls = []

  def train():
    calls.append(1)
    return {"w": np.arange(3.0, dtype=np.float32), "b": np.ones((2, 2), np.float32)}, {"t": 1.5}

  template = lambda: {"w": np.zeros(3, np.float32), "b": np.zeros((2, 2), np.float32)}
  first, info1 = tasks.public_model_cache(tmp_path / "c", "m", template, train)
  again, info2 = tasks.public_model_cache(tmp_path / "c", "m", template, train)
  assert calls == [1] and (info1["cached"], info2["cached"], info2["t"]) == (False, True, 1.5)
  jax.tree.map(np.testing.assert_array_equal, first, again)
  assert not list((tmp_path / "c").glob("*.tmp"))
  tasks.public_model_cache(tmp_path / "c", "other-recipe", template, train)  # new tag: trains
  tasks.public_model_cache(None, "m", template, train)  # no cache: always trains
  assert calls == [1, 1, 1]
  (tmp_path / "c" / "m.json").unlink()  # a half-written entry is never read
  _, info3 = tasks.public_model_cache(tmp_path / "c", "m", template, train)
  assert not info3["cached"] and len(calls) == 4


def test_public_model_cache_trains_once_for_runs_side_by_side(tmp_path):
  """Two runs that want the same public model at once (a study's parallel cells): one
  trains it, the other waits on the lock and reads it back."""
  from jaxdp.experiment import tasks

  calls, results = [], []

  def train():
    calls.append(1)
    time.sleep(0.5)  # the other run asks meanwhile
    return {"w": np.arange(3.0, dtype=np.float32)}, {"t": 1.0}

  template = lambda: {"w": np.zeros(3, np.float32)}
  run = lambda: results.append(tasks.public_model_cache(tmp_path / "c", "m", template, train))
  threads = [threading.Thread(target=run) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert calls == [1]
  assert sorted(info["cached"] for _, info in results) == [False, True]
  np.testing.assert_array_equal(results[0][0]["w"], results[1][0]["w"])


def test_time_to_a_held_out_accuracy():
  from jaxdp.experiment.tasks import time_to

  history = [
    {"epoch": 1, "time": 10.0, "validation_accuracy": 0.95},
    {"epoch": 2, "time": 21.0, "validation_accuracy": 0.98},  # reached: this epoch's time
    {"epoch": 3, "time": 30.0, "validation_accuracy": 0.97},
    {"epoch": 4, "time": 41.0},  # no evaluation
  ]
  assert time_to(history, "validation_accuracy", 0.98) == 21.0
  assert time_to(history, "validation_accuracy", 0.99) is None
  assert time_to([], "validation_accuracy", 0.5) is None


def test_scattering_features_are_cached_by_content(tmp_path, monkeypatch, spy):
  import threading

  from jaxdp.experiment import tasks
  from jaxdp.models import scatternet

  def features(images):  # and wait for the background write
    out = tasks.scattering_features(images)
    for t in threading.enumerate():
      if t.name == "jaxdp-feature-cache":
        t.join()
    return out

  calls = spy(scatternet, "scattering_dataset")
  sizes = lambda: [len(c.arguments["images"]) for c in calls]  # images computed, per call
  monkeypatch.setenv("JAXDP_CACHE_DIR", str(tmp_path))
  x = np.asarray(jax.random.uniform(jax.random.key(0), (3, 28, 28, 1)))
  first = features(x)
  again = features(x.copy())  # same content: read back, not recomputed
  assert sizes() == [3] and np.array_equal(first, again)
  assert len(list(tmp_path.glob("scattering-*.npy"))) == 1
  features(x[:2])  # other images: another entry
  assert sizes() == [3, 2] and len(list(tmp_path.glob("scattering-*.npy"))) == 2
  next(tmp_path.glob("scattering-*.npy")).write_bytes(b"damaged")  # recomputed, not trusted
  features(x)
  features(x[:2])
  assert len(calls) == 3
  assert not list(tmp_path.glob("*.tmp.npy"))  # no half-written file left
  monkeypatch.setenv("JAXDP_CACHE_DIR", "")  # set but empty: no cache at all
  assert tasks.feature_cache_dir() is None
  features(x)
  assert len(calls) == 4
