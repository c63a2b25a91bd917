"""The data-parallel step on several devices: equal to one device, one all-reduce, the
noise added once, parameters identical everywhere, resume across device counts.

The multi-device checks run in a subprocess with 4 forced CPU devices
(``tests/multidevice.py``; XLA's device count is fixed when JAX starts); this module judges
their measurements. The rest runs here, on one device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from conftest import make_problem

from jaxdp import parallel
from jaxdp.sampling import PoissonSampler
from jaxdp.step import DPConfig, init_state, make_step

HERE = Path(__file__).resolve().parent
TOL = 1e-5  # the bar: one device's numbers to 1e-5 with the same keys


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
  out = tmp_path_factory.mktemp("multidevice") / "checks.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  done = subprocess.run(
    [sys.executable, str(HERE / "multidevice.py"), str(out)],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-4000:]
  return json.loads(out.read_text())


def test_the_subprocess_sees_four_devices(checks):
  assert checks["devices"] == 4


def test_one_step_on_several_devices_equals_one_device(checks):
  rows = checks["step_equality"]
  assert {(r["engine"], r["devices"]) for r in rows} >= {("fast", 4), ("reference", 4), ("fast", 2)}
  for r in rows:
    assert r["moved"] > 1e-3, r  # the step did something
    assert r["params"] <= TOL and r["opt_state"] <= TOL, r
    assert r["norms"] <= TOL and r["loss"] <= TOL, r
    assert r["same_rng"], r


def test_parameters_are_identical_on_every_device(checks):
  for r in checks["step_equality"]:
    assert r["replicated"], r  # every shard of params and optimiser state equal
    assert r["norms_sharded"], r  # per-example values stay split over the devices
  assert checks["training_equality"]["replicated"]


def test_a_gan_critic_step_with_per_row_side_inputs_equals_one_device(checks):
  c = checks["critic_equality"]
  assert c["params"] <= TOL and c["wasserstein"] <= TOL and c["replicated"]


def test_training_and_logical_batches_on_four_devices_equal_one_device(checks):
  t = checks["training_equality"]
  assert t["steps"] == [12, 12, 12]
  assert t["params"] <= TOL and t["loss"] <= TOL
  # Logical batches of ~16 in physical batches of 8 rows (2 per device), several per step.
  assert t["small_physical_batch_size"] == 8
  assert t["small_params"] <= TOL


def test_a_run_resumes_on_the_same_or_another_device_count(checks):
  r = checks["resume"]
  assert r["four"]["params"] == 0.0  # same program: bit for bit
  assert r["one"]["params"] <= TOL
  for side in r.values():
    assert side["step"] == 16 and side["epochs"] == [1, 2, 3, 4]


def test_noise_is_added_once_not_once_per_device(checks):
  n = checks["noise_once"]
  assert n["sharded_count"] > 2000
  # The update of an all-padding batch is the noise alone: std sigma C / B.
  assert n["sharded"] == pytest.approx(n["expected"], rel=0.05)
  assert n["sharded"] == n["single"]  # the same draw as on one device
  # Noise on each device's sum before the all-reduce: sqrt(1 + D) = sqrt(5) times more.
  assert n["per_device"] > 1.5 * n["expected"]


def test_one_all_reduce_carries_every_clipped_sum(checks):
  a = checks["one_all_reduce"]
  assert a["collectives"] == ["psum"]
  assert a["operand_sizes"] == [[a["param_count"]]]


def test_an_experiment_runs_on_two_devices(checks):
  e = checks["experiment"]
  assert e["config_devices"] == 2 and e["devices"] == "2 cpu devices"
  assert e["physical_batch_size"] % 2 == 0
  assert e["test_accuracy"] > 0.1


# -- one device --------------------------------------------------------------------------


def test_device_choice_and_errors():
  n = len(jax.devices())
  assert parallel.resolve_devices(None) == jax.devices()
  assert parallel.mesh_for(1) is None and parallel.row_multiple(None) == 1
  mesh = parallel.data_mesh(1)
  assert mesh.shape[parallel.DATA_AXIS] == 1 and parallel.describe(mesh) == "1 cpu device"
  for bad in (0, n + 1):
    with pytest.raises(ValueError, match=f"--devices must be between 1 and {n}"):
      parallel.resolve_devices(bad, "--devices")
  with pytest.raises(ValueError, match="at least one device"):
    parallel.resolve_devices([])
  with pytest.raises(ValueError, match="multiple of the 3 devices"):
    parallel.check_rows(10, jax.sharding.Mesh(np.array(jax.devices() * 3), ("data",)))


def test_sampler_rounds_the_physical_batch_up_to_the_devices():
  s = PoissonSampler(1000, expected_batch_size=100, physical_batch_size=130, row_multiple=4)
  assert s.physical_batch_size == 132
  for batch in s.sample():
    assert batch.indices.shape == (132,)
  with pytest.raises(ValueError, match="row_multiple"):
    PoissonSampler(1000, expected_batch_size=100, row_multiple=0)


def test_a_mesh_without_the_data_axis_is_refused():
  loss_fn, _, _ = make_problem("mlp")
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("model",))
  with pytest.raises(ValueError, match="axis named 'data'"):
    make_step(loss_fn, optax.sgd(0.1), DPConfig(l2_norm_clip=1.0, noise_multiplier=1.0),
              expected_batch_size=4, mesh=mesh)  # fmt: skip


def test_a_one_device_mesh_equals_no_mesh():
  loss_fn, params, data = make_problem("cnn", batch_size=12)
  opt = optax.sgd(0.1)
  privacy = DPConfig(l2_norm_clip=1.0, noise_multiplier=1.0)
  batch = (np.arange(12), np.ones(12, bool))
  out = []
  for mesh in (None, parallel.data_mesh(1)):
    step = make_step(loss_fn, opt, privacy, expected_batch_size=8, mesh=mesh)
    state, _ = step(init_state(params, opt, jax.random.key(0)), data, *batch)
    out.append(jax.tree_util.tree_leaves(state.params))
  for a, b in zip(*out, strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL)
