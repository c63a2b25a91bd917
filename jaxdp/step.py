"""The one training step every jaxdp model uses, private or not.

``make_step(loss_fn, optimizer, privacy, expected_batch_size=...)`` returns a :class:`Step`.
Calling it runs, inside one ``jax.jit``:

    batch      = data[indices]                         (gathered on the device)
    G          = sum_i mask_i * clip_C(grad loss(params, x_i, rng_i))
    g          = (G + N(0, (sigma C)^2 I)) / B_expected
    params'    = optax update(g)

and with ``privacy=None`` the plain mean gradient over the real rows instead. One key in the
state is split every step into the per-example keys and the noise key, so noise is never
reused. The step compiles once per physical batch shape; a Poisson draw larger than the
physical batch is split over several physical batches whose clipped sums are accumulated
before the noise is added once (:meth:`Step.run`).

With a ``mesh`` (:func:`jaxdp.parallel.data_mesh`) the rows of each physical batch are split
over its devices: each device gathers and clips its own rows, one all-reduce adds the
clipped sums, and the noise is drawn once, after it, from the step's one noise key; the
state stays replicated, identical on every device (:mod:`jaxdp.parallel`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from jaxdp import _cpu_flags, parallel
from jaxdp.clipping._common import ClippedSum, PerExampleLoss, stack_rngs
from jaxdp.grad import (  # noqa: F401  (re-exported: the step's settings live with the mechanism)
  AUTO_MICROBATCH,
  ENGINES,
  MAX_AUTO_MICROBATCHES,
  DPConfig,
  PrivateGradient,
  check_microbatch_size,
  microbatch_rows,
  parse_microbatch_size,
)
from jaxdp.keys import secure_key
from jaxdp.parallel import DATA_AXIS

PyTree = Any


class TrainState(NamedTuple):
  """Explicit training state: step count, params, optimiser state and the PRNG key."""

  step: jax.Array
  params: PyTree
  opt_state: optax.OptState
  rng: jax.Array


def init_state(
  params: PyTree, optimizer: optax.GradientTransformation, rng: jax.Array | None = None
) -> TrainState:
  """A fresh :class:`TrainState`.

  ``rng`` seeds every per-example key and all the noise of the steps, so it must be secret:
  None (the default) draws one from the OS (:func:`jaxdp.keys.secure_key`). Pass a key of
  your own only for tests or debugging; a key derived from a released seed makes the noise
  public.
  """
  rng = secure_key() if rng is None else rng
  return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), rng)


def _gather(data: PyTree, indices: jax.Array, rows: PyTree = None) -> PyTree:
  """The batch ``data[indices]``, with the per-row side inputs ``rows`` merged in."""
  batch = jax.tree_util.tree_map(lambda x: jnp.take(x, indices, axis=0), data)
  if rows is None:
    return batch
  if not (isinstance(batch, dict) and isinstance(rows, dict)):
    raise ValueError("rows needs data and rows to be dicts (their keys are merged)")
  clash = sorted(set(batch) & set(rows))
  if clash:
    raise ValueError(f"rows must not reuse the data's keys, got {clash}")
  return {**batch, **rows}


class _Jit:
  """``jax.jit(fn)``, compiled with XLA ``options`` if its program has batched dots.

  The choice is made once, from the first call's traced program (the trace is cached and
  reused by the compilation, so choosing costs nothing): the options speed up per-example
  products and slow down plain ones (:func:`jaxdp._cpu_flags.has_batched_dot`).
  """

  def __init__(self, fn: Any, options: dict[str, str] | None) -> None:
    self._fn, self._options = fn, options
    self._plain = jax.jit(fn)
    self._chosen = None if options else self._plain

  @property
  def compiler_options(self) -> dict[str, str] | None:
    """The options in use; None before the first call or when none apply."""
    return None if self._chosen in (None, self._plain) else self._options

  def _pick(self, *args: Any) -> Any:
    if self._chosen is None:
      batched = _cpu_flags.has_batched_dot(self._plain.trace(*args).jaxpr)
      self._chosen = jax.jit(self._fn, compiler_options=self._options) if batched else self._plain
    return self._chosen

  def __call__(self, *args: Any) -> Any:
    return self._pick(*args)(*args)

  def lower(self, *args: Any) -> jax.stages.Lowered:
    return self._pick(*args).lower(*args)


class Step(PrivateGradient):
  """A jitted DP (or plain) training step; build it with :func:`make_step`.

  A :class:`jaxdp.grad.PrivateGradient` (the clipping and the noise, one path with
  :func:`jaxdp.grad.private_grad`) with an optimiser, a device mesh and gradient
  accumulation over physical batches around it.
  """

  def __init__(
    self,
    loss_fn: PerExampleLoss,
    optimizer: optax.GradientTransformation,
    privacy: DPConfig | None,
    expected_batch_size: float | None,
    has_aux: bool,
    microbatch_size: int | str | None = "auto",
    mesh: jax.sharding.Mesh | None = None,
  ) -> None:
    if mesh is not None and DATA_AXIS not in mesh.shape:
      raise ValueError(f"mesh must have an axis named {DATA_AXIS!r}, got axes {mesh.axis_names}")
    super().__init__(loss_fn, privacy, expected_batch_size, has_aux, microbatch_size)
    self.mesh = mesh
    self.optimizer = optimizer
    self.trace_count = 0  # how many times the fused step was traced (compiled)
    # The private step's per-example dots run faster through oneDNN on the CPU (see
    # jaxdp/_cpu_flags.py). Only the fast engine's: the non-private step is left to XLA's
    # defaults, and so is the reference engine's (also where "auto" resolves to it): with
    # the option the WGAN-GP critic's step (a gradient of the penalty's gradient) corrupted
    # the heap (jaxlib 0.10.2: "malloc(): unaligned tcache chunk", a segfault or a hang).
    options = _cpu_flags.private_step_options() if self.engine == "fast" else None
    self._fused = _Jit(self._fused_impl, options)
    self._chunk = _Jit(self._chunk_impl, options)
    self._finish = _Jit(self._finish_impl, options)

  @property
  def num_devices(self) -> int:
    """How many devices the rows of a physical batch are split over (1 without a mesh)."""
    return parallel.row_multiple(self.mesh)

  def place(self, tree: PyTree) -> PyTree:
    """``tree`` (a state, the dataset) replicated on the step's mesh; as is without one."""
    return parallel.replicate(tree, self.mesh)

  # -- pieces ---------------------------------------------------------------------------

  def _all_reduce(self, tree: PyTree) -> PyTree:
    """The sum over the mesh's devices of each device's ``tree`` (inside ``shard_map``).

    The leaves travel as one flat vector: one all-reduce per step, not one per leaf.
    """
    flat, unravel = ravel_pytree(tree)
    return unravel(jax.lax.psum(flat, DATA_AXIS))

  def _batch_sum(self, params, data, indices, mask, rng, rows=None) -> ClippedSum:
    """:meth:`clipped_sum` of the batch ``data[indices]``, its rows split over the mesh.

    Row i gets the key it has on one device, ``split(rng, P)[i]``; each device clips its
    rows and the clipped sums meet in one all-reduce. Norms, factors, losses and aux come
    back in row order, sharded like the rows.
    """
    mask = jnp.asarray(mask).astype(bool)
    if self.mesh is None:
      return self.clipped_sum(params, _gather(data, indices, rows), mask, rng)
    split = jax.sharding.PartitionSpec(DATA_AXIS)
    whole = jax.sharding.PartitionSpec()

    def local(params, data, indices, mask, rngs, rows):
      cs = self._clipped_rows(params, _gather(data, indices, rows), mask, rngs)
      return cs._replace(sum_of_clipped_grads=self._all_reduce(cs.sum_of_clipped_grads))

    sharded = jax.shard_map(
      local,
      mesh=self.mesh,
      in_specs=(whole, whole, split, split, split, split),
      out_specs=ClippedSum(whole, split, split, split, split),
      # The engines' loops carry replicated params beside per-device rows, which the
      # varying-axis type check rejects; the one cross-device op is the psum above.
      check_vma=False,
    )
    return sharded(params, data, indices, mask, stack_rngs(rng, mask.shape[0]), rows)

  def _update(self, state: TrainState, summed: PyTree, n_real: jax.Array, noise_key: jax.Array):
    grads = self.noised_gradient(summed, n_real, noise_key, state.params)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return params, opt_state

  def _fused_impl(self, state, data, indices, mask, rows=None):
    self.trace_count += 1
    rng, example_key, noise_key = self.split_key(state.rng)
    mask = jnp.asarray(mask).astype(bool)
    cs = self._batch_sum(
      state.params, data, indices, mask, jax.random.fold_in(example_key, 0), rows
    )
    params, opt_state = self._update(state, cs.sum_of_clipped_grads, jnp.sum(mask), noise_key)
    return TrainState(state.step + 1, params, opt_state, rng), self.batch_info(cs, mask)

  def _chunk_impl(self, state, data, indices, mask, chunk, rows=None):
    _, example_key, _ = self.split_key(state.rng)
    mask = jnp.asarray(mask).astype(bool)
    cs = self._batch_sum(
      state.params, data, indices, mask, jax.random.fold_in(example_key, chunk), rows
    )
    return cs.sum_of_clipped_grads, self.batch_info(cs, mask)

  def _finish_impl(self, state, summed, n_real):
    rng, _, noise_key = self.split_key(state.rng)
    params, opt_state = self._update(state, summed, n_real, noise_key)
    return TrainState(state.step + 1, params, opt_state, rng)

  # -- public calls ---------------------------------------------------------------------

  def __call__(
    self,
    state: TrainState,
    data: PyTree,
    indices: jax.Array,
    mask: jax.Array,
    rows: dict[str, jax.Array] | None = None,
  ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One step on one physical batch ``data[indices]`` with padding ``mask``.

    Args:
      state: the :class:`TrainState`.
      data: pytree of arrays with a leading example axis (the whole dataset, on the device).
      indices: (P,) int indices into ``data``; padding rows may hold any valid index.
      mask: (P,) bool, False on padding rows.
      rows: per-row side inputs of this batch (arrays with a leading axis of P), merged into
        each example's dict (e.g. a GAN critic's generated half of each pair). What a row's
        side input holds enters only that row's clipped gradient.

    Returns:
      ``(new_state, metrics)``; metrics hold loss, batch_size and, if private,
      grad_norm_mean, grad_norm_median, clip_fraction, nonfinite_fraction and the (P,)
      grad_norms (padding rows 0) (and ``aux`` with has_aux). All are statistics of the
      private batch without noise: diagnostics, never to be released.
    """
    self._check_rows(indices)
    return self._fused(*self._placed(state, data), *self._split_rows(indices, mask, rows))

  def _check_rows(self, indices: Any) -> None:
    parallel.check_rows(int(np.shape(indices)[0]), self.mesh)

  def _placed(self, state: TrainState, data: PyTree) -> tuple[TrainState, PyTree]:
    if self.mesh is None:
      return state, data
    return self.place(state), self.place(data)

  def _split_rows(self, indices: Any, mask: Any, rows: Any = None) -> tuple[Any, Any, Any]:
    """A batch's indices, mask and side inputs split over the mesh (wherever they were)."""
    if self.mesh is None:
      return indices, mask, rows
    return parallel.shard_rows((indices, mask, rows), self.mesh)

  def lower(
    self, state: TrainState, data: PyTree, indices: jax.Array, mask: jax.Array
  ) -> jax.stages.Lowered:
    """The lowered fused step (e.g. ``.compile().memory_analysis()``); cached with the step."""
    self._check_rows(indices)
    return self._fused.lower(*self._placed(state, data), *self._split_rows(indices, mask))

  def run(
    self,
    state: TrainState,
    data: PyTree,
    batches: Sequence[tuple[np.ndarray, np.ndarray]],
    rows: Sequence[dict[str, jax.Array]] | None = None,
  ) -> tuple[TrainState, dict[str, Any]]:
    """One logical step over one or more physical batches (gradient accumulation).

    The clipped sums of all physical batches are added before the noise is drawn once,
    so the step is the same mechanism as one big batch and is accounted as one step.
    Metrics are weighted by each batch's real rows; with ``has_aux`` the per-example aux of
    all physical batches comes concatenated in batch order (padding rows included, their
    values unspecified). ``rows``: one dict of side inputs per physical batch (see
    :meth:`__call__`).
    """
    if rows is not None and len(rows) != len(batches):
      raise ValueError(f"rows must hold one entry per physical batch ({len(batches)})")
    if len(batches) == 1:
      return self(state, data, *batches[0], rows=None if rows is None else rows[0])
    for indices, _ in batches:
      self._check_rows(indices)
    state, data = self._placed(state, data)
    summed, stats = None, []
    for chunk, (indices, mask) in enumerate(batches):
      idx, msk, side = self._split_rows(indices, mask, None if rows is None else rows[chunk])
      part, st = self._chunk(state, data, idx, msk, chunk, side)
      summed = part if summed is None else jax.tree_util.tree_map(jnp.add, summed, part)
      stats.append(st)
    # Everything stays on the device: no host sync between the physical batches.
    w = jnp.stack([jnp.asarray(st["batch_size"], jnp.float32) for st in stats])
    n_real = jnp.sum(w)
    new_state = self._finish(state, summed, n_real)
    metrics: dict[str, Any] = {"batch_size": n_real}
    for k in stats[0]:
      if k not in ("batch_size", "aux", "grad_norms"):
        values = jnp.stack([jnp.asarray(st[k], jnp.float32) for st in stats])
        metrics[k] = jnp.sum(values * w) / jnp.maximum(n_real, 1.0)
    # Per-row values in the order of the physical batches, padding rows included.
    cat = lambda *xs: jnp.concatenate(xs, axis=0)
    if "grad_norms" in stats[0]:
      metrics["grad_norms"] = cat(*[st["grad_norms"] for st in stats])
    if self.has_aux:
      metrics["aux"] = jax.tree_util.tree_map(cat, *[st["aux"] for st in stats])
    return new_state, metrics


