"""Strided convolutions as stride-1 convolutions on space-to-depth inputs.

A convolution with stride ``s`` whose kernel size ``k`` is a multiple of ``s`` (per spatial
axis) equals a stride-1 convolution with kernel ``k/s`` on the space-to-depth input, where
each ``s x s`` block of pixels becomes ``s*s`` channels:

    y[o] = sum_{j<k} x[s o + j] W[j]
         = sum_{u<k/s} sum_{r<s} x[s (o + u) + r] W[s u + r]
         = sum_{u<k/s} X[o + u] . V[u],     X[b] = (x[s b + r])_r,  V[u] = (W[s u + r])_r.

Same numbers up to float rounding (the sum is taken in another order). XLA's CPU backend runs
the stride-1 form, and its stride-1 backward pass, about 1.3x faster than the strided
convolution, whose input gradient it emits as an input-dilated convolution; that form is also
what lets a step be split into sequential microbatches without slowing down
(see :mod:`jaxdp.step`). :func:`conv_general_dilated` is a drop-in for
``lax.conv_general_dilated`` (``flax.linen.Conv(..., conv_general_dilated=...)``) that takes
this route where it applies and calls lax otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp


def space_to_depth(x: jax.Array, strides: Sequence[int]) -> jax.Array:
  """(N, *spatial, C) -> (N, *spatial/s, prod(s) * C); channels ordered (r_0, ..., r_n-1, C).

  Each spatial size must be a multiple of its stride.
  """
  n = len(strides)
  nb, c = x.shape[0], x.shape[-1]
  spatial = x.shape[1:-1]
  if len(spatial) != n or any(h % s for h, s in zip(spatial, strides, strict=True)):
    raise ValueError(f"space_to_depth: spatial shape {spatial} is not a multiple of {strides}")
  blocks = [h // s for h, s in zip(spatial, strides, strict=True)]
  shape = [nb]
  for bl, st in zip(blocks, strides, strict=True):
    shape += [bl, st]
  x = x.reshape((*shape, c))
  order = [0, *range(1, 2 * n, 2), *range(2, 2 * n + 1, 2), 2 * n + 1]
  return x.transpose(order).reshape((nb, *blocks, -1))


def space_to_depth_kernel(w: jax.Array, strides: Sequence[int]) -> jax.Array:
  """(*k, C_in, C_out) -> (*k/s, prod(s) * C_in, C_out), rows ordered as :func:`space_to_depth`."""
  n = len(strides)
  kshape = w.shape[:n]
  shape = []
  for k, s in zip(kshape, strides, strict=True):
    shape += [k // s, s]
  w = w.reshape((*shape, *w.shape[n:]))
  order = [*range(0, 2 * n, 2), *range(1, 2 * n, 2), 2 * n, 2 * n + 1]
  taps = tuple(k // s for k, s in zip(kshape, strides, strict=True))
  return w.transpose(order).reshape((*taps, -1, w.shape[-1]))


def applies(
  kernel_shape: Sequence[int], strides: Sequence[int], dilation: Sequence[int] | None = None
) -> bool:
  """Whether the space-to-depth form applies: some stride > 1, each kernel size a multiple
  of its stride, no kernel dilation."""
  if dilation is not None and any(d != 1 for d in dilation):
    return False
  if not any(s > 1 for s in strides):
    return False
  return all(k % s == 0 for k, s in zip(kernel_shape, strides, strict=True))


def _channels_last(dimension_numbers: Any, ndim: int) -> bool:
  """True for flax's default layout: NH..WC inputs and outputs, H..WIO kernels."""
  if dimension_numbers is None:
    return False
  lhs = (0, ndim - 1, *range(1, ndim - 1))
  rhs = (ndim - 1, ndim - 2, *range(0, ndim - 2))
  if isinstance(dimension_numbers, jax.lax.ConvDimensionNumbers):
    dn = dimension_numbers
  else:
    try:
      dn = jax.lax.conv_dimension_numbers((1,) * ndim, (1,) * ndim, dimension_numbers)
    except (TypeError, ValueError):
      return False
  return tuple(dn.lhs_spec) == lhs and tuple(dn.rhs_spec) == rhs and tuple(dn.out_spec) == lhs


def conv_general_dilated(
  lhs: jax.Array,
  rhs: jax.Array,
  window_strides: Sequence[int],
  padding: str | Sequence[tuple[int, int]],
  lhs_dilation: Sequence[int] | None = None,
  rhs_dilation: Sequence[int] | None = None,
  dimension_numbers: Any = None,
  feature_group_count: int = 1,
  batch_group_count: int = 1,
  precision: Any = None,
  preferred_element_type: Any = None,
) -> jax.Array:
  """``lax.conv_general_dilated``, by space-to-depth where that applies (see module doc).

  The space-to-depth route is taken for channels-last inputs (flax's layout) with a stride
  > 1 whose every kernel size is a multiple of its stride, no dilation and no grouping;
  every other call goes to ``lax.conv_general_dilated`` unchanged.
  """
  n = lhs.ndim - 2
  strides = tuple(int(s) for s in window_strides)
  kshape = tuple(int(k) for k in rhs.shape[:n])
  plain = (
    not _channels_last(dimension_numbers, lhs.ndim)
    or feature_group_count != 1
    or batch_group_count != 1
    or (lhs_dilation is not None and any(d != 1 for d in lhs_dilation))
    or not applies(kshape, strides, rhs_dilation)
  )
  if isinstance(padding, str):
    if padding.upper() not in ("SAME", "VALID"):
      plain = True
    else:
      padding = jax.lax.padtype_to_pads(lhs.shape[1:-1], kshape, strides, padding.upper())
  if plain:
    return jax.lax.conv_general_dilated(
      lhs,
      rhs,
      window_strides,
      padding,
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count,
      precision=precision,
      preferred_element_type=preferred_element_type,
    )
  pads = [tuple(int(v) for v in p) for p in padding]
  x = jnp.pad(lhs, ((0, 0), *[(max(lo, 0), max(hi, 0)) for lo, hi in pads], (0, 0)))
  # Negative padding crops.
  crop = tuple(
    slice(-lo if lo < 0 else 0, x.shape[1 + i] + (hi if hi < 0 else 0))
    for i, (lo, hi) in enumerate(pads)
  )
  x = x[(slice(None), *crop, slice(None))]
  out = [(x.shape[1 + i] - kshape[i]) // strides[i] + 1 for i in range(n)]
  if any(o <= 0 for o in out):
    raise ValueError(f"conv_general_dilated: empty output for input {lhs.shape}, kernel {kshape}")
  # Blocks each output needs: o + k/s - 1; crop (or zero-pad) the input to exactly that.
  need = [(o - 1 + k // s) * s for o, k, s in zip(out, kshape, strides, strict=True)]
  x = x[(slice(None), *(slice(0, m) for m in need), slice(None))]
  x = jnp.pad(x, ((0, 0), *[(0, m - x.shape[1 + i]) for i, m in enumerate(need)], (0, 0)))
  return jax.lax.conv_general_dilated(
    space_to_depth(x, strides),
    space_to_depth_kernel(rhs, strides),
    (1,) * n,
    "VALID",
    dimension_numbers=dimension_numbers,
    precision=precision,
    preferred_element_type=preferred_element_type,
  )


__all__ = ["applies", "conv_general_dilated", "space_to_depth", "space_to_depth_kernel"]
