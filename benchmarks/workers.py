"""One benchmark configuration, measured in its own process.

    python -m benchmarks.workers --impl jaxdp_private --model tf_cnn --batch 256 --device cpu

builds one implementation of one DP-SGD step (clip 1.0, noise 1.1, plain SGD) on one model,
times it and prints one line ``BENCH_RESULT {json}`` with ``examples_per_s`` (median over
rounds), ``min``, ``max``, the per-round rates, peak memory and, for JAX, compile time; or
``{"skipped": reason}`` when the peer or the mode cannot run here, or
``{"error": "out of memory"}``. Torch is imported only by the PyTorch implementations and JAX
only by the JAX ones, so the two never share a process (nor a GPU's memory).

How a step is timed, the same for every implementation (peers at their best):

- the data set (``NUM_BATCHES * batch`` synthetic MNIST-shaped examples) is on the device
  before timing; a step takes a precomputed index batch and gathers its examples on the
  device, as jaxdp's step does; no data loader, no host-to-device copy in the loop;
- ``warmup`` steps first (JAX compilation, cuDNN autotuning), excluded;
- then ``rounds`` rounds of ``steps`` steps each, synchronising (``block_until_ready`` /
  ``torch.cuda.synchronize``) at the end of each round only; ``steps`` is chosen so that a
  round lasts about ``round_seconds``;
- memory: on CPU the peak RSS of the process while the timed rounds run (the kernel's
  high-water mark is reset after warm-up, so compilation is excluded), on a GPU the peak
  device memory (PyTorch: ``max_memory_allocated`` reset after warm-up; JAX:
  ``peak_bytes_in_use``, which cannot be reset). ``base_mem_bytes`` is the same measure just
  before the first step (libraries, data set, parameters). With ``--xla-memory`` JAX
  implementations also report XLA's own buffer plan for the step (``xla_temp_bytes``).

The PyTorch models mirror the Flax models of :mod:`jaxdp.models.classifier` layer for layer
(``--check-models`` copies Flax weights into them and compares the logits).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

MODELS = ("tf_cnn", "dp_cnn", "scatter_cnn", "mlp", "vae")
JAX_IMPLS = ("jaxdp_private", "jaxdp_reference", "jaxdp_nonprivate", "optax_dp", "jax_privacy")
OPACUS_IMPLS = ("opacus_hooks", "opacus_functorch", "opacus_ew", "opacus_ghost")
TORCH_IMPLS = (*OPACUS_IMPLS, "torch_nonprivate", "loop")
IMPLS = JAX_IMPLS + TORCH_IMPLS

# The Python modules each implementation needs; a missing one skips it with this reason.
REQUIRES: dict[str, tuple[str, ...]] = {
  **{i: ("jax", "flax", "optax", "jaxdp") for i in JAX_IMPLS},
  "jax_privacy": ("jax", "flax", "optax", "jaxdp", "jax_privacy"),
  **{i: ("torch", "opacus") for i in OPACUS_IMPLS},
  "torch_nonprivate": ("torch",),
  "loop": ("torch",),
}

L2_NORM_CLIP = 1.0
NOISE_MULTIPLIER = 1.1
LEARNING_RATE = 0.1
IMAGE_SHAPE = (28, 28, 1)
# scatter_cnn trains on ScatterNet features, computed once per run before training (as the
# classifier experiment does): scattering(J=2, L=8) of a 28x28 image is 7x7 with 81 channels.
SCATTER_SHAPE = (7, 7, 81)
VAE_LATENT = 16  # ConditionalVAE().latent_dim
NUM_CLASSES = 10
NUM_BATCHES = 4  # distinct index batches, cycled; the data set holds NUM_BATCHES * batch rows
RESULT_PREFIX = "BENCH_RESULT "


class UnavailableError(Exception):
  """This configuration cannot run here (peer missing, mode unsupported); says why."""


# -- memory probes ----------------------------------------------------------------------


def _proc_status_bytes(key: str) -> int | None:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(key + ":"):
          return int(line.split()[1]) * 1024
  except OSError:
    return None
  return None


class RssProbe:
  """Resident set size of this process (CPU runs)."""

  kind = "rss"

  def __init__(self) -> None:
    self._reset = False

  def current(self) -> int:
    """Bytes resident now."""
    rss = _proc_status_bytes("VmRSS")
    if rss is None:  # not Linux: no cheap current RSS, fall back to the peak so far
      return self._ru_maxrss()
    return rss

  def reset_peak(self) -> None:
    """Resets the kernel's high-water mark (Linux >= 4.0), so the peak excludes compilation."""
    try:
      with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
      self._reset = True
    except OSError:
      self._reset = False

  def peak(self) -> int:
    """Peak bytes since :meth:`reset_peak` (since start-up where the reset is unavailable)."""
    hwm = _proc_status_bytes("VmHWM") if self._reset else None
    return hwm if hwm is not None else self._ru_maxrss()

  @staticmethod
  def _ru_maxrss() -> int:
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class JaxDeviceProbe:
  """Bytes in use on a JAX GPU (the allocator's own counters)."""

  kind = "device"

  def __init__(self, device: Any) -> None:
    self.device = device

  def _stats(self) -> dict[str, int]:
    return self.device.memory_stats() or {}

  def current(self) -> int:
    """Bytes in use now."""
    return int(self._stats().get("bytes_in_use", 0))

  def reset_peak(self) -> None:
    """JAX's allocator has no reset: the peak includes warm-up (the same step)."""

  def peak(self) -> int:
    """Peak bytes in use since the process started."""
    return int(self._stats().get("peak_bytes_in_use", 0))


