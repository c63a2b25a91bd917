"""jaxdp: differentially private deep learning in JAX/Flax.

The public API: one jitted DP-SGD step for any per-example loss, Poisson batches with a
fixed shape, and epsilon from Google's dp-accounting.

    >>> import jaxdp, optax
    >>> step = jaxdp.make_step(loss_fn, optax.sgd(0.1),
    ...     jaxdp.DPConfig(l2_norm_clip=1.0, noise_multiplier=1.1),
    ...     expected_batch_size=256)                                  # doctest: +SKIP
"""

from jaxdp import (
  _cpu_flags,  # noqa: F401  (first: sets XLA CPU flags before JAX starts)
  accounting,
  clipping,
  data,
  grad,
  keys,
  metrics,
  noise,
  parallel,
  sampling,
)
from jaxdp.accounting import (
  EpsilonTracker,
  PrivacyLedger,
  calibrate_noise_multiplier,
  dpsgd_event,
  epsilon,
)
from jaxdp.clipping import ClippedSum
from jaxdp.data import Dataset, load_dataset, synthetic_dataset, synthetic_splits
from jaxdp.grad import PrivacyPlan, PrivateGradient, private_grad
from jaxdp.keys import KeySource, secure_key
from jaxdp.metrics import evaluate_classifier
from jaxdp.noise import add_gaussian_noise, privatize
from jaxdp.sampling import PhysicalBatch, PoissonSampler, ShuffledSampler
from jaxdp.step import DPConfig, Step, TrainState, init_state, make_step

__version__ = "0.1.0"

__all__ = [
  "ClippedSum",
  "DPConfig",
  "Dataset",
  "EpsilonTracker",
  "KeySource",
  "PhysicalBatch",
  "PoissonSampler",
  "PrivacyLedger",
  "PrivacyPlan",
  "PrivateGradient",
  "ShuffledSampler",
  "Step",
  "TrainState",
  "accounting",
  "add_gaussian_noise",
  "calibrate_noise_multiplier",
  "clipping",
  "data",
  "dpsgd_event",
  "epsilon",
  "evaluate_classifier",
  "grad",
  "init_state",
  "keys",
  "load_dataset",
  "make_step",
  "metrics",
  "noise",
  "parallel",
  "private_grad",
  "privatize",
  "sampling",
  "secure_key",
  "synthetic_dataset",
  "synthetic_splits",
]
