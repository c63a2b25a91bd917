"""What the JAX implementations share: the device, the Flax model and its loss, the data on
the device, and the :class:`~benchmarks.workers.common.Runner` around a jitted step."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from benchmarks.workers.common import (
  CRITIC_HIDDEN,
  CRITIC_WIDTH,
  NUM_BATCHES,
  JaxDeviceProbe,
  RssProbe,
  Runner,
  UnavailableError,
  critic_fakes,
  input_shape,
  synthetic_data,
)


def _jax_device(device: str):
  import jax

  try:
    return jax.devices(device)[0]
  except RuntimeError as e:  # e.g. a CPU-only jaxlib on a GPU machine
    raise UnavailableError(f"jax {jax.__version__} has no {device.upper()} backend here") from e


def init_params(model: Any, shape: tuple[int, ...]) -> Any:
  """The model's initial params for examples of ``shape`` (see :func:`input_shape`); jitted,
  the "rbg" key compiles ~4x faster than threefry."""
  import jax
  import jax.numpy as jnp

  from jaxdp.models import ConditionalVAE

  key = jax.random.key(0, impl="rbg")
  x = jnp.zeros((1, *shape))
  if isinstance(model, ConditionalVAE):  # the VAE also takes labels and a key
    init = lambda k: model.init(k, x, jnp.zeros((1,), jnp.int32), k)
    return jax.jit(init)(key)["params"]
  return jax.jit(model.init)(key, x)["params"]


def jax_model(name: str) -> tuple[Any, Any]:
  """The Flax model called ``name`` and its per-example loss ``loss_fn(params, ex, rng)``
  (returning ``(loss, aux)``). ``vae`` is the VAE of ``experiments/dp_vae_synth.py``,
  ``scatter_cnn`` the classifier of ``experiments/dp_classifier.py`` and ``critic`` the GAN
  critic of ``experiments/dp_gan_synth.py`` with its pair loss (one example: a real image
  and label, a generated image and label), with their default settings."""
  from jaxdp.models import ConditionalVAE, classifier_loss, gan, make_classifier, vae_loss
  from jaxdp.models.scatternet import ScatterCNN

  if name == "critic":
    critic = gan.ImageCritic(width=CRITIC_WIDTH, activation="leaky_relu", hidden=CRITIC_HIDDEN)
    return critic, gan.critic_loss(critic, loss="logistic")
  if name == "vae":
    model = ConditionalVAE()
    return model, vae_loss(model)
  model = ScatterCNN() if name == "scatter_cnn" else make_classifier(name)
  return model, classifier_loss(model)


@dataclasses.dataclass
class JaxSetup:
  """One JAX configuration before its step is built.

  ``batch_loss(p, *columns[, key])`` is the peers' loss of a batch of one (a ``(1, ...)``
  array per column: image and label, and for the critic also the generated image and its
  label; the VAE's also takes that example's key for its noise, the others' none),
  ``gather`` takes an index batch's columns from the data on the device.
  """

  model_name: str
  batch: int
  device: str
  dev: Any
  model: Any
  per_example_loss: Callable
  batch_loss: Callable
  keyed: bool
  data: dict[str, Any]
  indices: list[Any]
  mask: Any
  params: Any
  info: dict[str, Any]

  @property
  def columns(self) -> tuple[str, ...]:
    """The data's columns in ``batch_loss``'s argument order."""
    return tuple(self.data)

  def gather(self, d: dict[str, Any], i: Any) -> tuple[Any, ...]:
    import jax.numpy as jnp

    return tuple(jnp.take(d[c], i, axis=0) for c in self.columns)


def setup(model_name: str, batch: int, device: str) -> JaxSetup:
  """The device, model, loss, data and parameters of one JAX configuration."""
  import jax
  import jax.numpy as jnp
  import optax

  # Before any JAX computation, for every JAX implementation alike: jaxdp's XLA CPU flags
  # only take effect if set before JAX creates its backend (``_jax_device`` below does).
  # Under the harness they are in the environment already; a worker started by hand needs it.
  import jaxdp  # noqa: F401

  dev = _jax_device(device)
  model, per_example_loss = jax_model(model_name)
  images, labels, index_batches = synthetic_data(batch, model_name)
  columns = {"image": images, "label": labels}
  keyed = model_name == "vae"
  if model_name == "critic":
    columns["fake"], columns["fake_label"] = critic_fakes(batch)

    def batch_loss(p, x, y, fx, fy):
      ex = {"image": x[0], "label": y[0], "fake": fx[0], "fake_label": fy[0]}
      return per_example_loss(p, ex, None)[0]  # no gradient penalty: no key used

  elif keyed:

    def batch_loss(p, x, y, key):
      return per_example_loss(p, {"image": x[0], "label": y[0]}, key)[0]

  else:

    def batch_loss(p, x, y):
      logits = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return JaxSetup(
    model_name=model_name,
    batch=batch,
    device=device,
    dev=dev,
    model=model,
    per_example_loss=per_example_loss,
    batch_loss=batch_loss,
    keyed=keyed,
    data={k: jax.device_put(v, dev) for k, v in columns.items()},
    indices=[jax.device_put(i, dev) for i in index_batches],
    mask=jax.device_put(jnp.ones((batch,), bool), dev),
    params=init_params(model, input_shape(model_name)),
    info={"jax": jax.__version__},
  )


def runner(s: JaxSetup, fn: Any, call: Callable, state: Any) -> Runner:
  """The :class:`Runner` of a step ``call(state, data, indices, mask) -> (state, _)``;
  ``fn`` is its jitted function, lowered again (from the cache) for XLA's buffer plan."""
  import jax

  holder = {"state": state}

  def step(k: int) -> None:
    holder["state"] = call(holder["state"], s.data, s.indices[k % NUM_BATCHES], s.mask)[0]

  def sync() -> None:
    jax.block_until_ready(holder["state"])

  def xla_memory() -> dict[str, int]:
    compiled = fn.lower(holder["state"], s.data, s.indices[0], s.mask).compile()
    ma = compiled.memory_analysis()
    if ma is None:
      return {}
    return {
      "xla_temp_bytes": int(ma.temp_size_in_bytes),
      "xla_argument_bytes": int(ma.argument_size_in_bytes),
      "xla_output_bytes": int(ma.output_size_in_bytes),
    }

  probe = RssProbe() if s.device == "cpu" else JaxDeviceProbe(s.dev)
  return Runner(step, sync, probe, "jax", str(s.dev.device_kind), s.info, xla_memory)
