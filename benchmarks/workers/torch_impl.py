"""Plain PyTorch (the non-private step) and the naive per-example loop (PyVacy style)."""

from __future__ import annotations

from collections.abc import Callable

from benchmarks.workers.common import L2_NORM_CLIP, NOISE_MULTIPLIER
from benchmarks.workers.torch_setup import TorchSetup


def nonprivate(s: TorchSetup) -> Callable[[int], None]:
  """One plain PyTorch SGD step on index batch ``k``."""

  def step(k: int) -> None:
    args, target = s.batch_at(k)
    s.optimizer.zero_grad(set_to_none=True)
    s.criterion(s.model(*args), target).backward()
    s.optimizer.step()

  return step


def loop(s: TorchSetup) -> Callable[[int], None]:
  """PyVacy: microbatches of one example, each gradient clipped, then summed and noised."""
  import torch

  params = [p for p in s.model.parameters() if p.requires_grad]
  sums = [torch.zeros_like(p) for p in params]

  def step(k: int) -> None:
    args, target = s.batch_at(k)
    for acc in sums:
      acc.zero_()
    for j in range(s.batch):
      s.optimizer.zero_grad(set_to_none=True)
      one = [a[j : j + 1] for a in args]
      s.criterion(s.model(*one), target[j : j + 1]).backward()
      torch.nn.utils.clip_grad_norm_(params, L2_NORM_CLIP)
      for acc, p in zip(sums, params, strict=True):
        acc.add_(p.grad)
    for acc, p in zip(sums, params, strict=True):
      noise = torch.randn_like(acc) * (NOISE_MULTIPLIER * L2_NORM_CLIP)
      p.grad = (acc + noise) / s.batch
    s.optimizer.step()

  return step