class TorchCudaProbe:
  """Bytes allocated by PyTorch's CUDA caching allocator."""

  kind = "device"

  def __init__(self, torch: Any) -> None:
    self.torch = torch

  def current(self) -> int:
    """Bytes allocated now."""
    return int(self.torch.cuda.memory_allocated())

  def reset_peak(self) -> None:
    """Forgets the warm-up peak (cuDNN autotuning tries large workspaces)."""
    self.torch.cuda.reset_peak_memory_stats()

  def peak(self) -> int:
    """Peak bytes allocated since :meth:`reset_peak`."""
    return int(self.torch.cuda.max_memory_allocated())


@dataclasses.dataclass
class Runner:
  """One built implementation: ``step(k)`` runs a step on index batch ``k % NUM_BATCHES``."""

  step: Callable[[int], None]
  sync: Callable[[], None]
  probe: Any
  framework: str
  device_name: str
  info: dict[str, Any] = dataclasses.field(default_factory=dict)
  xla_memory: Callable[[], dict[str, int]] | None = None
  # Maps an exception of the first step to a skip reason when it means "mode unsupported".
  unsupported: Callable[[Exception], str | None] = lambda e: None


# -- data -------------------------------------------------------------------------------


def input_shape(model_name: str) -> tuple[int, int, int]:
  """What one example of the model's step is (HWC): an image, or its ScatterNet features."""
  return SCATTER_SHAPE if model_name == "scatter_cnn" else IMAGE_SHAPE


def synthetic_data(batch: int, model_name: str = "tf_cnn", seed: int = 0):
  """Float32 inputs of the model's shape (NHWC), int32 labels, ``NUM_BATCHES`` index batches.

  The VAE's inputs are pixel intensities in (0, 1) (its decoder is Bernoulli), the others'
  standard normal.
  """
  import numpy as np

  rng = np.random.default_rng(seed)
  n = NUM_BATCHES * batch
  images = rng.standard_normal((n, *input_shape(model_name)), dtype=np.float32)
  if model_name == "vae":
    images = 1.0 / (1.0 + np.exp(-images))
  labels = rng.integers(0, NUM_CLASSES, size=n).astype(np.int32)
  index_batches = rng.permutation(n).astype(np.int32).reshape(NUM_BATCHES, batch)
  return images, labels, index_batches


