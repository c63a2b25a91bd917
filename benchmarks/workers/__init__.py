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

One module per peer: :mod:`.jaxdp_impl` (jaxdp's step, private, reference and non-private),
:mod:`.jax_peers` (optax's DP aggregate, JAX-Privacy), :mod:`.opacus_impl` (Opacus in each
grad_sample_mode), :mod:`.torch_impl` (plain PyTorch and the per-example loop); their shared
set-up in :mod:`.jax_setup` and :mod:`.torch_setup`, the constants and probes in
:mod:`.common`, the timing in :mod:`.measure`, the PyTorch/Flax mirror check in
:mod:`.mirror`, and the command line in :mod:`.__main__`.
"""

from benchmarks.workers.common import (
  IMPLS,
  JAX_IMPLS,
  MODELS,
  OPACUS_IMPLS,
  REQUIRES,
  RESULT_PREFIX,
  TORCH_IMPLS,
)

__all__ = [
  "IMPLS",
  "JAX_IMPLS",
  "MODELS",
  "OPACUS_IMPLS",
  "REQUIRES",
  "RESULT_PREFIX",
  "TORCH_IMPLS",
]
