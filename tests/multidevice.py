"""Checks of the sharded step on 4 forced CPU devices, run in a subprocess by test_parallel.py.

XLA's device count is fixed when JAX starts, so this module sets
``--xla_force_host_platform_device_count`` before importing JAX and is run as its own
process: ``python tests/multidevice.py OUT.json``. Each check returns measurements (the
largest differences from one device, the noise's spread, ...); the tests judge them.
"""

from __future__ import annotations

import os
import sys

DEVICES = 4
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import contextlib  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from conftest import make_problem, pytest_configure  # noqa: E402

from jaxdp import parallel  # noqa: E402
from jaxdp._cpu_flags import jaxpr_equations  # noqa: E402
from jaxdp.checkpoint import Checkpointer  # noqa: E402
from jaxdp.noise import add_gaussian_noise  # noqa: E402
from jaxdp.sampling import PoissonSampler  # noqa: E402
from jaxdp.step import DPConfig, Step, init_state, make_step  # noqa: E402
from jaxdp.train import train  # noqa: E402


def _max_diff(a, b) -> float:
  pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in pairs)


def _replicated(tree, devices: int) -> bool:
  """Every leaf fully replicated on ``devices`` devices, with equal values on each."""
  for leaf in jax.tree_util.tree_leaves(tree):
    shards = [np.asarray(s.data) for s in leaf.addressable_shards]
    if not leaf.sharding.is_fully_replicated or len(shards) != devices:
      return False
    if not all(np.array_equal(s, shards[0]) for s in shards):
      return False
  return True


def _batch(rows: int, real: int):
  indices = np.arange(rows, dtype=np.int32)[::-1].copy()
  mask = np.arange(rows) < real
  return indices, mask


def step_equality() -> list[dict]:
  """One noised step on D devices against one device, same keys: params, norms, losses."""
  cases = [
    ("cnn", "fast", 4, None),
    ("cnn", "fast", 2, None),
    ("cnn", "reference", 4, None),
    ("mlp", "fast", 4, None),
    ("mlp", "reference", 4, None),
    ("groupnorm", "fast", 4, None),
    ("cnn", "fast", 4, 4),  # two microbatches of each device's 8 rows
  ]
  out = []
  for model, engine, devices, micro in cases:
    loss_fn, params, data = make_problem(model, batch_size=40)
    opt = optax.sgd(0.5, momentum=0.9)
    privacy = DPConfig(l2_norm_clip=0.5, noise_multiplier=1.0, engine=engine)
    indices, mask = _batch(32, 27)
    results = []
    for mesh in (None, parallel.data_mesh(devices)):
      step = make_step(
        loss_fn, opt, privacy, expected_batch_size=24, microbatch_size=micro, mesh=mesh
      )
      state = init_state(params, opt, jax.random.key(11))
      for _ in range(2):
        state, metrics = step(state, data, indices, mask)
      results.append((state, metrics))
    (one, m1), (many, md) = results
    out.append(
      {
        "model": model,
        "engine": engine,
        "devices": devices,
        "microbatch_size": micro,
        "params": _max_diff(one.params, many.params),
        "opt_state": _max_diff(one.opt_state, many.opt_state),
        "norms": _max_diff(m1["grad_norms"], md["grad_norms"]),
        "loss": abs(float(m1["loss"]) - float(md["loss"])),
        "same_rng": _max_diff(jax.random.key_data(one.rng), jax.random.key_data(many.rng)) == 0,
        "replicated": _replicated(many.params, devices) and _replicated(many.opt_state, devices),
        "norms_sharded": not md["grad_norms"].sharding.is_fully_replicated,
        "moved": _max_diff(params, many.params),
      }
    )
  return out


