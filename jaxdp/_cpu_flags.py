"""CPU settings that make the DP step (and the plain step) fast; applied on import.

Two process-level settings and one per-compilation option, each measured on the 2-core CPU
(TF-Privacy CNN, one process):

- XLA flags: oneDNN for dots and convolutions instead of XNNPACK runs the non-private step
  about 1.6x and the fast private step about 1.7x faster at batch 256; with jaxlib 0.10, taking
  single convolutions away from YNNPACK (XLA's own conv for the rest) runs the non-private
  step another ~1.15x faster (the private step is unchanged). The flags are read when
  JAX creates its CPU backend, so they only take effect if jaxdp is imported before the first
  JAX computation. ``JAXDP_XLA_FLAGS=0`` leaves ``XLA_FLAGS`` alone; flags the user already
  set for the same options win.
- glibc malloc: XLA's CPU runtime allocates each step's working buffers afresh. glibc serves
  large blocks with ``mmap`` and unmaps them on free, so every step page-faults its whole
  working set back in (152 MiB per private step at batch 1024; in a VM each fault is costly),
  which made the private step about 1.7x slower at batch 256. One arena, no ``mmap``-served
  blocks and no trimming keep the freed pages for the next step: zero page faults per step
  after the first. The price is that the process keeps its peak heap. ``JAXDP_MALLOC=0``
  leaves malloc alone; environment variables the user set (``MALLOC_ARENA_MAX``,
  ``MALLOC_MMAP_MAX_``, ``MALLOC_TRIM_THRESHOLD_``) win. PyTorch gains from the same
  settings, so the benchmark gives them to every implementation alike.
- The private step's compilation (not the process): with jaxlib 0.10, dots go to oneDNN one
  by one (``xla_cpu_experimental_onednn_fusion_type=INDIVIDUAL_DOT``). XLA's own batched dot
  runs on one thread; the fast engine's per-example weight gradients are batched dots, which
  oneDNN runs about 2x faster. Whole private step, same process: TF-Privacy CNN 1.21x faster
  at batch 256 (20.1 -> 16.6 ms) and 1.09x at 1024; ScatterNet CNN 1.08x, DP-CNN 1.06x,
  VAE 1.04x at 256 and 1.13x at 1024. Not to the reference (vmap) engine (1.18x on the
  TF-Privacy CNN): its WGAN-GP critic step corrupted the heap with it. It only goes to a
  program with batched dots (:func:`has_batched_dot`): plain 2-D dots run slower through
  oneDNN than through XLA's own kernels, 1.2x for the whole private MLP step (fast engine,
  dense layers only: no batched dot) and for the non-private MLP and VAE steps (1.26x and
  1.17x); the CNNs' non-private steps are unchanged. Not process-wide: the same option with
  dots fused to their elementwise neighbours (``DOT``) aborts the process with "partition
  compile failed" on the TF-Privacy CNN's non-private step at batch 1024.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import os
import sys
from collections.abc import Iterator
from typing import Any

CPU_FLAGS = ("--xla_cpu_use_onednn=true", "--xla_cpu_use_xnnpack=false")
# Only for the jaxlib minor version it was measured on: XLA aborts on a flag it does not know.
YNN_FLAGS = {"0.10": ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",)}


# Per-compilation XLA options for jaxdp's private step on the CPU, for the jaxlib minor version
# they were measured on (an option XLA does not know is an error).
PRIVATE_STEP_OPTIONS = {
  "0.10": {"xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
}


def _jaxlib_minor() -> str | None:
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return None
  return ".".join(version.split(".")[:2])


def cpu_flags() -> tuple[str, ...]:
  """The XLA flags jaxdp adds for the installed jaxlib."""
  return CPU_FLAGS + YNN_FLAGS.get(_jaxlib_minor() or "", ())


# mallopt parameters (glibc's malloc.h) and the values jaxdp sets.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
MALLOC_SETTINGS = {
  "MALLOC_ARENA_MAX": (M_ARENA_MAX, 1),
  "MALLOC_MMAP_MAX_": (M_MMAP_MAX, 0),
  "MALLOC_TRIM_THRESHOLD_": (M_TRIM_THRESHOLD, 2**31 - 1),
}
# The same settings as environment variables, for processes that do not import jaxdp.
MALLOC_ENV = {k: str(v) for k, (_, v) in MALLOC_SETTINGS.items()}


def private_step_options() -> dict[str, str] | None:
  """XLA compiler options for jaxdp's private step, or None (other backend or jaxlib,
  ``JAXDP_XLA_FLAGS=0``, or an option the user set in ``XLA_FLAGS``)."""
  if os.environ.get("JAXDP_XLA_FLAGS", "1") == "0":
    return None
  options = PRIVATE_STEP_OPTIONS.get(_jaxlib_minor() or "")
  if not options or any(k in os.environ.get("XLA_FLAGS", "") for k in options):
    return None
  import jax  # only here: this module runs before JAX starts

  return dict(options) if jax.default_backend() == "cpu" else None


def jaxpr_equations(jaxpr: Any) -> Iterator[Any]:
  """Every equation of a (closed) jaxpr and, depth first, of the jaxprs nested in its
  equations' parameters (jit, scan, while, cond branches, custom derivative rules)."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if hasattr(getattr(sub, "jaxpr", sub), "eqns"):
          yield from jaxpr_equations(sub)


def has_batched_dot(jaxpr: Any) -> bool:
  """Whether a (closed) jaxpr, or any jaxpr nested in it, has a ``dot_general`` with batch
  dimensions: the per-example products that :func:`private_step_options` speeds up."""
  return any(
    eqn.primitive.name == "dot_general" and eqn.params["dimension_numbers"][1][0]
    for eqn in jaxpr_equations(jaxpr)
  )


def apply() -> None:
  """Adds :func:`cpu_flags` to ``XLA_FLAGS`` unless disabled or already set by the user."""
  if os.environ.get("JAXDP_XLA_FLAGS", "1") == "0":
    return
  current = os.environ.get("XLA_FLAGS", "")
  extra = [f for f in cpu_flags() if f.split("=")[0] not in current]
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()


def tune_malloc() -> dict[str, bool]:
  """Applies :data:`MALLOC_SETTINGS` with ``mallopt`` (glibc on Linux only).

  Returns:
    For each setting, whether it was applied (False: disabled, set by the user's
    environment, not glibc, or refused by ``mallopt``).
  """
  done = dict.fromkeys(MALLOC_SETTINGS, False)
  if os.environ.get("JAXDP_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
    return done
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.gnu_get_libc_version  # noqa: B018  (musl and others have no mallopt semantics)
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return done
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  for env, (param, value) in MALLOC_SETTINGS.items():
    if env not in os.environ:
      done[env] = bool(mallopt(param, value))
  return done


apply()
MALLOC_APPLIED = tune_malloc()