# -- JAX implementations ----------------------------------------------------------------


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
  (returning ``(loss, aux)``). ``vae`` is the VAE of ``experiments/dp_vae_synth.py`` and
  ``scatter_cnn`` the classifier of ``experiments/dp_classifier.py``, with their default
  settings."""
  from jaxdp.models import ConditionalVAE, classifier_loss, make_classifier, vae_loss
  from jaxdp.models.scatternet import ScatterCNN

  if name == "vae":
    model = ConditionalVAE()
    return model, vae_loss(model)
  model = ScatterCNN() if name == "scatter_cnn" else make_classifier(name)
  return model, classifier_loss(model)


def build_jax(impl: str, model_name: str, batch: int, device: str) -> Runner:
  """jaxdp's step (auto / reference / non-private), optax's DP aggregate or JAX-Privacy."""
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
  data = {"image": jax.device_put(images, dev), "label": jax.device_put(labels, dev)}
  indices = [jax.device_put(i, dev) for i in index_batches]
  mask = jax.device_put(jnp.ones((batch,), bool), dev)
  params = init_params(model, input_shape(model_name))
  info: dict[str, Any] = {"jax": jax.__version__}

  # The peers' loss of a batch of one, ``(1, ...)`` arrays; the VAE's also takes that
  # example's key (for its noise), the classifiers' none (their code as before the VAE).
  keyed = model_name == "vae"
  if keyed:

    def batch_loss(p, x, y, key):
      return per_example_loss(p, {"image": x[0], "label": y[0]}, key)[0]

  else:

    def batch_loss(p, x, y):
      logits = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def gather(d, i):
    return jnp.take(d["image"], i, axis=0), jnp.take(d["label"], i, axis=0)

  if impl.startswith("jaxdp_"):
    from jaxdp import DPConfig, init_state, make_step

    opt = optax.sgd(LEARNING_RATE)
    privacy = None
    if impl != "jaxdp_nonprivate":
      engine = "reference" if impl == "jaxdp_reference" else "auto"
      privacy = DPConfig(
        l2_norm_clip=L2_NORM_CLIP, noise_multiplier=NOISE_MULTIPLIER, engine=engine
      )
    step_obj = make_step(
      per_example_loss,
      opt,
      privacy,
      expected_batch_size=batch if privacy is not None else None,
      has_aux=True,
    )
    info["engine"] = step_obj.engine
    state = init_state(params, opt, jax.random.key(1))
    # For XLA's buffer plan: the step's own jitted function (its compilation is cached, so
    # lowering it again costs nothing).
    fn = step_obj
    call = step_obj
  elif impl == "optax_dp":
    tx = optax.chain(
      optax.contrib.differentially_private_aggregate(
        l2_norm_clip=L2_NORM_CLIP, noise_multiplier=NOISE_MULTIPLIER, key=jax.random.key(1)
      ),
      optax.sgd(LEARNING_RATE),
    )

    def one_grad(p, x, y, *key):
      return jax.grad(batch_loss)(p, x[None], y[None], *key)

    per_example_grads = jax.vmap(one_grad, in_axes=(None, 0, 0) + (0,) * keyed)

    @jax.jit
    def fn(s, d, i, m):
      del m  # optax's aggregate takes no padding mask; every row is real here
      p, opt_state, *key = s
      keys = ()
      if keyed:
        key[0], sub = jax.random.split(key[0])
        keys = (jax.random.split(sub, i.shape[0]),)
      grads = per_example_grads(p, *gather(d, i), *keys)
      updates, opt_state = tx.update(grads, opt_state, p)
      return (optax.apply_updates(p, updates), opt_state, *key), None

    state = (params, tx.init(params), *[jax.random.key(2)] * keyed)
    call = fn
  elif impl == "jax_privacy":
    import jax_privacy
    from jax_privacy import noise_addition

    info["jax_privacy"] = jax_privacy.__version__
    # Sum of clipped per-example gradients divided by the public batch size; its sensitivity
    # (clip / batch) scales the Gaussian privatizer's noise.
    # For the VAE JAX-Privacy splits the key into one per example (prng_argnum).
    grad_fn = jax_privacy.clipped_grad(
      batch_loss,
      l2_clip_norm=L2_NORM_CLIP,
      batch_argnums=(1, 2),
      normalize_by=batch,
      prng_argnum=3 if keyed else None,
    )
    privatizer = noise_addition.gaussian_privatizer(
      stddev=grad_fn.sensitivity() * NOISE_MULTIPLIER, prng_key=jax.random.key(1)
    )
    sgd = optax.sgd(LEARNING_RATE)

    @jax.jit
    def fn(s, d, i, m):
      p, noise_state, opt_state, *key = s
      keys = ()
      if keyed:
        key[0], sub = jax.random.split(key[0])
        keys = (sub,)
      grads = grad_fn(p, *gather(d, i), *keys, is_padding_example=~m)
      grads, noise_state = privatizer.update(grads, noise_state)
      updates, opt_state = sgd.update(grads, opt_state, p)
      return (optax.apply_updates(p, updates), noise_state, opt_state, *key), None

    state = (params, privatizer.init(params), sgd.init(params), *[jax.random.key(2)] * keyed)
    call = fn
  else:
    raise ValueError(f"--impl {impl!r} is not a JAX implementation; one of {JAX_IMPLS}")

  holder = {"state": state}

  def step(k: int) -> None:
    holder["state"] = call(holder["state"], data, indices[k % NUM_BATCHES], mask)[0]

  def sync() -> None:
    jax.block_until_ready(holder["state"])

  def xla_memory() -> dict[str, int]:
    compiled = fn.lower(holder["state"], data, indices[0], mask).compile()
    ma = compiled.memory_analysis()
    if ma is None:
      return {}
    return {
      "xla_temp_bytes": int(ma.temp_size_in_bytes),
      "xla_argument_bytes": int(ma.argument_size_in_bytes),
      "xla_output_bytes": int(ma.output_size_in_bytes),
    }

  probe = RssProbe() if device == "cpu" else JaxDeviceProbe(dev)
  return Runner(step, sync, probe, "jax", str(dev.device_kind), info, xla_memory)


# -- PyTorch implementations ------------------------------------------------------------


def torch_model(name: str):
  """The PyTorch twin of the Flax model ``name`` (NCHW input): see :func:`jax_model`."""
  from torch import nn

  if name == "vae":
    return _torch_vae()
  if name == "tf_cnn":
    # TF 'SAME' for an 8x8 kernel, stride 2 on 28x28: 14x14 output, total padding
    # (14 - 1) * 2 + 8 - 28 = 6, split 3 / 3, so symmetric padding=3 is exact.
    return nn.Sequential(
      nn.Conv2d(1, 16, 8, stride=2, padding=3),
      nn.ReLU(),
      nn.MaxPool2d(2, stride=1),
      nn.Conv2d(16, 32, 4, stride=2),
      nn.ReLU(),
      nn.MaxPool2d(2, stride=1),
      nn.Flatten(),
      nn.Linear(32 * 4 * 4, 32),
      nn.ReLU(),
      nn.Linear(32, NUM_CLASSES),
    )
  if name == "dp_cnn":  # DPCNN defaults: widths (16, 32, 64), hidden 64, tanh, no GroupNorm
    layers: list[nn.Module] = []
    cin = IMAGE_SHAPE[-1]
    for w in (16, 32, 64):
      layers += [nn.Conv2d(cin, w, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2)]
      cin = w
    return nn.Sequential(
      *layers,
      nn.Flatten(),
      nn.Linear(64 * 3 * 3, 64),
      nn.Tanh(),
      nn.Linear(64, NUM_CLASSES),
    )
  if name == "scatter_cnn":  # ScatterCNN defaults: GroupNorm(27) on 81 channels, widths 32
    return nn.Sequential(
      nn.GroupNorm(27, SCATTER_SHAPE[-1], eps=1e-6),  # flax's GroupNorm epsilon
      nn.Conv2d(SCATTER_SHAPE[-1], 32, 3, padding=1),
      nn.Tanh(),
      nn.AvgPool2d(2),
      nn.Conv2d(32, 32, 3, padding=1),
      nn.Tanh(),
      nn.Flatten(),
      nn.Linear(32 * 3 * 3, 32),
      nn.Tanh(),
      nn.Linear(32, NUM_CLASSES),
    )
  if name == "mlp":
    return nn.Sequential(
      nn.Flatten(),
      nn.Linear(28 * 28, 256),
      nn.ReLU(),
      nn.Linear(256, 128),
      nn.ReLU(),
      nn.Linear(128, NUM_CLASSES),
    )
  raise ValueError(f"--model {name!r} is not one of {MODELS}")


def _torch_vae():
  """The PyTorch twin of ``ConditionalVAE()`` (its defaults) with its negative ELBO.

  ``forward(x, y_onehot, eps)`` returns ``(logits, mu, logvar, prior mean)``; ``eps`` is the
  reparameterisation noise, drawn by the caller. Space-to-depth and depth-to-space of one
  channel are ``pixel_unshuffle`` / ``pixel_shuffle`` (same channel order for C = 1); the
  twin flattens and reshapes in Flax's HWC order so Flax's Dense kernels copy unchanged.
  """
  import torch
  from torch import nn
  from torch.nn import functional

  latent, classes = VAE_LATENT, NUM_CLASSES

  class TorchVAE(nn.Module):
    def __init__(self) -> None:
      super().__init__()
      # TF 'SAME' for a 3x3 stride-2 conv on 14x14: 7x7 output, padding 0 before, 1 after.
      self.enc_pad = nn.ZeroPad2d((0, 1, 0, 1))
      self.enc_conv = nn.Conv2d(4, 16, 3, stride=2)
      self.enc_out = nn.Linear(7 * 7 * 16 + classes, 2 * latent)
      self.dec_hidden = nn.Linear(latent * classes + classes, 128)  # "product" conditioning
      self.dec_map = nn.Linear(128, 14 * 14 * 8)
      self.dec_conv = nn.Conv2d(8, 4, 3, padding=1)
      self.class_bias = nn.Linear(classes, 28 * 28, bias=False)
      self.prior = nn.Linear(classes, latent, bias=False)

    def forward(self, x, y, eps):
      h = torch.tanh(self.enc_conv(self.enc_pad(functional.pixel_unshuffle(x, 2))))
      h = torch.cat([h.permute(0, 2, 3, 1).flatten(1), y], 1)
      mu, logvar = self.enc_out(h).split(latent, dim=1)
      z = mu + torch.exp(0.5 * logvar) * eps
      d = torch.cat([(y[:, :, None] * z[:, None, :]).flatten(1), y], 1)
      d = torch.tanh(self.dec_hidden(d))
      d = torch.tanh(self.dec_map(d)).view(-1, 14, 14, 8).permute(0, 3, 1, 2)
      # The class bias is stored in the sub-pixel order of the conv's output (jaxdp's layout).
      d = self.dec_conv(d) + self.class_bias(y).view(-1, 14, 14, 4).permute(0, 3, 1, 2)
      return functional.pixel_shuffle(d, 2), mu, logvar, self.prior(y)

  return TorchVAE()


def _torch_neg_elbo():
  """The VAE's negative ELBO as a criterion ``(model outputs, images)``; ``reduction`` as
  PyTorch's losses have it (Opacus' ghost clipping sets it to "none" for per-example losses)."""
  from torch import nn
  from torch.nn import functional

  class NegElbo(nn.Module):
    reduction = "mean"

    def forward(self, outputs, x):
      logits, mu, logvar, prior = outputs
      bce = functional.binary_cross_entropy_with_logits(logits, x, reduction="none")
      kl = 0.5 * (logvar.exp() + (mu - prior).square() - 1.0 - logvar)
      per_example = bce.flatten(1).sum(1) + kl.sum(1)
      return per_example if self.reduction == "none" else per_example.mean()

  return NegElbo()


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def build_torch(impl: str, model_name: str, batch: int, device: str) -> Runner:
  """Opacus in one grad_sample_mode, plain PyTorch, or the per-example loop (PyVacy style)."""
  import torch
  from torch import nn

  if device == "gpu":
    if not torch.cuda.is_available():
      raise UnavailableError(f"torch {torch.__version__} has no CUDA here")
    torch.backends.cudnn.benchmark = True
    # JAX's default f32 precision on the GPU is TF32 for matmuls and convolutions; match it.
    torch.set_float32_matmul_precision("high")
    dev = torch.device("cuda")
    probe: Any = TorchCudaProbe(torch)
    device_name = torch.cuda.get_device_name()
  else:
    dev = torch.device("cpu")
    probe = RssProbe()
    device_name = "cpu"
  torch.manual_seed(0)
  info: dict[str, Any] = {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}

  images, labels, index_batches = synthetic_data(batch, model_name)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(dev)
  y = torch.from_numpy(labels).long().to(dev)
  indices = [torch.from_numpy(i).long().to(dev) for i in index_batches]
  model = torch_model(model_name).to(dev)
  optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
  criterion: Any
  if model_name == "vae":
    criterion = _torch_neg_elbo()
    y_onehot = nn.functional.one_hot(y, NUM_CLASSES).float()

    def batch_of(i):
      """The model's inputs and the loss target for the examples ``i``."""
      eps = torch.randn(len(i), VAE_LATENT, device=dev)  # reparameterisation noise
      return (x[i], y_onehot[i], eps), x[i]

  else:
    criterion = nn.CrossEntropyLoss()

    def batch_of(i):
      """The model's inputs and the loss target for the examples ``i``."""
      return (x[i],), y[i]

  if impl == "torch_nonprivate":

    def step(k: int) -> None:
      args, target = batch_of(indices[k % NUM_BATCHES])
      optimizer.zero_grad(set_to_none=True)
      criterion(model(*args), target).backward()
      optimizer.step()

  elif impl == "loop":
    params = [p for p in model.parameters() if p.requires_grad]
    sums = [torch.zeros_like(p) for p in params]

    def step(k: int) -> None:
      # PyVacy: microbatches of one example, each gradient clipped, then summed and noised.
      args, target = batch_of(indices[k % NUM_BATCHES])
      for s in sums:
        s.zero_()
      for j in range(batch):
        optimizer.zero_grad(set_to_none=True)
        one = [a[j : j + 1] for a in args]
        criterion(model(*one), target[j : j + 1]).backward()
        torch.nn.utils.clip_grad_norm_(params, L2_NORM_CLIP)
        for s, p in zip(sums, params, strict=True):
          s.add_(p.grad)
      for s, p in zip(sums, params, strict=True):
        noise = torch.randn_like(s) * (NOISE_MULTIPLIER * L2_NORM_CLIP)
        p.grad = (s + noise) / batch
      optimizer.step()

  elif impl in OPACUS_IMPLS:
    import opacus
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    info["opacus"] = opacus.__version__
    mode = impl.removeprefix("opacus_")
    # make_private needs a loader for the sampling rate (batch / N, so the optimiser's
    # expected batch size is `batch`); the timed step never iterates it.
    loader = DataLoader(TensorDataset(x, y), batch_size=batch)
    engine = PrivacyEngine()
    try:
      out = engine.make_private(
        module=model,
        optimizer=optimizer,
        criterion=criterion,
        data_loader=loader,
        noise_multiplier=NOISE_MULTIPLIER,
        max_grad_norm=L2_NORM_CLIP,
        grad_sample_mode=mode,
      )
    except NotImplementedError as e:
      raise UnavailableError(
        f"opacus grad_sample_mode={mode} does not support {model_name}: {e}"
      ) from e
    if mode == "ghost":  # ghost clipping wraps the criterion: loss.backward() runs both passes
      model, optimizer, criterion, _ = out
    else:
      model, optimizer, _ = out

    def step(k: int) -> None:
      args, target = batch_of(indices[k % NUM_BATCHES])
      optimizer.zero_grad(set_to_none=True)
      loss = criterion(model(*args), target)
      loss.backward()
      optimizer.step()

  else:
    raise ValueError(f"--impl {impl!r} is not a PyTorch implementation; one of {TORCH_IMPLS}")

  def unsupported(e: Exception) -> str | None:
    # e.g. mode "ew" on a conv net below batch 32: PyTorch's ExpandedWeights grouped-conv
    # path calls .view() on a non-contiguous grad_output and raises.
    if impl in OPACUS_IMPLS and isinstance(e, (RuntimeError, NotImplementedError)):
      return f"opacus grad_sample_mode={impl[7:]} fails on {model_name} at batch {batch}: " + (
        _first_line(e)
      )
    return None

  sync = torch.cuda.synchronize if device == "gpu" else (lambda: None)
  return Runner(step, sync, probe, "torch", device_name, info, unsupported=unsupported)


