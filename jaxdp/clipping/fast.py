"""The fast per-layer clipping engine: per-example norms without per-example gradients.

For a layer ``y = a W (+ b)`` applied at T positions of one example (a Dense layer on a
sequence, or a convolution on its im2col patches), the example's weight gradient is
``G_W = sum_t a_t^T g_t`` where ``g_t = d loss / d y_t``. Its squared Frobenius norm is

    ||G_W||^2 = sum_{t,s} (a_t . a_s)(g_t . g_s)             (ghost norm, O(T^2 (d + p)))
              = ||einsum('td,tp->dp', a, g)||^2              (materialised, O(T d p))

and for T = 1 simply ||a||^2 ||g||^2. For a convolution the ghost norm's ``a_t . a_s`` can also
come from the Gram matrix of the layer input instead of the patches: with K taps,
``a_t . a_s = sum_k G[q(t, k), q(s, k)]`` (q(t, k): the input position tap k of output t reads),
O(P^2 C + T^2 (K + p)) for P input positions of C channels, and no patches. The engine
materialises the per-example gradients while they fit in memory (they also give the clipped
sum almost for free), and otherwise takes the cheapest norm. The bias gradient is ``sum_t g_t``.

One batched forward pass, run under ``flax.linen.intercept_methods``, records every
parameterised leaf layer's input ``a`` and adds a zero "perturbation" to its output; the
gradient of the summed loss with respect to those perturbations is, row by row, each
example's output gradient ``g`` (the loss of example i depends only on row i). From ``a`` and
``g`` the engine forms the per-example norms, the clip factors ``c_i = min(1, C/||G_i||)``,
and the clipped sum by book-keeping, ``sum_i c_i G_{W,i} = einsum('btd,btp->dp', a, c g)``
(a weighted sum of the materialised gradients, or, after a Gram-matrix norm, the layer's own
weight gradient at the re-weighted output gradients), without a second backward pass of the
model.

Padding rows are not masked in the layer inputs, output gradients or per-example gradients:
a select costs a pass over each array, and the masked weighted sum of per-example gradients
ran 1.7-9x slower than the plain matvec on XLA's CPU backend. Instead they run as copies of
the first real row, its data and its key, so everything they produce is as finite as a real
row's, and their clip factor of exactly 0 adds exactly 0 to every sum. What a padding row
holds itself (NaN, inf, values that overflow the model) never enters the step.

A real row whose gradient turns out NaN or inf gets clip factor 0; since ``0 * NaN`` is NaN,
its arrays never enter a product: the inputs and output gradients of the dense and conv
layers whose sum is their product are selected to 0 on that row (one select each), and the
materialised per-example gradients of a batch with such a row are summed row by row with
that row skipped (a ``lax.cond`` whose other branch is the batched sum; it needs one row's
arrays at a time, and a select would be a pass over all of them).

A DenseGeneral that contracts the input's last axes (attention's query / key / value and
output projections, over the tokens) is a dense layer on flattened axes. An Embed's table
gradient is ``G[v] = sum_{t: id_t = v} g_t``: ``||G||^2 = sum_{t,s} [id_t = id_s] g_t . g_s``
and the clipped sum scatters ``c_i g_t`` into the rows of the ids.

LayerNorm, RMSNorm and GroupNorm compute ``y = n(x) * scale + bias``: the engine records the
normalised input ``n(x)`` (the layer at unit scale, zero bias) in place of ``x``, and each
example's scale and bias gradients are ``sum g * n(x)`` and ``sum g`` over the non-feature
axes. A layer called more than once (weight sharing: a block applied twice, a siamese
encoder) has the sum of its calls' gradients; the dense, conv and embed rules take its calls'
positions as one sequence (so the cross terms between calls are in the norm), the norm rule
adds the calls' per-example gradients.

Layers without a rule (subclasses, a Dense with a custom ``dot_general``, a conv with
feature groups or a mask, a scale-and-bias layer of the user's own) fall back to per-example
gradients for that layer only: ``vmap`` over examples of the layer's own VJP at the recorded
``(a_i, g_i)``. Flax NNX layers (``nnx.Linear``, ``LinearGeneral``, ``Conv``, ``Embed`` and
the norms) are recorded the same way through their Linen twins (:mod:`._nnx`).
Parameters used outside any recorded layer call (a ``self.param`` in a custom module, tied
weights used through another method, layers inside a lifted transform such as ``nn.scan``,
``nn.vmap`` or ``nn.remat``, which warns once) fall back to ``vmap(grad)`` for those
parameters only, the reference engine's computation.
Whether a parameter is used outside the recorded calls is decided from the traced program,
not assumed: see ``_leaked_leaves``.

References:
  Goodfellow, "Efficient per-example gradient computations", 2015, arXiv:1510.01799.
  Li, Tramer, Liang, Hashimoto, "Large language models can be strong differentially private
  learners" (ghost clipping), ICLR 2022, arXiv:2110.05679.
  Bu, Mao, Xu, "Scalable and efficient training of large convolutional neural networks with
  differential privacy" (mixed ghost clipping), NeurIPS 2022, arXiv:2205.10683.
  Bu, Wang, Zha, Karypis, "Differentially private optimization on large model at small cost"
  (book-keeping), ICML 2023, arXiv:2210.00038.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import tracers as flax_tracers
from flax.linen import dtypes as flax_dtypes

from jaxdp import conv
from jaxdp.clipping import _nnx
from jaxdp.clipping._common import (
  ClippedSum,
  PerExampleLoss,
  PyTree,
  accumulation_dtype,
  after,
  clip_factors,
  nonfinite_rows,
  split_loss,
  tree_masked_weighted_sum,
)

_SPATIAL = {1: "W", 2: "HW", 3: "DHW"}


@dataclasses.dataclass(frozen=True)
class _Call:
  """One call of a parameterised leaf layer, as seen when the loss was traced."""

  module: nn.Module  # unbound clone: ``module.apply({'params': p}, a)`` recomputes the call
  names: tuple[str, ...]  # the module's parameter names, sorted
  leaf_ids: tuple[int, ...]  # positions of those parameters among the flattened params leaves
  in_shape: tuple[int, ...]  # per-example input shape
  out_shape: tuple[int, ...]
  out_dtype: Any
  rule: str  # "dense", "conv", "embed", "norm" or "vjp"
  # A dense call contracts the input's last ``in_axes`` axes into the output's last
  # ``out_axes`` (DenseGeneral, e.g. attention's per-head projections); 1 and 1 otherwise.
  in_axes: int = 1
  out_axes: int = 1


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """What the engine found in a loss: the recorded calls and the parameters left to vmap.

  Attributes:
    calls: recorded leaf-layer calls, in call order (the order the perturbations follow).
    vmap_leaves: indices of parameter leaves whose per-example gradient is taken by vmap.
  """

  calls: tuple[_Call, ...]
  vmap_leaves: tuple[int, ...]

  def summary(self) -> dict[str, int]:
    """Counts of calls per rule, and the number of parameter leaves on the vmap fallback."""
    out: dict[str, int] = {}
    for c in self.calls:
      out[c.rule] = out.get(c.rule, 0) + 1
    out["vmap_leaves"] = len(self.vmap_leaves)
    return out


_STATE = threading.local()


def _busy() -> bool:
  return getattr(_STATE, "busy", False)


@contextlib.contextmanager
def _unrecorded() -> Iterator[None]:
  """Layer calls the engine makes itself (a layer recomputed from other parameters) pass
  through its interceptors unrecorded while the block runs."""
  busy = _busy()
  _STATE.busy = True
  try:
    yield
  finally:
    _STATE.busy = busy


def _own_params(module: nn.Module) -> Mapping[str, Any] | None:
  """The module's parameters if it is a leaf layer holding only parameters, else None."""
  try:
    variables = module.variables
  except Exception:  # unbound or scope-less modules
    return None
  if set(variables.keys()) != {"params"}:
    return None
  params = variables["params"]
  if not params or any(isinstance(v, Mapping) for v in params.values()):
    return None
  return params