def make_step(
  loss_fn: PerExampleLoss,
  optimizer: optax.GradientTransformation,
  privacy: DPConfig | None,
  *,
  expected_batch_size: float | None = None,
  has_aux: bool = False,
  microbatch_size: int | str | None = "auto",
  mesh: jax.sharding.Mesh | None = None,
) -> Step:
  """Builds the one jitted training step.

  Args:
    loss_fn: ``loss_fn(params, example, rng) -> loss`` (or ``(loss, aux)``) for ONE
      example. It must not couple examples (no BatchNorm, no batch means).
    optimizer: any optax transformation (SGD, momentum, Adam, ...).
    privacy: a :class:`DPConfig`, or None for the non-private step (same code path, no
      clipping and no noise; the gradient is the mean over the real rows).
    expected_batch_size: the public normaliser of the noisy sum: q*N for Poisson sampling,
      the fixed batch size for fixed batches. Required when private.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; aux is returned per example.
    microbatch_size: rows per sequential microbatch inside one jitted step (same numbers,
      the working memory of one microbatch), None for none, or "auto":
      ``AUTO_MICROBATCH[backend]`` rows (256 on CPU, where it also runs faster; no split
      elsewhere), in at most ``MAX_AUTO_MICROBATCHES`` microbatches (of each device's rows).
    mesh: a device mesh with a ``"data"`` axis (:func:`jaxdp.parallel.data_mesh`) to split
      each physical batch's rows over (their number must be a multiple of its size), or None
      for one device. The state and the data are replicated on it
      (:meth:`Step.place`); the results equal one device's up to float summation order.

  Returns:
    A :class:`Step`: ``step(state, data, indices, mask)`` or ``step.run(state, data, batches)``.

  Formal guarantees:
    The update of a private step depends on the batch only through the clipped sum, whose
    sensitivity to adding or removing one example is ``l2_norm_clip``; the noise has std
    ``noise_multiplier * l2_norm_clip`` on every coordinate and a fresh key every step, and
    is added once per logical step whatever the number of devices or physical batches.

  Example:
    >>> step = make_step(loss_fn, optax.sgd(0.1), DPConfig(l2_norm_clip=1.0,
    ...                  noise_multiplier=1.1), expected_batch_size=256)  # doctest: +SKIP
  """
  return Step(loss_fn, optimizer, privacy, expected_batch_size, has_aux, microbatch_size, mesh)