def critic_equality() -> dict:
  """A GAN critic step (each private row paired with its generated row, a per-row side
  input split over the devices like the rows) on 4 devices against one."""
  from jaxdp.models import gan

  g = gan.ImageGenerator(image_shape=(12, 12, 1), num_classes=5, latent_dim=4, width=8)
  d = gan.ImageCritic(num_classes=5, width=4)
  k = jax.random.key(0)
  params = d.init(k, jnp.zeros((1, 12, 12, 1)))["params"]
  rows = gan.fake_rows(g, g.init(k, jnp.zeros((1, 4)), jnp.zeros((1,), jnp.int32))["params"],
                       jax.random.key(1), 32)  # fmt: skip
  data = {"image": jax.random.uniform(k, (40, 12, 12, 1)), "label": jnp.arange(40) % 5}
  opt = optax.adam(0.01)
  indices, mask = _batch(32, 29)
  out = []
  for mesh in (None, parallel.data_mesh(DEVICES)):
    step = make_step(gan.critic_loss(d), opt, DPConfig(l2_norm_clip=0.5, noise_multiplier=1.0),
                     expected_batch_size=24, has_aux=True, mesh=mesh)  # fmt: skip
    state, metrics = step(init_state(params, opt, jax.random.key(2)), data, indices, mask, rows)
    out.append((state, metrics))
  (one, m1), (many, md) = out
  return {
    "params": _max_diff(one.params, many.params),
    # real rows (a padding row's aux is unspecified)
    "wasserstein": _max_diff(m1["aux"]["wasserstein"][:29], md["aux"]["wasserstein"][:29]),
    "replicated": _replicated(many.params, DEVICES),
  }


def _trained(mesh, *, physical: int, epochs: int = 3, checkpoint=None, kill_after=None):
  loss_fn, params, data = make_problem("cnn", batch_size=64)
  opt = optax.adam(0.01)
  privacy = DPConfig(l2_norm_clip=1.0, noise_multiplier=0.8)
  sampler = PoissonSampler(
    64,
    expected_batch_size=16,
    physical_batch_size=physical,
    row_multiple=parallel.row_multiple(mesh),
    seed=5,
  )
  step = make_step(loss_fn, opt, privacy, expected_batch_size=16, mesh=mesh)
  state = init_state(params, opt, jax.random.key(3))

  def on_entry(entry):
    if kill_after is not None and entry["epoch"] == kill_after + 1:
      raise KeyboardInterrupt  # the process dies during the epoch after a checkpoint

  state, history = train(
    step,
    state,
    data,
    sampler,
    epochs=epochs,
    progress=False,
    checkpoint=checkpoint,
    on_entry=on_entry,
  )
  return state, history, sampler


def training_equality() -> dict:
  """train() over Poisson batches: 4 devices against one; a logical batch in physical
  batches of 8 rows on 4 devices against whole batches on one device."""
  one, h1, _ = _trained(None, physical=40)
  many, hd, s = _trained(parallel.data_mesh(DEVICES), physical=40)
  small, _, s8 = _trained(parallel.data_mesh(DEVICES), physical=8)
  loss = lambda h: [e["train_loss"] for e in h]
  return {
    "physical_batch_size": s.physical_batch_size,
    "params": _max_diff(one.params, many.params),
    "loss": float(np.max(np.abs(np.subtract(loss(h1), loss(hd))))),
    "steps": [int(one.step), int(many.step), int(small.step)],
    "small_physical_batch_size": s8.physical_batch_size,
    "small_params": _max_diff(one.params, small.params),
    "replicated": _replicated(many.params, DEVICES),
  }


def resume() -> dict:
  """A run on 4 devices killed after epoch 2 and resumed, on 4 devices and on one."""
  mesh = parallel.data_mesh(DEVICES)
  straight, _, _ = _trained(mesh, physical=40, epochs=4)
  out = {}
  for name, again in (("four", mesh), ("one", None)):
    folder = Path(tempfile.mkdtemp())
    try:
      ckpt = Checkpointer(folder, every=1)
      with contextlib.suppress(KeyboardInterrupt):
        _trained(mesh, physical=40, epochs=4, checkpoint=ckpt, kill_after=2)
      ckpt.close()
      ckpt = Checkpointer(folder, every=1)
      resumed, history, _ = _trained(again, physical=40, epochs=4, checkpoint=ckpt)
      ckpt.close()
    finally:
      shutil.rmtree(folder)
    out[name] = {
      "params": _max_diff(straight.params, resumed.params),
      "step": int(resumed.step),
      "epochs": [e["epoch"] for e in history],
    }
  return out


