"""Large batches through a jitted function in fixed-size chunks (one compiled shape)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def map_chunks(fn: Callable[..., jax.Array], args: tuple[Any, ...], chunk: int) -> jax.Array:
  """``fn(*args)`` over the leading axis of ``args`` in chunks of ``chunk`` rows, the last
  padded with copies of its first row (and the padding's outputs dropped)."""
  n = args[0].shape[0]
  out = []
  for start in range(0, n, chunk):
    part = [a[start : start + chunk] for a in args]
    pad = chunk - part[0].shape[0]
    if pad:
      part = [jnp.concatenate([a, jnp.repeat(a[:1], pad, axis=0)]) for a in part]
    out.append(fn(*part)[: chunk - pad])
  return jnp.concatenate(out, axis=0)
