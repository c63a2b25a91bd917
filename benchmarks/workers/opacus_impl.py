"""Opacus's ``PrivacyEngine`` in each ``grad_sample_mode``: hooks, functorch, ew, ghost."""

from __future__ import annotations

from collections.abc import Callable

from benchmarks.workers.common import L2_NORM_CLIP, NOISE_MULTIPLIER, UnavailableError, first_line
from benchmarks.workers.torch_setup import TorchSetup


def build(s: TorchSetup, impl: str) -> tuple[Callable[[int], None], Callable]:
  """``(step, unsupported)`` of ``opacus_<mode>``; ``unsupported`` maps the first step's
  exception to a skip reason when the mode cannot run this model."""
  import opacus
  from opacus import PrivacyEngine
  from torch.utils.data import DataLoader, TensorDataset

  s.info["opacus"] = opacus.__version__
  mode = impl.removeprefix("opacus_")
  # make_private needs a loader for the sampling rate (batch / N, so the optimiser's
  # expected batch size is `batch`); the timed step never iterates it.
  loader = DataLoader(TensorDataset(s.x, s.y), batch_size=s.batch)
  engine = PrivacyEngine()
  try:
    out = engine.make_private(
      module=s.model,
      optimizer=s.optimizer,
      criterion=s.criterion,
      data_loader=loader,
      noise_multiplier=NOISE_MULTIPLIER,
      max_grad_norm=L2_NORM_CLIP,
      grad_sample_mode=mode,
    )
  except NotImplementedError as e:
    raise UnavailableError(
      f"opacus grad_sample_mode={mode} does not support {s.model_name}: {e}"
    ) from e
  criterion = s.criterion
  if mode == "ghost":  # ghost clipping wraps the criterion: loss.backward() runs both passes
    model, optimizer, criterion, _ = out
  else:
    model, optimizer, _ = out

  def step(k: int) -> None:
    args, target = s.batch_at(k)
    optimizer.zero_grad(set_to_none=True)
    loss = criterion(model(*args), target)
    loss.backward()
    optimizer.step()

  def unsupported(e: Exception) -> str | None:
    # e.g. mode "ew" on a conv net below batch 32: PyTorch's ExpandedWeights grouped-conv
    # path calls .view() on a non-contiguous grad_output and raises.
    if isinstance(e, (RuntimeError, NotImplementedError)):
      return f"opacus grad_sample_mode={mode} fails on {s.model_name} at batch {s.batch}: " + (
        first_line(e)
      )
    return None

  return step, unsupported