# -- measuring --------------------------------------------------------------------------


class OtherLoad:
  """CPU time used by OTHER processes while timing, as a fraction of all CPUs (Linux).

  A busy machine distorts the comparison unevenly: PyTorch's OpenMP threads slow down by
  up to ~40x when another process holds a core, XLA's thread pool much less.
  """

  def __init__(self) -> None:
    self._start: tuple[float, float, float] | None = None

  @staticmethod
  def _busy_seconds() -> float | None:
    try:
      with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
      return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

  def start(self) -> None:
    """Marks the start of the timed window."""
    busy = self._busy_seconds()
    if busy is not None:
      self._start = (busy, time.process_time(), time.perf_counter())

  def fraction(self) -> float | None:
    """Other processes' CPU share since :meth:`start`, in [0, 1]; None if unknown."""
    busy = self._busy_seconds()
    if busy is None or self._start is None:
      return None
    b0, own0, t0 = self._start
    wall = time.perf_counter() - t0
    other = (busy - b0) - (time.process_time() - own0)
    return min(max(other / (wall * (os.cpu_count() or 1)), 0.0), 1.0)


def measure(
  runner: Runner,
  batch: int,
  *,
  rounds: int,
  warmup: int,
  round_seconds: float,
  min_steps: int = 2,
  max_steps: int = 10_000,
) -> dict[str, Any]:
  """Warm up, pick steps per round, time ``rounds`` rounds; examples/s per round."""
  base = runner.probe.current()
  t0 = time.perf_counter()
  try:
    runner.step(0)
    runner.sync()
  except Exception as e:
    reason = None if is_out_of_memory(e) else runner.unsupported(e)
    if reason is not None:
      raise UnavailableError(reason) from e
    raise
  first_step_s = time.perf_counter() - t0
  k = 1
  for _ in range(max(warmup - 1, 0)):
    runner.step(k)
    k += 1
  runner.sync()
  t0 = time.perf_counter()
  runner.step(k)
  k += 1
  runner.sync()
  estimate = time.perf_counter() - t0
  steps = int(min(max_steps, max(min_steps, math.ceil(round_seconds / max(estimate, 1e-9)))))
  runner.probe.reset_peak()
  other = OtherLoad()
  other.start()
  rates = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    for _ in range(steps):
      runner.step(k)
      k += 1
    runner.sync()
    rates.append(steps * batch / (time.perf_counter() - t0))
  peak = runner.probe.peak()
  other_load = other.fraction()
  median = statistics.median(rates)
  out: dict[str, Any] = {
    "examples_per_s": median,
    "min": min(rates),
    "max": max(rates),
    "rates": rates,
    "steps_per_round": steps,
    "first_step_s": first_step_s,
    "peak_mem_bytes": peak,
    "base_mem_bytes": base,
    "mem_kind": runner.probe.kind,
    "other_load": other_load,
    "cpus": os.cpu_count(),
  }
  if runner.framework == "jax":  # the first call traced and compiled, then ran one step
    out["compile_s"] = max(first_step_s - batch / median, 0.0)
  return out