def _is_array(x: Any) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


# The norm layers with the norm rule (see _norm_grads).
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
# Convolution functions known to compute the standard convolution (the rule's assumption).
_STANDARD_CONVS = (None, jax.lax.conv_general_dilated, conv.conv_general_dilated)


def _conv_rule_ok(m: nn.Conv, kernel_shape: tuple[int, ...]) -> bool:
  if type(m) is not nn.Conv or m.feature_group_count != 1 or m.mask is not None:
    return False
  if m.promote_dtype is not flax_dtypes.promote_dtype:
    return False
  if m.conv_general_dilated_cls is not None or m.conv_general_dilated not in _STANDARD_CONVS:
    return False
  if m.input_dilation not in (None, 1) and set(np.atleast_1d(m.input_dilation)) != {1}:
    return False
  if len(kernel_shape) - 2 not in _SPATIAL:
    return False
  return _conv_padding(m.padding, len(kernel_shape) - 2) is not None


def _conv_padding(padding: Any, n: int) -> Any:
  """Flax padding spec as lax takes it, or None where the im2col rule does not apply."""
  if isinstance(padding, str):
    return padding.upper() if padding.upper() in ("SAME", "VALID") else None
  if isinstance(padding, int):
    return [(padding, padding)] * n
  try:
    pads = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
  except TypeError:
    return None
  return pads if len(pads) == n and all(len(p) == 2 for p in pads) else None


def _dense_rule_ok(m: nn.Dense) -> bool:
  """A Dense that computes ``x @ kernel (+ bias)`` (the rule's assumption): no custom
  ``dot_general`` (a quantised or scaled product has other gradients) or dtype promotion."""
  return (
    m.dot_general is None
    and m.dot_general_cls is None
    and m.promote_dtype is flax_dtypes.promote_dtype
  )


def _dense_axes(module: nn.Module, kernel_ndim: int) -> tuple[int, int] | None:
  """``(in_axes, out_axes)`` of a Dense, or of a DenseGeneral that contracts the input's
  last axes with no batch axes (attention's projections); None for any other layer."""
  if type(module) is nn.Dense:
    return (1, 1) if kernel_ndim == 2 else None
  if type(module) is not nn.DenseGeneral or module.batch_dims:
    return None
  axes = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
  n_in = len(axes)
  if sorted(axes) != list(range(-n_in, 0)):  # written with negative, trailing axes only
    return None
  n_out = kernel_ndim - n_in
  return (n_in, n_out) if n_out >= 1 else None


def _rule(module: nn.Module, params: Mapping[str, Any]) -> str:
  names = set(params)
  if (
    names <= {"kernel", "bias"}
    and "kernel" in names
    and _dense_axes(module, params["kernel"].ndim) is not None
    and _dense_rule_ok(module)
  ):
    return "dense"
  if (
    type(module) is nn.Embed
    and names == {"embedding"}
    and module.promote_dtype is flax_dtypes.promote_dtype
  ):
    return "embed"
  conv_ok = isinstance(module, nn.Conv) and names <= {"kernel", "bias"}
  if conv_ok and _conv_rule_ok(module, tuple(params["kernel"].shape)):
    return "conv"
  if type(module) in _NORMS and names <= {"scale", "bias"} and module.axis_name is None:
    return "norm"
  return "vjp"


def _leaf_call(ctx: Any, args: tuple, kwargs: dict, root: Any) -> Mapping[str, Any] | None:
  """The params of a call the engine records, or None for a call it leaves alone.

  ``root`` is the JAX trace the loss runs in. A call made under another trace is inside a
  lifted transform of the model (``nn.scan``, ``nn.vmap``, ``nn.remat``, ``nn.jit``, ...):
  its input and output are values of that inner trace, which cannot leave it, so it is left
  alone and its parameters take the vmap fallback.
  """
  if _busy() or ctx.method_name != "__call__" or kwargs or len(args) != 1:
    return None
  if not _is_array(args[0]) or flax_tracers.current_trace() != root:
    return None
  return _ctx_params(ctx)


def _inside_transform(ctx: Any, root: Any) -> bool:
  """Whether this is a parameterised layer call under a lifted transform (see _leaf_call)."""
  return (
    not _busy()
    and ctx.method_name == "__call__"
    and flax_tracers.current_trace() != root
    and _ctx_params(ctx) is not None
  )


def _ctx_params(ctx: Any) -> Mapping[str, Any] | None:
  """The parameters of an intercepted call's layer (Linen or NNX), or None."""
  return _nnx.params_of(ctx) if _nnx.is_context(ctx) else _own_params(ctx.module)


@contextlib.contextmanager
def _intercepted(interceptor: Any) -> Iterator[None]:
  """Linen's ``intercept_methods`` and the NNX layers' equivalent (:mod:`._nnx`) at once."""
  with nn.intercept_methods(interceptor), _nnx.intercept(interceptor):
    yield


