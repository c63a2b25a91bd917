"""What every worker shares: the configurations, memory probes, the built step, the data."""

from __future__ import annotations

import dataclasses
import resource
import sys
from collections.abc import Callable
from typing import Any

MODELS = ("tf_cnn", "dp_cnn", "scatter_cnn", "mlp", "vae", "vit", "critic")
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
# The GAN critic of experiments/dp_gan_synth.py at its defaults: ImageCritic(width 16,
# leaky ReLU, a Dense layer of 128), the logistic (original GAN) pair loss.
CRITIC_WIDTH, CRITIC_HIDDEN = 16, 128
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

  The VAE's and the critic's inputs are pixel intensities in (0, 1) (the VAE's decoder is
  Bernoulli, the GAN's images are sigmoid outputs), the others' standard normal.
  """
  import numpy as np

  rng = np.random.default_rng(seed)
  n = NUM_BATCHES * batch
  images = rng.standard_normal((n, *input_shape(model_name)), dtype=np.float32)
  if model_name in ("vae", "critic"):
    images = 1.0 / (1.0 + np.exp(-images))
  labels = rng.integers(0, NUM_CLASSES, size=n).astype(np.int32)
  index_batches = rng.permutation(n).astype(np.int32).reshape(NUM_BATCHES, batch)
  return images, labels, index_batches


def critic_fakes(batch: int, seed: int = 1):
  """The generated half of the critic's pairs: one float32 image in (0, 1) and one int32
  label per row of :func:`synthetic_data` (in the GAN experiment the generator draws them
  before each critic step; the benchmark times the critic's DP step on given fakes)."""
  import numpy as np

  rng = np.random.default_rng(seed)
  n = NUM_BATCHES * batch
  fakes = 1.0 / (1.0 + np.exp(-rng.standard_normal((n, *IMAGE_SHAPE), dtype=np.float32)))
  return fakes.astype(np.float32), rng.integers(0, NUM_CLASSES, size=n).astype(np.int32)


def first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"[:300]