def is_out_of_memory(e: BaseException) -> bool:
  """True for an allocation failure of any framework (host or device)."""
  if isinstance(e, MemoryError):
    return True
  text = f"{type(e).__name__} {e}".lower()
  return any(s in text for s in ("out of memory", "outofmemory", "resource_exhausted"))


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Builds and measures one configuration; never raises."""
  result: dict[str, Any] = {
    "model": args.model,
    "batch": args.batch,
    "impl": args.impl,
    "device": args.device,
    "pid": os.getpid(),
    # glibc malloc settings the process started with (the harness gives all workers the same).
    "malloc_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")},
  }
  try:
    build = build_jax if args.impl in JAX_IMPLS else build_torch
    t0 = time.perf_counter()
    runner = build(args.impl, args.model, args.batch, args.device)
    result.update(framework=runner.framework, device_name=runner.device_name, **runner.info)
    result["build_s"] = time.perf_counter() - t0  # imports, data, model, optimiser
    result.update(
      measure(
        runner,
        args.batch,
        rounds=args.rounds,
        warmup=args.warmup,
        round_seconds=args.round_seconds,
        min_steps=args.min_steps,
        max_steps=args.max_steps,
      )
    )
    if args.xla_memory and runner.xla_memory is not None:
      result.update(runner.xla_memory())
  except UnavailableError as e:
    result["skipped"] = str(e)
  except ModuleNotFoundError as e:
    result["skipped"] = f"{e.name} is not installed"
  except Exception as e:
    if is_out_of_memory(e):
      result["error"] = "out of memory"
      result["detail"] = _first_line(e)
    else:
      traceback.print_exc()
      result["error"] = _first_line(e)
  return result


# -- the torch/flax mirror check --------------------------------------------------------


def _perturbed(params: Any, seed: int) -> Any:
  """``params`` plus N(0, 0.05^2) noise, so zero-initialised biases (and the VAE's zero
  prior) are really compared by :func:`check_models`, not matched by chance."""
  import jax
  import numpy as np

  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
    lambda p: np.asarray(p) + 0.05 * rng.standard_normal(p.shape).astype(np.float32), params
  )


def _copy_weights(pairs: list[tuple[Any, dict[str, Any]]], flat_chw: tuple[int, ...] | None):
  """Copies Flax layers' params into PyTorch layers: Conv (HWIO -> OIHW), Dense (transposed;
  the first Dense after a ``(C, H, W)`` flatten gets its rows reordered from Flax's HWC order)
  and GroupNorm (scale, bias)."""
  import numpy as np
  import torch
  from torch import nn

  first_dense = True
  with torch.no_grad():
    for layer, p in pairs:
      if isinstance(layer, nn.GroupNorm):
        weight = np.asarray(p["scale"])
      elif isinstance(layer, nn.Conv2d):
        weight = np.asarray(p["kernel"]).transpose(3, 2, 0, 1)
      else:
        kernel = np.asarray(p["kernel"])
        if first_dense and flat_chw is not None:
          c, h, w = flat_chw
          kernel = kernel.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(c * h * w, -1)
        first_dense = False
        weight = kernel.T
      if tuple(layer.weight.shape) != weight.shape:
        raise AssertionError(f"{layer}: torch {tuple(layer.weight.shape)} vs flax {weight.shape}")
      layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
      if layer.bias is not None:
        layer.bias.copy_(torch.from_numpy(np.array(p["bias"])))


def _check_classifier(name: str) -> dict[str, Any]:
  import jax
  import numpy as np
  import torch
  from torch import nn

  model, _ = jax_model(name)
  params = _perturbed(init_params(model, input_shape(name)), 1)
  images = np.random.default_rng(0).standard_normal((4, *input_shape(name)), dtype=np.float32)
  flax_out = np.asarray(jax.jit(model.apply)({"params": params}, images))
  tmodel = torch_model(name)
  flat_shape: list[tuple[int, ...]] = []
  flatten = next(m for m in tmodel.modules() if isinstance(m, nn.Flatten))
  flatten.register_forward_hook(lambda m, i, o, shapes=flat_shape: shapes.append(i[0].shape))
  timages = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  with torch.no_grad():
    tmodel(timages)  # records the (N, C, H, W) shape that is flattened
  layers = [m for m in tmodel.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.GroupNorm))]
  # Flax names count per kind; PyTorch's order is GroupNorm, convs, then dense layers.
  keys = [
    f"{kind}_{i}"
    for kind in ("GroupNorm", "Conv", "Dense")
    for i in range(sum(k.startswith(kind + "_") for k in params))
  ]
  if len(layers) != len(keys):
    raise AssertionError(f"{name}: {len(layers)} torch layers, {len(keys)} flax")
  flat = tuple(flat_shape[0][1:]) if len(flat_shape[0]) == 4 else None
  _copy_weights([(layer, params[k]) for layer, k in zip(layers, keys, strict=True)], flat)
  with torch.no_grad():
    torch_out = tmodel(timages).numpy()
  return _compare(params, tmodel, {"logits": (flax_out, torch_out)})


def _check_vae() -> dict[str, Any]:
  import numpy as np
  import torch

  from jaxdp.models import ConditionalVAE

  model, _ = jax_model("vae")
  params = _perturbed(init_params(model, input_shape("vae")), 2)
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(4, *input_shape("vae"))).astype(np.float32)
  labels = np.array([0, 3, 7, 9], np.int32)
  eps = rng.standard_normal((4, VAE_LATENT)).astype(np.float32)
  v = {"params": params}
  mu, logvar = model.apply(v, images, labels, method=ConditionalVAE.encode)
  z = mu + np.exp(0.5 * np.asarray(logvar)) * eps
  logits = model.apply(v, z, labels, method=ConditionalVAE.decode)
  prior = model.apply(v, labels, method=ConditionalVAE.prior_mean)
  tmodel = torch_model("vae")
  enc, dec = params["encoder"], params["decoder_net"]
  pairs = [
    (tmodel.enc_conv, enc["Conv_0"]),
    (tmodel.enc_out, enc["Dense_0"]),
    (tmodel.dec_hidden, dec["Dense_0"]),
    (tmodel.dec_map, dec["Dense_1"]),
    (tmodel.dec_conv, dec["Conv_0"]),
    (tmodel.class_bias, dec["class_bias"]),
    (tmodel.prior, params["prior"]),
  ]
  _copy_weights(pairs, None)  # the twin flattens in Flax's HWC order itself
  onehot = torch.nn.functional.one_hot(torch.from_numpy(labels).long(), NUM_CLASSES).float()
  timages = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  with torch.no_grad():
    out = tmodel(timages, onehot, torch.from_numpy(eps))
  pairs_out = {
    "logits": (np.asarray(logits), out[0].permute(0, 2, 3, 1).numpy()),
    "mu": (np.asarray(mu), out[1].numpy()),
    "logvar": (np.asarray(logvar), out[2].numpy()),
    "prior": (np.asarray(prior), out[3].numpy()),
  }
  return _compare(params, tmodel, pairs_out)


def _compare(params: Any, tmodel: Any, outputs: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
  import jax
  import numpy as np

  diffs = {k: float(np.max(np.abs(a - b))) for k, (a, b) in outputs.items()}
  return {
    "max_abs_diff": max(diffs.values()),
    "diffs": diffs,
    "params_flax": sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(params)),
    "params_torch": sum(p.numel() for p in tmodel.parameters()),
  }


def check_models() -> dict[str, Any]:
  """Copies each Flax model's (perturbed) weights into its PyTorch twin and compares their
  outputs (the VAE's at the same reparameterisation noise): max |difference| per model."""
  return {name: _check_vae() if name == "vae" else _check_classifier(name) for name in MODELS}


# -- command line -----------------------------------------------------------------------


def _positive_int(flag: str) -> Callable[[str], int]:
  def parse(text: str) -> int:
    value = int(text)
    if value < 1:
      raise argparse.ArgumentTypeError(f"{flag} must be an integer >= 1, got {text}")
    return value

  return parse


def parser() -> argparse.ArgumentParser:
  """The worker's command line."""
  p = argparse.ArgumentParser(
    prog="python -m benchmarks.workers", description=__doc__.split("\n")[0]
  )
  p.add_argument("--impl", choices=IMPLS)
  p.add_argument("--model", choices=MODELS, default="tf_cnn")
  p.add_argument("--batch", type=_positive_int("--batch"), default=256)
  p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
  p.add_argument("--rounds", type=_positive_int("--rounds"), default=5)
  p.add_argument("--warmup", type=_positive_int("--warmup"), default=3, help="steps, incl. compile")
  p.add_argument("--round-seconds", type=float, default=1.0, help="target duration of a round")
  p.add_argument("--min-steps", type=_positive_int("--min-steps"), default=2)
  p.add_argument("--max-steps", type=_positive_int("--max-steps"), default=10_000)
  p.add_argument("--xla-memory", action="store_true", help="JAX: also report XLA's buffer plan")
  p.add_argument("--check-models", action="store_true", help="compare torch and flax models")
  return p


def main(argv: list[str] | None = None) -> int:
  """Runs one configuration and prints ``BENCH_RESULT {json}``."""
  args = parser().parse_args(argv)
  if args.check_models:
    result = check_models()
  elif args.impl is None:
    parser().error("--impl is required (one of " + ", ".join(IMPLS) + ")")
  else:
    if args.round_seconds <= 0:
      parser().error(f"--round-seconds must be > 0, got {args.round_seconds}")
    result = run(args)
  print(RESULT_PREFIX + json.dumps(result), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