def discover(
  loss_fn: PerExampleLoss, params: PyTree, example: PyTree, rng: jax.Array, has_aux: bool
) -> LayerPlan:
  """Traces ``loss_fn`` for one example and plans how each parameter's norm is computed.

  Args:
    loss_fn: per-example loss.
    params: parameters (arrays or ShapeDtypeStructs).
    example: ONE example (arrays or ShapeDtypeStructs, no batch axis).
    rng: one key.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    The :class:`LayerPlan`.
  """
  leaves, treedef = jax.tree_util.tree_flatten(params)
  found: list[dict[str, Any]] = []
  lifted: list[str] = []

  def traced(leaves_, ex, key):
    ids = {id(leaf): i for i, leaf in enumerate(leaves_)}
    root = flax_tracers.current_trace()

    def interceptor(next_fun, args, kwargs, ctx):
      own = _leaf_call(ctx, args, kwargs, root)
      if own is None:
        if _inside_transform(ctx, root):
          layer = ctx.layer if _nnx.is_context(ctx) else ctx.module
          lifted.append(type(layer).__name__)
        return next_fun(*args, **kwargs)
      names = tuple(sorted(own))
      leaf_ids = tuple(ids.get(id(own[n]), -1) for n in names)
      y = next_fun(*args, **kwargs)
      if -1 in leaf_ids or not _is_array(y):
        return y  # parameters derived inside the loss, or a tuple output: left to vmap
      rule = _rule(ctx.module, own)
      in_axes, out_axes = _dense_axes(ctx.module, own["kernel"].ndim) if rule == "dense" else (1, 1)
      found.append(
        dict(
          module=ctx.module.clone(parent=None),
          names=names,
          leaf_ids=leaf_ids,
          in_shape=tuple(args[0].shape),
          out_shape=tuple(y.shape),
          out_dtype=y.dtype,
          rule=rule,
          in_axes=in_axes,
          out_axes=out_axes,
        )
      )
      return y

    with _intercepted(interceptor):
      loss, _ = split_loss(
        loss_fn(jax.tree_util.tree_unflatten(treedef, leaves_), ex, key), has_aux
      )
    return loss

  abstract = lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype)
  leaves_abs = [abstract(x) for x in leaves]
  jax.make_jaxpr(traced)(leaves_abs, jax.tree_util.tree_map(abstract, example), abstract(rng))
  if lifted:
    warnings.warn(
      "jaxdp fast engine: layer calls under another trace than the loss's (a lifted Flax "
      "transform such as nn.scan or nn.remat, or a jax.grad inside the loss such as a "
      f"gradient penalty: {', '.join(sorted(set(lifted)))}) take the "
      "reference engine's per-example vmap for their parameters; the rest of the model "
      "keeps the fast rules.",
      stacklevel=3,
    )

  # A layer called more than once shares its parameters between calls (weight sharing): its
  # gradient is the sum over the calls, and the exact norm needs the cross terms. The dense,
  # conv and embed rules take them by treating the calls' positions as one sequence, the
  # norm rule by adding the calls' per-example gradients; if the calls disagree on the
  # rule, every call of the layer takes the per-layer vjp, whose per-example gradients add.
  rules: dict[tuple[int, ...], set[str]] = {}
  for f in found:
    rules.setdefault(f["leaf_ids"], set()).add(f["rule"])
  uses = {ids: sum(f["leaf_ids"] == ids for f in found) for ids in rules}
  calls = [_Call(**{**f, "rule": f["rule"] if len(rules[f["leaf_ids"]]) == 1 else "vjp"})
           for f in found]  # fmt: skip
  # Two different layer objects sharing a parameter leaf are not expected; route them to vmap.
  owner: dict[int, tuple[int, ...]] = {}
  clash: set[int] = set()
  for c in calls:
    for i in c.leaf_ids:
      if owner.setdefault(i, c.leaf_ids) != c.leaf_ids:
        clash.add(i)
  calls = [c for c in calls if not clash.intersection(c.leaf_ids)]

  lone_vjp = [c for c in calls if c.rule == "vjp" and uses[c.leaf_ids] == 1]
  unruled = sorted({type(c.module).__name__ for c in lone_vjp if not _norm_like(c)})
  if unruled:
    _warn_once(
      f"jaxdp fast engine: no rule for {', '.join(unruled)} (a custom layer, a subclass, or a "
      "setting the rules do not cover): each takes its own per-example vjp, the rest of the "
      "model keeps the fast rules."
    )
  covered = sorted({i for c in calls for i in c.leaf_ids})
  leaked = _leaked_leaves(loss_fn, treedef, leaves_abs, example, rng, has_aux, calls, covered)
  if leaked:
    calls = [c for c in calls if not leaked.intersection(c.leaf_ids)]
    covered = sorted({i for c in calls for i in c.leaf_ids})
  rest = tuple(i for i in range(len(leaves)) if i not in set(covered))
  if rest:
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    shown = ", ".join(paths[i] for i in rest[:6]) + (" ..." if len(rest) > 6 else "")
    _warn_once(
      f"jaxdp fast engine: {len(rest)} of {len(leaves)} parameter arrays are not used through "
      f"a recorded layer call ({shown}); their per-example gradients come from vmap, the "
      "reference engine's computation (the rest keep the fast rules). engine='reference' "
      "takes vmap for all of them without this note."
    )
  return LayerPlan(tuple(calls), rest)


_WARNED: set[str] = set()


def _norm_like(call: _Call) -> bool:
  """A norm layer, or any layer whose only parameters are a scale and a bias (a norm's
  affine part): per-example scale and bias are what its vjp rule computes, no note."""
  return type(call.module) in _NORMS or set(call.names) <= {"scale", "bias"}


def _warn_once(message: str) -> None:
  """``message`` as a UserWarning, the first time this process meets it."""
  if message not in _WARNED:
    _WARNED.add(message)
    warnings.warn(message, stacklevel=3)


def _leaked_leaves(loss_fn, treedef, leaves_abs, example, rng, has_aux, calls, covered) -> set[int]:
  """Covered leaves whose gradient does not come only from the recorded calls.

  The loss is traced again with every recorded call recomputed from stop-gradient copies of
  its parameters. A covered leaf's gradient of that loss must then be identically zero; the
  check is made on the program (dead-code elimination of the gradient jaxpr, then evaluation
  of what is left, which can only be a constant), so a weight tied to another use cannot slip
  through. If the check cannot be made, every call is treated as leaked (the vmap path).
  """
  if not covered:
    return set()
  by_ids = {c.leaf_ids: c for c in calls}

  def detached(leaves_, ex, key):
    ids = {id(leaf): i for i, leaf in enumerate(leaves_)}
    root = flax_tracers.current_trace()

    def interceptor(next_fun, args, kwargs, ctx):
      own = _leaf_call(ctx, args, kwargs, root)
      if own is None:
        return next_fun(*args, **kwargs)
      names = tuple(sorted(own))
      call = by_ids.get(tuple(ids.get(id(own[n]), -1) for n in names))
      if call is None:
        return next_fun(*args, **kwargs)
      frozen = {n: jax.lax.stop_gradient(own[n]) for n in names}
      with _unrecorded():
        return call.module.apply({"params": frozen}, args[0])

    with _intercepted(interceptor):
      loss, _ = split_loss(
        loss_fn(jax.tree_util.tree_unflatten(treedef, leaves_), ex, key), has_aux
      )
    return loss

  abstract = lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype)
  try:
    from jax._src.interpreters import partial_eval as pe

    closed = jax.make_jaxpr(jax.grad(detached))(
      leaves_abs, jax.tree_util.tree_map(abstract, example), abstract(rng)
    )
    jaxpr = pe.convert_constvars_jaxpr(closed.jaxpr)
    n_const = len(closed.jaxpr.constvars)
    leaked = set()
    for k in covered:
      used_out = [j == k for j in range(len(jaxpr.outvars))]
      dced, used_in = pe.dce_jaxpr(jaxpr, used_out)
      if any(used_in[n_const:]):
        leaked.add(k)
        continue
      consts = [c for c, u in zip(closed.consts, used_in[:n_const], strict=True) if u]
      with jax.ensure_compile_time_eval():  # we may be inside an outer jit trace
        (value,) = jax.core.eval_jaxpr(dced, [], *consts)
      if np.any(np.asarray(value) != 0):
        leaked.add(k)
    return leaked
  except Exception as e:  # pragma: no cover - depends on JAX internals
    msg = f"jaxdp fast engine: could not verify layer coverage ({e}); using vmap."
    warnings.warn(msg, stacklevel=2)
    return set(covered)


@dataclasses.dataclass(frozen=True)
class _ConvInput:
  """A batched conv input made ready for a stride-``step`` conv with ``taps`` taps.

  ``x`` is ``(B * L, spatial..., C)``: the example's own leading axes (e.g. the batch-of-one
  idiom, L of them in all) folded into the batch, padded as the layer pads, cropped to what
  its windows read, and, for a strided conv whose kernel is a multiple of its stride,
  rewritten as the space-to-depth input of a stride-1 conv (each s x s block of pixels
  becomes s*s channels). ``perm`` maps rows in (taps..., C) order back to the kernel's own
  (HWIO) order, ``kernel_rows = rows[perm]``, when the two differ. Without that rewrite,
  ``raw`` is the input before padding and ``pads`` the (non-negative) padding, which let the
  Gram norm skip the padding's zeros.
  """

  x: jax.Array
  taps: tuple[int, ...]
  out: tuple[int, ...]
  step: tuple[int, ...]
  tap_step: tuple[int, ...]
  perm: np.ndarray | None
  raw: jax.Array | None = None
  pads: tuple[tuple[int, int], ...] | None = None


