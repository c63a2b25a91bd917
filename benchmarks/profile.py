"""Where a model's step time goes: ``python -m benchmarks.profile --model scatter_cnn``.

Three views of jaxdp's private and non-private steps of one benchmark model, in one process:

1. the whole step (median wall time of interleaved rounds, private / non-private ratio);
2. each parameterised layer alone at the step's batch (the fast engine's plan finds them):
   forward, gradient with respect to the input, gradient with respect to its parameters,
   each jitted on its own. XLA runs convolutions in library calls (oneDNN / Eigen) on their
   own threads, which its profiler does not trace, so this is how their cost is seen;
3. the traced XLA operations of each step (``jax.profiler``: thread time per fused op, summed
   over threads), labelled with the layer and primitive their HLO metadata names.

The benchmark's data and parameters (``benchmarks.workers.jax_setup``), jaxdp's CPU settings,
SGD with momentum. Numbers are for reading side by side in one run, not for the tables.
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jaxdp  # noqa: F401  (its CPU settings act before JAX starts)

# isort: split
import jax
import numpy as np
import optax

from benchmarks.workers.jax_setup import setup
from jaxdp import DPConfig, init_state, make_step
from jaxdp.clipping import fast

MODELS = ("tf_cnn", "scatter_cnn", "mlp", "vae", "vit", "critic", "dp_cnn")


def median_ms(fn: Callable[..., Any], *args: Any, rounds: int) -> float:
  """Median wall time of ``fn(*args)`` (blocking on its result) over ``rounds`` calls, ms."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(rounds):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return 1e3 * float(np.median(times))


def build_steps(s: Any, batch: int) -> dict[str, tuple[Any, Any]]:
  """``{"private": (step, state), "non-private": (step, state)}`` of the setup's model."""
  opt = optax.sgd(0.1, momentum=0.9)
  out = {}
  for name, privacy in (
    ("private", DPConfig(l2_norm_clip=1.0, noise_multiplier=1.0)),
    ("non-private", None),
  ):
    step = make_step(s.per_example_loss, opt, privacy, expected_batch_size=batch, has_aux=True)
    out[name] = (step, init_state(s.params, opt, jax.random.key(1)))
  return out


def layer_times(s: Any, batch: int, rounds: int) -> list[tuple[str, str, float, float, float]]:
  """``(layer, rule, forward, input grad, param grad)`` ms of each recorded layer call alone,
  on random inputs of the shape it sees in the model, at ``batch`` rows."""
  example = {k: v[0] for k, v in s.data.items()}
  plan = fast.discover(s.per_example_loss, s.params, example, jax.random.key(0), True)
  leaves = jax.tree_util.tree_leaves(s.params)
  rows = []
  key = jax.random.key(2)
  for i, call in enumerate(plan.calls):
    own = {n: leaves[j] for n, j in zip(call.names, call.leaf_ids, strict=True)}
    x = jax.random.normal(jax.random.fold_in(key, i), (batch, *call.in_shape))
    if not np.issubdtype(np.dtype(call.out_dtype), np.floating):
      continue
    g = jax.random.normal(jax.random.fold_in(key, i + 1000), (batch, *call.out_shape))
    module = call.module
    apply = lambda p, x, m=module: m.apply({"params": p}, x)
    if call.rule == "embed":  # integer inputs: no input gradient
      x = jax.random.randint(key, (batch, *call.in_shape), 0, own["embedding"].shape[0])
    fwd = jax.jit(apply)
    d_in = jax.jit(lambda p, x, g, f=apply: jax.vjp(lambda x: f(p, x), x)[1](g)[0])
    d_par = jax.jit(lambda p, x, g, f=apply: jax.vjp(lambda p: f(p, x), p)[1](g)[0])
    t_in = float("nan") if call.rule == "embed" else median_ms(d_in, own, x, g, rounds=rounds)
    rows.append(
      (
        f"{i}: {type(module).__name__} {tuple(call.in_shape)}->{tuple(call.out_shape)}",
        call.rule,
        median_ms(fwd, own, x, rounds=rounds),
        t_in,
        median_ms(d_par, own, x, g, rounds=rounds),
      )
    )
  return rows


_META = re.compile(r"%([\w.\-]+) = [^\n]*?metadata=\{op_name=\"([^\"]+)\"")
_LAYER = re.compile(r"([A-Za-z]+_\d+)")


def op_labels(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> "layer primitive" (``bwd`` for the backward pass)."""
  out = {}
  for name, op in _META.findall(hlo_text):
    parts = op.split("/")
    layers = [p for p in parts if _LAYER.fullmatch(p)]
    where = layers[-1] if layers else "/".join(parts[-3:-1])
    out[name] = f"{'bwd ' if 'transpose(' in op else ''}{where} {parts[-1]}"
  return out


def traced_ops(step: Any, state: Any, s: Any, steps: int) -> tuple[float, list[tuple[str, float]]]:
  """Traced XLA op thread time per step (total, and by op with its label), in ms."""
  idx, mask = s.indices[0], s.mask
  labels = op_labels(step.lower(state, s.data, idx, mask).compile().as_text())
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for _ in range(steps):
        state, _ = step(state, s.data, idx, mask)
      jax.block_until_ready(state)
    data = jax.profiler.ProfileData.from_file(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
    ops: collections.Counter = collections.Counter()
    for plane in data.planes:
      for line in plane.lines:
        if line.name == "python":
          continue
        for ev in line.events:
          if ev.name in labels:  # the step's own HLO ops (not compilation, not dispatch)
            ops[ev.name] += ev.duration_ns
  total = sum(ops.values()) / 1e6 / steps
  named = [(f"{k} [{labels[k]}]", v / 1e6 / steps) for k, v in ops.most_common()]
  return total, named


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="scatter_cnn", choices=MODELS)
  ap.add_argument("--batch", type=int, default=1024)
  ap.add_argument("--rounds", type=int, default=15, help="timed calls per median")
  ap.add_argument("--top", type=int, default=12, help="traced ops shown per step")
  args = ap.parse_args(argv)
  s = setup(args.model, args.batch, "cpu")
  steps = build_steps(s, args.batch)
  idx, mask = s.indices[0], s.mask
  times: dict[str, list[float]] = {k: [] for k in steps}
  for _ in range(3):  # interleaved, so that drift hits both alike
    for name, (step, state) in steps.items():
      times[name].append(median_ms(step, state, s.data, idx, mask, rounds=5))
  med = {k: float(np.median(v)) for k, v in times.items()}
  print(f"{args.model}, batch {args.batch}: step private {med['private']:.1f} ms, non-private "
        f"{med['non-private']:.1f} ms (private / non-private speed "
        f"{med['non-private'] / med['private']:.2f}x)")  # fmt: skip
  print("\nlayers alone (ms): forward, input grad, param grad  [fast-engine rule]")
  for label, rule, f, di, dp in layer_times(s, args.batch, args.rounds):
    print(f"  {label:<48} {f:7.2f} {di:7.2f} {dp:7.2f}  [{rule}]")
  for name, (step, state) in steps.items():
    total, ops = traced_ops(step, state, s, 10)
    print(f"\n{name}: traced XLA ops {total:.1f} ms thread time per step (library convolutions "
          "not included); the largest:")  # fmt: skip
    for label, ms in ops[: args.top]:
      print(f"  {ms:7.2f}  {label}")


if __name__ == "__main__":
  main()
