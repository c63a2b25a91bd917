"""Flax NNX layers in the fast engine: their calls seen like Linen's, with no rewrite.

The fast engine records Linen layer calls through ``flax.linen.intercept_methods``. NNX has
no such hook, so while the engine traces a loss, :func:`intercept` routes the ``__call__`` of
the NNX layers in ``LAYERS`` through the same interceptor, with a context that carries

* the layer's own parameter values (``kernel``, ``bias``, ...: the very arrays of the params
  pytree the loss was given, when the loss runs ``nnx.merge(graphdef, params)``), and
* its Linen twin: the unbound Linen layer (``nn.Dense``, ``nn.Conv``, ``nn.Embed``, the norms)
  that computes the same function of the same parameters, on which the engine's rules run.

An NNX layer with a setting the twin would not reproduce (a custom ``dot_general`` or
convolution, another dtype promotion, a mask, a preferred element type, a cross-device
norm) or a subclass gets no twin: its parameters take the vmap fallback, like any parameter
used outside a recorded call. The patch is in force only while a trace runs (the classes
are restored after it).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes

from jaxdp import conv

_LOCK = threading.RLock()
_STANDARD_CONVS = (jax.lax.conv_general_dilated, conv.conv_general_dilated)
# The NNX layers whose calls are recorded (see twin()).
LAYERS = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.Embed, nnx.LayerNorm, nnx.RMSNorm,
          nnx.GroupNorm)  # fmt: skip


class Context:
  """What an interceptor sees of one NNX layer call (the fields of Linen's context it
  reads): ``module`` is the Linen twin or None, ``params`` the layer's own values."""

  method_name = "__call__"

  def __init__(self, layer: nnx.Module) -> None:
    self.layer = layer
    self.module = twin(layer)
    self.params = own_params(layer) if self.module is not None else None


_PARAM_NAMES = ("kernel", "bias", "embedding", "scale")


def own_params(layer: nnx.Module) -> dict[str, Any]:
  """The layer's parameter values by name (``kernel``, ``bias``, ``embedding``, ``scale``:
  those it has)."""
  out = {}
  for name in _PARAM_NAMES:
    variable = getattr(layer, name, None)
    if isinstance(variable, nnx.Param):
      out[name] = variable.get_value()
  return out


def twin(layer: nnx.Module) -> nn.Module | None:
  """The unbound Linen layer computing ``layer``'s function of the same parameters, or None.

  Linear, LinearGeneral (attention's projections) and Conv get the engine's dense and conv
  rules, Embed its embed rule, LayerNorm, RMSNorm and GroupNorm the norm rule."""
  kind = type(layer)
  if getattr(layer, "preferred_element_type", None) is not None:
    return None
  if layer.promote_dtype is not nnx_dtypes.promote_dtype or getattr(layer, "axis_name", None):
    return None
  dtypes = dict(dtype=layer.dtype, param_dtype=layer.param_dtype)
  if kind is nnx.Linear and layer.dot_general is jax.lax.dot_general:
    return nn.Dense(layer.out_features, use_bias=layer.use_bias, precision=layer.precision,
                    **dtypes)  # fmt: skip
  if kind is nnx.Conv and layer.mask is None and layer.conv_general_dilated in _STANDARD_CONVS:
    return nn.Conv(
      layer.out_features, tuple(layer.kernel_size), strides=layer.strides, padding=layer.padding,
      input_dilation=layer.input_dilation, kernel_dilation=layer.kernel_dilation,
      feature_group_count=layer.feature_group_count, use_bias=layer.use_bias,
      precision=layer.precision, **dtypes,
    )  # fmt: skip
  if kind is nnx.LinearGeneral and layer.dot_general in (None, jax.lax.dot_general):
    if layer.batch_axis or layer.dot_general_cls is not None:
      return None
    return nn.DenseGeneral(layer.out_features, axis=layer.axis, use_bias=layer.use_bias,
                           precision=layer.precision, **dtypes)  # fmt: skip
  if kind is nnx.Embed:
    return nn.Embed(layer.num_embeddings, layer.features, **dtypes)
  if kind not in (nnx.LayerNorm, nnx.RMSNorm, nnx.GroupNorm):
    return None
  norm = dict(epsilon=layer.epsilon, use_fast_variance=getattr(layer, "use_fast_variance", True),
              reduction_axes=getattr(layer, "reduction_axes", -1), **dtypes)  # fmt: skip
  if kind is nnx.LayerNorm:
    return nn.LayerNorm(use_bias=layer.use_bias, use_scale=layer.use_scale,
                        feature_axes=layer.feature_axes, **norm)  # fmt: skip
  if kind is nnx.RMSNorm:
    return nn.RMSNorm(use_scale=layer.use_scale, feature_axes=layer.feature_axes, **norm)
  if kind is nnx.GroupNorm and getattr(layer, "feature_axis", -1) in (-1,):
    return nn.GroupNorm(num_groups=layer.num_groups, group_size=None if layer.num_groups else
                        layer.group_size, use_bias=layer.use_bias, use_scale=layer.use_scale,
                        **norm)  # fmt: skip
  return None


def is_context(ctx: Any) -> bool:
  return isinstance(ctx, Context)


def params_of(ctx: Context) -> Mapping[str, Any] | None:
  return ctx.params


@contextlib.contextmanager
def intercept(interceptor: Callable[..., Any]) -> Iterator[None]:
  """Routes the calls of the ``LAYERS`` through ``interceptor(next_fun, args, kwargs, ctx)``
  (Linen's interceptor signature) while the block runs."""
  with _LOCK:
    originals = {cls: cls.__call__ for cls in LAYERS}

    def routed(original):
      @functools.wraps(original)
      def call(self, *args, **kwargs):
        # out_sharding=None is the default (NNX's attention passes it explicitly): dropped,
        # the call is the plain one the rules cover; any other keyword is left for vmap.
        if kwargs.get("out_sharding", 0) is None:
          kwargs = {k: v for k, v in kwargs.items() if k != "out_sharding"}
        return interceptor(functools.partial(original, self), args, kwargs, Context(self))

      return call

    try:
      for cls, original in originals.items():
        cls.__call__ = routed(original)
      yield
    finally:
      for cls, original in originals.items():
        cls.__call__ = original