def _conv_input(call: _Call, a: jax.Array) -> _ConvInput:
  """The layer input of every example as the conv reads it (see :class:`_ConvInput`)."""
  m = call.module
  kshape = tuple(int(k) for k in np.atleast_1d(m.kernel_size))
  n = len(kshape)
  tup = lambda v: (1,) * n if v is None else ((v,) * n if isinstance(v, int) else tuple(v))
  strides, dil = tup(m.strides), tup(m.kernel_dilation)
  x = a.reshape((-1, *a.shape[a.ndim - n - 1 :]))
  c = x.shape[-1]
  spatial = x.shape[1:-1]
  window = tuple((k - 1) * d + 1 for k, d in zip(kshape, dil, strict=True))
  padding = _conv_padding(m.padding, n)
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(spatial, window, strides, padding)
  raw = x
  x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  out = tuple((x.shape[1 + i] - window[i]) // strides[i] + 1 for i in range(n))
  used = tuple((o - 1) * st + w for o, st, w in zip(out, strides, window, strict=True))
  x = x[(slice(None), *[slice(0, u) for u in used], slice(None))]
  if not conv.applies(kshape, strides, dil):
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    unpadded = all(lo >= 0 and hi >= 0 for lo, hi in pads)
    return _ConvInput(x, kshape, out, strides, dil, None, raw if unpadded else None, pads)
  # Pad each spatial size up to a multiple of its stride, then fold the phases into channels.
  extra = [(-x.shape[1 + i]) % strides[i] for i in range(n)]
  x = jnp.pad(x, ((0, 0), *[(0, e) for e in extra], (0, 0)))
  x = conv.space_to_depth(x, strides)  # channels ordered (phases..., C)
  taps = tuple(k // st for k, st in zip(kshape, strides, strict=True))
  # Row order (taps..., phases..., C) -> kernel order (taps_0, phase_0, taps_1, ..., C).
  idx = np.arange(int(np.prod(kshape)) * c).reshape((*taps, *strides, c))
  interleave = [ax for i in range(n) for ax in (i, n + i)] + [2 * n]
  perm = idx.transpose(interleave).reshape(-1)  # kernel position -> row position
  return _ConvInput(x, taps, out, (1,) * n, (1,) * n, perm)


def _conv_patches(ci: _ConvInput, b: int) -> jax.Array:
  """im2col patches of a batched conv input, as (B, T, K, C) with K taps of C features.

  Built from strided slices of the padded input rather than by
  ``lax.conv_general_dilated_patches`` (a convolution with a one-hot kernel) or a gather,
  which XLA's CPU backend runs slower than the copies they amount to once fused into the
  layers around them. The space-to-depth form of a strided conv (see :class:`_ConvInput`)
  makes fewer, larger copies: about 2x faster for the TF-Privacy CNN's first layer.

  The slices are stacked one spatial axis at a time (:func:`jaxdp.conv.stack_taps`): for the
  TF-Privacy CNN's first layer (4x4 taps) one fusion instead of 16 copies and a
  concatenation, half the working memory of the patches (12.3 vs 23.7 MiB at batch 256,
  with the per-example gradients), 1.5x faster with them.
  """
  x = ci.x

  def window(offsets: tuple[int, ...]) -> jax.Array:
    sl = tuple(
      slice(o * ts, o * ts + (out - 1) * st + 1, st)
      for o, ts, out, st in zip(offsets, ci.tap_step, ci.out, ci.step, strict=True)
    )
    return x[(slice(None), *sl, slice(None))].reshape(b, -1, x.shape[-1])

  patches = conv.stack_taps(window, ci.taps, axis=2)
  return patches.reshape(b, -1, int(np.prod(ci.taps)), x.shape[-1])


def _conv_gram_sq_norm(ci: _ConvInput, g_rows: jax.Array) -> jax.Array:
  """Per-example ghost norm of a conv's weight gradient from the Gram matrix of its input.

  With patches ``a_t = (x[q(t, k)])_k`` (q(t, k): the position that tap k of output t
  reads), ``a_t . a_s = sum_k G[q(t, k), q(s, k)]`` where ``G = x x^T`` is the Gram matrix of
  the example's input positions, and ``||sum_t a_t^T g_t||^2 = sum_{t,s} (a_t . a_s)
  (g_t . g_s)``. Costs P^2 C + T^2 (K + p) per example for P input positions of C channels,
  and needs no patches. Where the input is only padded (no space-to-depth rewrite), ``G``
  is taken over the unpadded positions (padding adds zero rows and columns: a 3x3 SAME conv
  on 7x7 maps has 49 positions instead of 81, 2.7x fewer multiply-adds)."""
  return jnp.sum(_gram_tap_sum(ci, g_rows.shape[0]) * _row_gram(g_rows), axis=(1, 2))


def _gram_tap_sum(ci: _ConvInput, b: int) -> jax.Array:
  """``(B, L*T, L*T)`` patch inner products ``a_t . a_s``, summed over the taps from the
  Gram matrix of the conv's input (the unpadded ``ci.raw``, zero-padded as the layer pads,
  where there is one; else ``ci.x``).

  On the grid of the N (padded) positions of an example, tap ``k`` moves both positions by
  the same flat offset ``d_k``, so on the flattened ``N x N`` matrix it is one shift by
  ``d_k (N + 1)``: the tap sum is a sum of contiguous 1-D slices, then one (strided) crop
  to the output positions, which XLA fuses into one loop. Taken as a strided slice of the
  2n-D matrix per tap it made one copy per tap (ScatterNet CNN, whole private step on the
  2-core CPU, interleaved in one process, medians: 23.2 -> 21.6 ms at batch 256, 121 -> 111
  ms at 1024); space-to-depth convs, which gathered the Gram matrix per tap, take the same
  form."""
  x, pads = (ci.x, None) if ci.raw is None else (ci.raw, ci.pads)
  spatial = x.shape[1:-1]
  items = x.shape[0] // b
  gram = _row_gram(x.reshape(b, -1, x.shape[-1])).reshape(b, items, *spatial, items, *spatial)
  if pads is not None:
    side = [(0, 0), *pads]
    gram = jnp.pad(gram, [(0, 0), *side, *side])
  grid = gram.shape[1 : 2 + len(spatial)]  # (L, padded spatial...)
  n = int(np.prod(grid))
  place = [int(np.prod(grid[i + 1 :])) for i in range(len(grid))]
  shifts = [
    (n + 1) * sum(ki * ts * w for ki, ts, w in zip(k, ci.tap_step, place[1:], strict=True))
    for k in np.ndindex(*ci.taps)
  ]
  length = n * n - max(shifts)
  flat = gram.reshape(b, n * n)
  total = sum(
    (flat[:, d : d + length] for d in shifts[1:]), flat[:, shifts[0] : shifts[0] + length]
  )
  total = jnp.pad(total, [(0, 0), (0, n * n - length)]).reshape(b, *grid, *grid)
  outs = [slice(None)] + [
    slice(0, (o - 1) * st + 1, st) for o, st in zip(ci.out, ci.step, strict=True)
  ]
  t = items * int(np.prod(ci.out))
  return total[(slice(None), *outs, *outs)].reshape(b, t, t)


# Per-example weight gradients of a layer are kept (and reused for the clipped sum) while
# they take at most this many elements for the whole batch.
MATERIALIZE_ELEMENTS = 1 << 26
# A conv whose patches and per-example gradients hold at least this many entries per example
# takes the Gram-matrix norm while that costs at most GRAM_MAX_MACS_RATIO of materialising.
GRAM_MIN_ELEMENTS = 3 << 14
GRAM_MAX_MACS_RATIO = 0.6
# A conv with at most this many output positions per example takes the Gram norm on the
# same cost ratio whatever its size: materialising is then a batched dot of that depth.
GRAM_MAX_SMALL_POSITIONS = 16


class _Kept(NamedTuple):
  """What a dense or conv layer's norm leaves for its clipped sum."""

  how: str  # "t1", "materialize", "ghost" or "gram"
  a_rows: jax.Array | None  # (B, T, K, C) inputs or patches ("t1", "ghost")
  g_rows: jax.Array  # (B, T, p) output gradients
  per_ex: jax.Array | None  # (B, p, K*C) per-example weight gradients ("materialize")
  perm: np.ndarray | None  # rows -> kernel order, see _ConvInput


def _outer_rule(b: int, t: int, d: int, p: int, gram_macs: int | None = None) -> str:
  """How to get ||sum_t a_t^T g_t||^2: "t1", "materialize", "ghost" or "gram".

  Materialising costs T*d*p multiply-adds per example and makes the clipped sum almost
  free (a weighted sum of the stored gradients), but writes and reads T*d patch entries and
  d*p gradient entries per example. The ghost norm from the rows (or patches) costs
  T^2 (d + p) and leaves the book-keeping sum (another T*d*p, as one 2-D matmul); a conv's
  ghost norm from the Gram matrix of its input costs ``gram_macs``, needs neither patches
  nor per-example gradients and leaves the sum to the layer's own weight gradient at the
  re-weighted output gradients (about T*d*p again).

  The rule: a conv with big patches and gradients (T*d + d*p >= ``GRAM_MIN_ELEMENTS``), or
  with few output positions (T <= ``GRAM_MAX_SMALL_POSITIONS``), takes the Gram norm when it
  costs at most ``GRAM_MAX_MACS_RATIO`` of materialising; otherwise materialise whenever the
  per-example gradients fit in memory, and beyond that take the cheapest norm. Measured on
  the 2-core CPU, whole private step, Gram norm on one layer against materialising it
  (interleaved runs in one process): ScatterNet CNN first conv (T*d + d*p = 59k entries,
  Gram 0.55x the multiply-adds) 1.16x faster at batch 256, 1.08x at 1024; layers with
  smaller patches were slower inside their models although the same layer alone was faster
  (TF-Privacy CNN second conv, 15k, 0.51x: 1.09x slower; DP-CNN third conv, 33k, 0.43x:
  1.05x slower); a lone 3x3 conv on 9x9x64 (65k, 0.81x) 1.05x slower. Re-measured once the
  tap sum became 1-D slices (:func:`_gram_tap_sum`): whole private steps, interleaved in one
  process, medians, with the size threshold lowered to 8k entries against the rule as it
  was: ScatterNet CNN second conv (T = 9, 12k entries, 0.28x) 1.06x faster at batch 256 and
  at 1024; TF-Privacy CNN second conv (T = 25) 1.00x; DP-CNN third conv (T = 49) 1.02x
  slower. Materialising contracts over the T positions, and XLA's CPU batched dot is least
  efficient at small depth: hence the small-T exception rather than a lower size threshold.
  """
  if t == 1:
    return "t1"
  ghost, materialize = t * t * (d + p), t * d * p
  if (
    gram_macs is not None
    and (t * d + d * p >= GRAM_MIN_ELEMENTS or t <= GRAM_MAX_SMALL_POSITIONS)
    and gram_macs <= GRAM_MAX_MACS_RATIO * materialize
  ):
    return "gram"
  gram = materialize if gram_macs is None else gram_macs
  if b * d * p <= MATERIALIZE_ELEMENTS or min(ghost, gram) >= materialize:
    return "materialize"
  return "gram" if gram < ghost else "ghost"


def _dense_rule(b: int, t: int, d: int, p: int) -> str:
  """:func:`_outer_rule` for a dense layer over T > 1 positions (a sequence): the ghost norm
  whenever it costs fewer multiply-adds than materialising, ``T (d + p) <= d p``. Unlike a
  conv's patches, a dense layer's rows are its input itself (no copies to build), and the
  book-keeping sum is one 2-D matmul, while the per-example gradients are B small batched
  dots of depth T. Measured on the 2-core CPU, whole private step of the benchmark's ViT
  (16 tokens, widths 49-128, every dense layer ghost against materialised, interleaved in one
  process, the machine shared with another run): 65.3 -> 60.7 ms at batch 256 (1.08x),
  283.8 -> 258.5 ms at 1024 (1.10x)."""
  if t > 1 and t * (d + p) <= d * p:
    return "ghost"
  return _outer_rule(b, t, d, p)


def _layer_sq_norm(
  call: _Call, a_list: list[jax.Array], g_list: list[jax.Array]
) -> tuple[jax.Array, _Kept]:
  """Per-example squared norm of a dense or conv layer's weight gradient (bias excluded),
  and what the clipped sum needs, from the inputs and output gradients of its calls.

  A layer called more than once (weight sharing) has the gradient ``sum_calls sum_t a_t^T
  g_t``: the calls' positions (rows, or patches) are one sequence, and the rules apply to it
  as to one call; only the Gram norm, which reads one input's Gram matrix, is left out."""
  if call.rule == "dense" or len(a_list) > 1:
    return _rows_sq_norm(call, a_list, g_list)
  a, g = a_list[0], g_list[0]
  b = g.shape[0]
  # Norms and sums in float32 (exact upcasts) whatever the layer's dtype; the Gram norm's
  # sum is the layer's own vjp, which would run in the layer's dtype, so only float32 or
  # wider layers take it.
  wide = g.dtype == accumulation_dtype(g.dtype) and a.dtype == accumulation_dtype(a.dtype)
  a, g = a.astype(accumulation_dtype(a.dtype)), g.astype(accumulation_dtype(g.dtype))
  g_rows = g.reshape(b, -1, int(np.prod(g.shape[g.ndim - call.out_axes :])))
  t, p = g_rows.shape[1:]
  ci = _conv_input(call, a)
  positions = int(np.prod(ci.x.shape[:-1])) // b
  k, c = int(np.prod(ci.taps)), ci.x.shape[-1]
  # The padded positions' count, as when the rule's thresholds were measured (the Gram now
  # skips the padding: the rule chooses as before, and the Gram norm got cheaper).
  gram_macs = positions * positions * c + t * t * (k + p) if wide else None
  how = _outer_rule(b, t, k * c, p, gram_macs)
  if how == "gram":
    return _conv_gram_sq_norm(ci, g_rows), _Kept(how, None, g_rows, None, None)
  a_rows = _conv_patches(ci, b)
  sq, per_ex = _sq_norm_outer(a_rows, g_rows, how)
  return sq, _Kept(how, None if how == "materialize" else a_rows, g_rows, per_ex, ci.perm)


def _rows_sq_norm(
  call: _Call, a_list: list[jax.Array], g_list: list[jax.Array]
) -> tuple[jax.Array, _Kept]:
  """:func:`_layer_sq_norm` from rows: a dense layer's inputs, or a conv's patches (a conv
  called more than once), and the output gradients, of every call concatenated along the
  positions (one call: its own)."""
  b = g_list[0].shape[0]
  a_parts, g_parts, perm = [], [], None
  for a, g in zip(a_list, g_list, strict=True):
    a, g = a.astype(accumulation_dtype(a.dtype)), g.astype(accumulation_dtype(g.dtype))
    g_parts.append(g.reshape(b, -1, int(np.prod(g.shape[g.ndim - call.out_axes :]))))
    if call.rule == "dense":
      a_parts.append(a.reshape(b, -1, 1, int(np.prod(a.shape[a.ndim - call.in_axes :]))))
    else:
      ci = _conv_input(call, a)
      a_parts.append(_conv_patches(ci, b))
      perm = ci.perm  # the same for every call: it depends on the kernel and strides only
  a_rows, g_rows = jnp.concatenate(a_parts, axis=1), jnp.concatenate(g_parts, axis=1)
  t, p = g_rows.shape[1:]
  rule = _dense_rule if call.rule == "dense" else _outer_rule
  how = rule(b, t, a_rows.shape[2] * a_rows.shape[3], p)
  sq, per_ex = _sq_norm_outer(a_rows, g_rows, how)
  return sq, _Kept(how, None if how == "materialize" else a_rows, g_rows, per_ex, perm)


# Below this many rows per example, :func:`_row_gram` is a product and a sum, not a dot.
ROW_GRAM_DOT_MIN_ROWS = 5


def _row_gram(x: jax.Array) -> jax.Array:
  """(B, T, D) -> (B, T, T): the inner products of each example's rows. A batched matmul,
  except for T < ROW_GRAM_DOT_MIN_ROWS: then a broadcast product and a sum over D. Inside
  the private step XLA's CPU batched dot with 2x2 outputs (the GAN critic's Dense layers:
  the pair's two rows of 1568) took 17 ms of thread time at batch 256 where the product and
  sum take well under one (alone, both forms are within 1.2x of each other at T = 2-49)."""
  if x.shape[1] < ROW_GRAM_DOT_MIN_ROWS:
    return jnp.sum(x[:, :, None, :] * x[:, None, :, :], axis=-1)
  return jnp.einsum("btd,bsd->bts", x, x)


def _sq_norm_outer(a4: jax.Array, g_rows: jax.Array, how: str) -> tuple[jax.Array, Any]:
  """Per-example ||sum_t a_t^T g_t||_F^2, and the (B, p, K*C) per-example gradients if kept."""
  if how == "t1":
    sq = jnp.sum(jnp.square(a4), axis=(1, 2, 3)) * jnp.sum(jnp.square(g_rows), axis=(1, 2))
    return sq, None
  if how == "ghost":
    aa = _row_gram(a4.reshape(*a4.shape[:2], -1))  # one contracting axis
    return jnp.sum(aa * _row_gram(g_rows), axis=(1, 2)), None
  # p leading: XLA's CPU dot runs this output layout about twice as fast as (K, C, p).
  per_ex = jnp.einsum("btkc,btp->bpkc", a4, g_rows)
  per_ex = per_ex.reshape(per_ex.shape[0], per_ex.shape[1], -1)
  return jnp.sum(jnp.square(per_ex), axis=(1, 2)), per_ex


def _kernel_from_rows(summed: jax.Array, kernel_shape: tuple[int, ...]) -> jax.Array:
  """(d, p) weight gradient in row form back to the kernel's own layout (Dense or HWIO)."""
  return summed.reshape(kernel_shape)


def _kernel_leaf(kept: _Kept, rows: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """A (d, p) weight gradient in row order (the patches' order) as the kernel leaf."""
  rows = rows.reshape(-1, rows.shape[-1])
  if kept.perm is not None:
    rows = jnp.take(rows, jnp.asarray(kept.perm), axis=0)
  return _kernel_from_rows(rows, shape)


def _embed_rows(tokens: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
  """An Embed call's (B, T) token ids and (B, T, d) output gradients, in float32."""
  b = g.shape[0]
  return tokens.reshape(b, -1), g.reshape(b, -1, g.shape[-1]).astype(accumulation_dtype(g.dtype))


def _embed_sq_norm(tokens: jax.Array, g_rows: jax.Array) -> jax.Array:
  """Per-example ``||G||^2`` of an embedding table's gradient ``G[v] = sum_{t: id_t = v} g_t``:
  ``sum_{t,s} [id_t = id_s] g_t . g_s`` (O(T^2 d), never the (V, d) table)."""
  same = tokens[:, :, None] == tokens[:, None, :]
  gg = _row_gram(g_rows)
  return jnp.sum(jnp.where(same, gg, 0.0), axis=(1, 2))


def _embed_sum(tokens, g_rows, factors, ok, shape) -> jax.Array:
  """The clipped sum of an embedding table's gradients: the rows ``c_i g_t`` scattered into
  the token ids' rows (rows not ``ok`` selected out, so a NaN there adds nothing)."""
  weighted = jnp.where(ok[:, None, None], g_rows * factors[:, None, None].astype(g_rows.dtype), 0)
  table = jnp.zeros(shape, g_rows.dtype)
  return table.at[tokens.reshape(-1)].add(weighted.reshape(-1, shape[-1]))


def _normalized(call: _Call, own: Mapping[str, jax.Array], x: jax.Array) -> jax.Array:
  """A norm layer's input as the layer normalises it, ``n(x)``: the layer itself at scale 1
  and bias 0 (its output is ``n(x) * scale + bias``; the statistics are the ones its own
  call computes, which XLA shares with it). Recorded in place of the input."""
  unit = {n: (jnp.ones_like if n == "scale" else jnp.zeros_like)(v) for n, v in own.items()}
  with _unrecorded():
    return call.module.apply({"params": unit}, x)


def _norm_grads(call: _Call, n: jax.Array, g: jax.Array, shapes: Mapping[str, tuple]) -> dict:
  """Per-example gradients of a norm layer's scale and bias, in float32.

  LayerNorm, RMSNorm and GroupNorm compute ``y = n(x) * scale + bias`` with the scale and
  bias broadcast over every axis but the features' (``n(x)``: :func:`_normalized`), so
  ``G_scale = sum g * n(x)`` and ``G_bias = sum g``, summed over those other axes: no
  per-example backward pass through the normalisation. ``n`` and ``g`` are ``(B, ...)``;
  each result is ``(B, *shapes[name])``."""
  b, ndim = g.shape[0], g.ndim - 1
  m = call.module
  if type(m) is nn.GroupNorm:
    features = {ndim - 1}
  else:
    axes = m.feature_axes if isinstance(m.feature_axes, tuple | list) else (m.feature_axes,)
    features = {ax % ndim for ax in axes}
  other = tuple(1 + i for i in range(ndim) if i not in features)
  n, g = n.astype(accumulation_dtype(n.dtype)), g.astype(accumulation_dtype(g.dtype))
  sums = {"scale": lambda: jnp.sum(g * n, axis=other), "bias": lambda: jnp.sum(g, axis=other)}
  return {name: sums[name]().reshape(b, *shapes[name]) for name in call.names}


def _layer_vjp_sum(call: _Call, own: dict[str, jax.Array], a: jax.Array, g: jax.Array) -> dict:
  """The layer's own parameter gradient at input ``a`` and output gradient ``g``."""
  _, layer_vjp = jax.vjp(lambda p: call.module.apply({"params": p}, a), own)
  return layer_vjp(g)[0]


def _gram_sum(call, leaves, a, g, factors, ok) -> dict[int, Any]:
  """A Gram-norm conv's clipped sum: the layer's own weight gradient at the re-weighted
  output gradients ``c_i g_i``, with the rows that are not ``ok`` set to 0 in ``a`` and ``g``
  (two selects: a conv inside a ``lax.cond`` branch ran 10x slower on XLA's CPU backend)."""
  named = dict(zip(call.names, call.leaf_ids, strict=True))
  own = {n: leaves[i] for n, i in named.items()}
  rows = lambda x, w: jnp.where(ok.reshape((-1,) + (1,) * (x.ndim - 1)), x * w, 0)
  f = factors.astype(g.dtype).reshape((-1,) + (1,) * (g.ndim - 1))
  summed = _layer_vjp_sum(call, own, rows(a, 1), rows(g, f))
  return {i: summed[n].astype(accumulation_dtype(leaves[i].dtype)) for n, i in named.items()}


def _sums_batched(calls, leaves, rows, bias_rows, factors) -> dict[int, Any]:
  """The dense and conv layers' clipped sums (materialised or ghost), batched: leaf index ->
  float32 sum."""
  out: dict[int, Any] = {}
  for k, kept in rows.items():
    c = calls[k]
    named = dict(zip(c.names, c.leaf_ids, strict=True))
    f = factors.astype(kept.g_rows.dtype)
    if kept.per_ex is None:
      # As one 2-D matmul over the (example, position) rows: XLA's CPU dot runs this
      # several times faster than the same contraction written over two batch-like axes.
      a2 = kept.a_rows.reshape(-1, kept.a_rows.shape[2] * kept.a_rows.shape[3])
      kernel = a2.T @ (kept.g_rows * f[:, None, None]).reshape(-1, kept.g_rows.shape[-1])
    else:
      kernel = jnp.einsum("bpd,b->dp", kept.per_ex, f)
    out[named["kernel"]] = _kernel_leaf(kept, kernel, np.shape(leaves[named["kernel"]]))
    if "bias" in named:
      bias = jnp.einsum("bp,b->p", bias_rows[k], f)
      out[named["bias"]] = bias.reshape(np.shape(leaves[named["bias"]]))
  return {i: x.astype(accumulation_dtype(leaves[i].dtype)) for i, x in out.items()}


def _sums_row_by_row(calls, leaves, rows, bias_rows, factors, ok) -> dict[int, Any]:
  """The same sums as :func:`_sums_batched`, one row at a time, over the rows that are ``ok``
  (real, with a finite norm); the others' arrays are replaced by 0 before any product (padding
  rows copy the first real row, which may be the non-finite one). Slow, and only run on a
  batch with a non-finite real row."""
  zeros = {
    j: jnp.zeros(np.shape(leaves[j]), accumulation_dtype(leaves[j].dtype))
    for k in rows
    for j in calls[k].leaf_ids
  }

  def row(x: jax.Array, i: jax.Array) -> jax.Array:
    return jnp.where(ok[i], jax.lax.dynamic_index_in_dim(x, i, keepdims=False), 0)

  def body(i, acc):
    acc = dict(acc)
    f = jnp.where(ok[i], factors[i], 0.0)
    for k, kept in rows.items():
      c = calls[k]
      named = dict(zip(c.names, c.leaf_ids, strict=True))
      if kept.per_ex is None:
        a = row(kept.a_rows, i).reshape(kept.a_rows.shape[1], -1)
        kernel = a.T @ (row(kept.g_rows, i) * f)
      else:
        kernel = row(kept.per_ex, i).T * f
      j = named["kernel"]
      acc[j] = acc[j] + _kernel_leaf(kept, kernel, np.shape(leaves[j]))
      if "bias" in named:
        j = named["bias"]
        acc[j] = acc[j] + (row(bias_rows[k], i) * f).reshape(np.shape(leaves[j]))
    return acc

  return jax.lax.fori_loop(0, factors.shape[0], body, zeros)


def clipped_sum(
  loss_fn: PerExampleLoss,
  params: PyTree,
  batch: PyTree,
  mask: jax.Array,
  rngs: jax.Array,
  l2_norm_clip: float,
  *,
  has_aux: bool = False,
  plan: LayerPlan | None = None,
) -> ClippedSum:
  """Sum of per-example clipped gradients by the fast per-layer engine.

  Same contract and same numbers (up to float rounding) as
  :func:`jaxdp.clipping.reference.clipped_sum` with a float ``l2_norm_clip``.

  Args:
    loss_fn: ``loss_fn(params, example, rng)`` for ONE example; its model must be Flax
      modules called inside it (any Flax model works; Dense and Conv layers get the fast rules).
    params: parameters.
    batch: pytree of (B, ...) arrays.
    mask: (B,) bool, False on padding rows.
    rngs: (B,) per-example keys.
    l2_norm_clip: the global clipping bound C > 0.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    plan: a plan from :func:`discover`; traced here when None.

  Returns:
    A :class:`ClippedSum`.

  Formal guarantees:
    For every real row i the contribution is ``c_i G_i`` with ``c_i = min(1, C/||G_i||)``,
    ``||G_i||`` the exact global norm of the example's full gradient (every parameter leaf is
    counted, by a layer rule, the per-layer vjp, or vmap), so it has L2 norm <= C; norms,
    factors and sums are float32 (or wider) whatever the layers' dtype. Padding rows, and
    real rows whose gradient holds a NaN or an inf (factor 0, norm reported as is),
    contribute exactly zero, even if their inputs, loss or gradients are NaN or inf.
  """
  mask = mask.astype(bool)
  if plan is None:
    first = lambda x: x[0]
    plan = discover(loss_fn, params, jax.tree_util.tree_map(first, batch), rngs[0], has_aux)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  b = mask.shape[0]
  calls = plan.calls
  rest = plan.vmap_leaves
  # Padding rows run as copies of the first real row (its data and its key; one gather of
  # the batch): their layer inputs, output gradients and per-example gradients are then as
  # finite as a real row's, and their clip factor of exactly 0 makes their share of every
  # sum exactly 0 with no mask on any per-position array. What a padding row holds itself
  # (NaN, inf, a non-finite loss) never enters. Their aux is the copied row's; their
  # returned loss is 0.
  source = jnp.where(mask, jnp.arange(b), jnp.argmax(mask))
  batch = jax.tree_util.tree_map(lambda x: jnp.take(x, source, axis=0), batch)
  rngs = jnp.take(rngs, source, axis=0)

  def per_example(leaves_, perturbs, rest_leaves, ex, key):
    full = list(leaves_)
    for i, leaf in zip(rest, rest_leaves, strict=True):
      full[i] = leaf
    inputs: list[jax.Array] = []
    ids = {id(leaf): i for i, leaf in enumerate(full)}
    seen = {c.leaf_ids: 0 for c in calls}
    order: dict[tuple[int, ...], list[int]] = {}
    for k, c in enumerate(calls):
      order.setdefault(c.leaf_ids, []).append(k)
    root = flax_tracers.current_trace()

    def interceptor(next_fun, args, kwargs, ctx):
      own = _leaf_call(ctx, args, kwargs, root)
      if own is None:
        return next_fun(*args, **kwargs)
      key_ids = tuple(ids.get(id(own[n]), -1) for n in sorted(own))
      if key_ids not in seen:
        return next_fun(*args, **kwargs)
      k = order[key_ids][seen[key_ids]]
      seen[key_ids] += 1
      x = args[0]
      inputs.append((k, _normalized(calls[k], own, x) if calls[k].rule == "norm" else x))
      return next_fun(*args, **kwargs) + perturbs[k]

    with _intercepted(interceptor):
      loss, aux = split_loss(loss_fn(jax.tree_util.tree_unflatten(treedef, full), ex, key), has_aux)
    if len(inputs) != len(calls):
      raise RuntimeError("jaxdp fast engine: the loss made different layer calls than traced")
    inputs_sorted = tuple(a for _, a in sorted(inputs, key=lambda t: t[0]))
    return loss, (inputs_sorted, aux)

  def total(perturbs, rest_copies):
    losses, (inputs, aux) = jax.vmap(per_example, in_axes=(None, 0, 0, 0, 0))(
      leaves, perturbs, rest_copies, batch, rngs
    )
    return jnp.sum(jnp.where(mask, losses, 0.0)), (losses, inputs, aux)

  perturbs = tuple(jnp.zeros((b, *c.out_shape), c.out_dtype) for c in calls)
  # Parameters on the vmap fallback enter as per-example copies: the gradient of the summed
  # loss with respect to copy i is example i's gradient.
  rest_copies = tuple(jnp.broadcast_to(leaves[i], (b, *np.shape(leaves[i]))) for i in rest)
  (out_grads, rest_grads), (losses, inputs, aux) = jax.grad(total, argnums=(0, 1), has_aux=True)(
    perturbs, rest_copies
  )

  # The engine's own contractions (norms, clipped sums) in full float32 whatever the default
  # matmul precision (TF32 on a GPU, bfloat16 on a TPU), so that each example's share of the
  # sum has the norm its clip factor was computed from.
  with jax.default_matmul_precision("highest"):
    norms, factors, out = _clip_and_sum(
      plan, leaves, inputs, out_grads, rest_grads, mask, l2_norm_clip
    )
  losses = jnp.where(mask, losses, 0.0)
  return ClippedSum(jax.tree_util.tree_unflatten(treedef, out), norms, factors, losses, aux)


def _clip_and_sum(
  plan: LayerPlan,
  leaves: list[jax.Array],
  inputs: tuple[jax.Array, ...],
  out_grads: tuple[jax.Array, ...],
  rest_grads: tuple[jax.Array, ...],
  mask: jax.Array,
  l2_norm_clip: float,
) -> tuple[jax.Array, jax.Array, list[jax.Array]]:
  """Per-example norms, clip factors and the clipped sum's leaves from the recorded layer
  inputs and output gradients (and the vmap fallback's per-example gradients)."""
  b = mask.shape[0]
  calls, rest = plan.calls, plan.vmap_leaves
  sq_norms = jnp.zeros((b,), jnp.float32)
  rows: dict[int, _Kept] = {}
  bias_rows: dict[int, jax.Array] = {}  # (B, p) per-example bias gradients sum_t g_t
  vjp_grads: dict[tuple[int, ...], list[jax.Array]] = {}
  embeds: dict[int, tuple[jax.Array, jax.Array]] = {}  # (B, T) tokens, (B, T, d) gradients
  # The dense and conv norms run one layer after another, in call order, and only after the
  # backward pass: each layer's input is made to depend on the previous norm (the first on
  # the first layer's output gradient, the last the backward pass produces). Otherwise XLA
  # builds a layer's patches as soon as its input exists, during the forward pass, and
  # holds them, and every layer's at once, through the backward pass. The first layers
  # usually have the largest patches and the smallest per-example gradients, so call order
  # frees the most memory first. TF-Privacy CNN at batch 256: 37.0 -> 27.6 MiB of working
  # memory (non-private 14.4).
  # The calls of one layer (several if it is shared) are taken together, keyed by the first.
  groups: dict[tuple[int, ...], list[int]] = {}
  for k, c in enumerate(calls):
    groups.setdefault(c.leaf_ids, []).append(k)
  token: Any = out_grads
  for ks in groups.values():
    k, c = ks[0], calls[ks[0]]
    if c.rule in ("dense", "conv"):
      a_list = [after(token, inputs[j]) for j in ks]
      sq, rows[k] = _layer_sq_norm(c, a_list, [out_grads[j] for j in ks])
      token = sq
      if "bias" in c.names:
        bias_rows[k] = jnp.sum(rows[k].g_rows, axis=1)
        sq = sq + jnp.sum(jnp.square(bias_rows[k]), axis=1)
      sq_norms = sq_norms + sq
    elif c.rule == "embed":
      parts = [_embed_rows(inputs[j], out_grads[j]) for j in ks]
      tokens = jnp.concatenate([tk for tk, _ in parts], axis=1)
      g_rows = jnp.concatenate([gr for _, gr in parts], axis=1)
      embeds[k] = (tokens, g_rows)
      sq_norms = sq_norms + _embed_sq_norm(tokens, g_rows)
    else:
      own = {n: leaves[i] for n, i in zip(c.names, c.leaf_ids, strict=True)}
      if c.rule == "norm":
        shapes = {n: np.shape(x) for n, x in own.items()}
        grads = lambda j, shapes=shapes: _norm_grads(calls[j], inputs[j], out_grads[j], shapes)
      else:

        def one(a_i, g_i, module=c.module, own=own):
          _, vjp = jax.vjp(lambda p: module.apply({"params": p}, a_i), own)
          return vjp(g_i)[0]

        grads = lambda j, one=one: jax.vmap(one)(inputs[j], out_grads[j])
      # A shared layer's per-example gradient is the sum over its calls.
      per_call = [grads(j) for j in ks]
      vjp_grads[c.leaf_ids] = jax.tree_util.tree_map(lambda *xs: sum(xs[1:], xs[0]), *per_call)
  row_sq = lambda x: jnp.sum(jnp.square(x.astype(accumulation_dtype(x.dtype))).reshape(b, -1), 1)
  for per_ex in vjp_grads.values():
    sq_norms = sq_norms + sum(row_sq(x) for x in jax.tree_util.tree_leaves(per_ex))
  for g in rest_grads:
    sq_norms = sq_norms + row_sq(g)

  norms = jnp.sqrt(jnp.where(mask, sq_norms, 0.0))
  factors = clip_factors(norms, l2_norm_clip, mask)

  # The dense and conv sums multiply each row by its factor, and 0 * NaN is NaN: a real row
  # whose gradient holds a NaN or an inf (factor 0) must not enter any product (the rows
  # that are not ok; see below for how each kind of layer keeps them out).
  bad = nonfinite_rows(norms, mask)
  ok = mask & ~bad
  out: list[jax.Array | None] = [None] * len(leaves)
  for k in [k for k, kept in rows.items() if kept.how == "gram"]:
    for i, x in _gram_sum(calls[k], leaves, inputs[k], out_grads[k], factors, ok).items():
      out[i] = x
  # Layers whose sum is a product of the inputs and output gradients ("t1", "ghost"): those
  # arrays with the rows that are not ok set to 0, one select each, which XLA fuses into the
  # copies the sum's matmul makes anyway. In the cond below they cost more: XLA's CPU
  # backend laid out and copied them for both branches (working memory of the private step
  # at batch 256: MLP 3.70 -> 2.05 MiB, ViT 62.4 -> 49.6 MiB; steps 1.03x faster, one
  # process, under load).
  product = {k: kept for k, kept in rows.items() if kept.how in ("t1", "ghost")}
  if product:
    kept_ok = lambda x: jnp.where(ok.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0)
    product = {
      k: kept._replace(a_rows=kept_ok(kept.a_rows), g_rows=kept_ok(kept.g_rows))
      for k, kept in product.items()
    }
    bias_ok = {k: kept_ok(bias_rows[k]) for k in product if k in bias_rows}
    out_product = _sums_batched(calls, leaves, product, bias_ok, factors)
    for i, x in out_product.items():
      out[i] = x
  # Materialised per-example gradients: a select would be a pass over all of them (the
  # TF-Privacy CNN's step 1.04x slower), so their weighted sums are taken row by row, with
  # those rows skipped, in a cond whose other branch is the batched sum: only the branch
  # taken runs, and on finite batches it costs a test of B norms.
  stored = {k: kept for k, kept in rows.items() if kept.how == "materialize"}
  if stored:
    sums = (calls, leaves, stored, bias_rows, factors)
    layer_out = jax.lax.cond(
      jnp.any(bad), lambda: _sums_row_by_row(*sums, ok), lambda: _sums_batched(*sums)
    )
    for i, x in layer_out.items():
      out[i] = x
  for k, (tokens, g_rows) in embeds.items():
    (i,) = calls[k].leaf_ids
    out[i] = _embed_sum(tokens, g_rows, factors, ok, np.shape(leaves[i]))
  for leaf_ids, per_ex in vjp_grads.items():
    summed = tree_masked_weighted_sum(per_ex, factors)
    for n, i in zip(sorted(per_ex), leaf_ids, strict=True):
      out[i] = summed[n]
  for i, g in zip(rest, rest_grads, strict=True):
    out[i] = tree_masked_weighted_sum(g, factors)
  # Without a real row the copied row is a padding row itself: its sums are dropped.
  real = jnp.any(mask)
  out = [
    jnp.zeros(np.shape(leaf), accumulation_dtype(leaf.dtype))
    if o is None
    else jnp.where(real, o, 0).astype(accumulation_dtype(leaf.dtype))
    for o, leaf in zip(out, leaves, strict=True)
  ]
  return norms, factors, out