class _NoisePerDevice(Step):
  """The bug the sharded step must not have: every device adds sigma C noise to its own
  clipped sum before the all-reduce (D noise draws in the update)."""

  def _all_reduce(self, tree):
    key = jax.random.fold_in(jax.random.key(99), jax.lax.axis_index(parallel.DATA_AXIS))
    stddev = self.privacy.noise_multiplier * float(self.privacy.l2_norm_clip)
    return jax.lax.psum(add_gaussian_noise(tree, key, stddev), parallel.DATA_AXIS)


def noise_once() -> dict:
  """The update's spread with every row masked (the update is the noise alone): expected
  sigma C / B per coordinate; with noise per device, sqrt(D) times that."""
  loss_fn, params, data = make_problem("mlp", batch_size=32)
  params = jax.tree_util.tree_map(jnp.zeros_like, params)
  opt = optax.sgd(1.0)
  privacy = DPConfig(l2_norm_clip=1.0, noise_multiplier=2.0)
  indices, mask = _batch(32, 0)
  mesh = parallel.data_mesh(DEVICES)
  out = {"expected": 2.0 / 16}
  for name, cls in (("single", None), ("sharded", Step), ("per_device", _NoisePerDevice)):
    if cls is None:
      step = make_step(loss_fn, opt, privacy, expected_batch_size=16)
    else:
      step = cls(loss_fn, opt, privacy, 16, False, None, mesh)
    state, _ = step(init_state(params, opt, jax.random.key(21)), data, indices, mask)
    flat = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(state.params)])
    out[name] = float(np.std(flat))
    out[f"{name}_count"] = int(flat.size)
  return out


def one_all_reduce() -> dict:
  """The cross-device operations in the sharded step's program: their kinds and how many
  arrays each all-reduce carries."""
  loss_fn, params, data = make_problem("cnn", batch_size=32)
  opt = optax.sgd(0.1)
  step = make_step(
    loss_fn,
    opt,
    DPConfig(l2_norm_clip=1.0, noise_multiplier=1.0),
    expected_batch_size=16,
    mesh=parallel.data_mesh(DEVICES),
  )
  state = step.place(init_state(params, opt, jax.random.key(0)))
  indices, mask = _batch(32, 20)
  jaxpr = jax.make_jaxpr(step._fused_impl)(state, step.place(data), indices, mask)
  collectives = [
    e for e in jaxpr_equations(jaxpr) if e.primitive.name.startswith(("psum", "all_", "ppermute"))
  ]
  return {
    "collectives": [e.primitive.name for e in collectives],
    "operand_sizes": [[int(np.prod(v.aval.shape)) for v in e.invars] for e in collectives],
    "param_count": sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params)),
  }


def experiment() -> dict:
  """experiments/dp_classifier.py on the tiny synthetic set with --devices 2."""
  import importlib.util

  path = HERE.parent / "experiments" / "dp_classifier.py"
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  folder = Path(tempfile.mkdtemp())
  try:
    flags = ["--dataset", "synthetic", "--quick", "--model", "mlp", "--no-progress"]
    flags += ["--train-size", "600", "--validation-size", "200", "--epochs", "1"]
    flags += ["--no-baseline", "--devices", "2", "--out", str(folder), "--name", "d"]
    metrics = module.main(flags)
    config = json.loads((folder / "d" / "config.json").read_text())
  finally:
    shutil.rmtree(folder)
  (model,) = metrics["models"]
  return {
    "config_devices": config["devices"],
    "devices": model["devices"],
    "physical_batch_size": model["physical_batch_size"],
    "test_accuracy": model["test_accuracy"],
  }


CHECKS = {
  "devices": lambda: len(jax.devices()),
  "step_equality": step_equality,
  "training_equality": training_equality,
  "critic_equality": critic_equality,
  "resume": resume,
  "noise_once": noise_once,
  "one_all_reduce": one_all_reduce,
  "experiment": experiment,
}


if __name__ == "__main__":
  pytest_configure(None)  # the tests' compilation cache and XLA settings
  results = {name: check() for name, check in CHECKS.items()}
  Path(sys.argv[1]).write_text(json.dumps(results, indent=1))
