"""``python -m benchmarks.workers``: one configuration, measured in this process."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from benchmarks.workers.common import IMPLS, MODELS, RESULT_PREFIX
from benchmarks.workers.measure import run
from benchmarks.workers.mirror import check_models


def _positive_int(flag: str) -> Callable[[str], int]:
  def parse(text: str) -> int:
    value = int(text)
    if value < 1:
      raise argparse.ArgumentTypeError(f"{flag} must be an integer >= 1, got {text}")
    return value

  return parse


def parser() -> argparse.ArgumentParser:
  """The worker's command line."""
  p = argparse.ArgumentParser(
    prog="python -m benchmarks.workers", description=__doc__.split("\n")[0]
  )
  p.add_argument("--impl", choices=IMPLS)
  p.add_argument("--model", choices=MODELS, default="tf_cnn")
  p.add_argument("--batch", type=_positive_int("--batch"), default=256)
  p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
  p.add_argument("--rounds", type=_positive_int("--rounds"), default=5)
  p.add_argument("--warmup", type=_positive_int("--warmup"), default=3, help="steps, incl. compile")
  p.add_argument("--round-seconds", type=float, default=1.0, help="target duration of a round")
  p.add_argument("--min-steps", type=_positive_int("--min-steps"), default=2)
  p.add_argument("--max-steps", type=_positive_int("--max-steps"), default=10_000)
  p.add_argument(
    "--devices", type=_positive_int("--devices"), default=1, help="jaxdp: devices of the mesh"
  )
  p.add_argument(
    "--logical",
    type=_positive_int("--logical"),
    help="jaxdp: examples per logical step, in physical batches of --batch (a multiple of it)",
  )
  p.add_argument("--xla-memory", action="store_true", help="JAX: also report XLA's buffer plan")
  p.add_argument("--check-models", action="store_true", help="compare torch and flax models")
  return p


def main(argv: list[str] | None = None) -> int:
  """Runs one configuration and prints ``BENCH_RESULT {json}``."""
  args = parser().parse_args(argv)
  if args.check_models:
    result = check_models()
  elif args.impl is None:
    parser().error("--impl is required (one of " + ", ".join(IMPLS) + ")")
  else:
    if args.round_seconds <= 0:
      parser().error(f"--round-seconds must be > 0, got {args.round_seconds}")
    if (args.devices > 1 or args.logical) and not args.impl.startswith("jaxdp_"):
      parser().error("--devices and --logical apply to the jaxdp implementations only")
    if args.logical and args.logical % args.batch:
      parser().error(f"--logical must be a multiple of --batch, got {args.logical}")
    result = run(args)
  print(RESULT_PREFIX + json.dumps(result), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
