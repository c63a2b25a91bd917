"""Matplotlib figures for run folders: training curves, epsilon, privacy-utility trade-offs.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas (no pyplot, no
display, no global state), written as PNG, and the path is returned. The inputs are plain
data: a training history is a sequence of per-epoch dicts as :func:`jaxdp.train.train`
returns (``epoch``, ``train_loss``, ``test_accuracy``, ``epsilon`` ...).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter

__all__ = [
  "class_grid",
  "plot_curves",
  "plot_epsilon",
  "plot_image_grids",
  "plot_member_losses",
  "plot_privacy_utility",
  "plot_roc",
  "plot_series",
  "save_figure",
]

History = Sequence[Mapping[str, float]]
_LABELS = {"accuracy": "accuracy", "loss": "loss", "epsilon": "epsilon"}


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> Path:
  """Writes ``fig`` as PNG to ``path`` (creating its folder) and returns the path."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  FigureCanvasAgg(fig)
  fig.savefig(path, dpi=120, bbox_inches="tight")
  return path


def _series(history: History, key: str, x: str) -> tuple[list[float], list[float]]:
  """(xs, ys) of the entries that hold ``key``."""
  pts = [(h[x], h[key]) for h in history if key in h and h[key] is not None]
  return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(
  runs: Mapping[str, History],
  path: str | os.PathLike[str],
  *,
  metrics: Sequence[str] = ("accuracy", "loss"),
  splits: Sequence[str] = ("train", "test"),
  x: str = "epoch",
) -> Path:
  """Side-by-side learning curves: one column per run, one row per metric.

  Each panel plots ``<split>_<metric>`` against ``x`` for every split the history holds
  (e.g. train and test accuracy), as the TF-Privacy tutorial compares its non-private and
  private models. Rows share their y axis so the columns compare at a glance.

  Args:
    runs: column title -> per-epoch history, e.g. ``{"non-private": h0, "DP (eps=3)": h1}``.
    path: PNG file to write.
    metrics: the rows, e.g. ``("accuracy", "loss")``.
    splits: the curves in each panel, e.g. ``("train", "validation")``.
    x: the history key of the horizontal axis.

  Returns:
    The path written.
  """
  if not runs:
    raise ValueError("runs must hold at least one history")
  cols, rows = len(runs), len(metrics)
  fig = Figure(figsize=(4.2 * cols, 3.2 * rows))
  axes = fig.subplots(rows, cols, squeeze=False, sharey="row")
  for c, (title, history) in enumerate(runs.items()):
    for r, metric in enumerate(metrics):
      ax = axes[r][c]
      for split in splits:
        xs, ys = _series(history, f"{split}_{metric}", x)
        if xs:
          ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=split)
      ax.grid(alpha=0.3)
      ax.xaxis.set_major_locator(MaxNLocator(integer=True))
      if r == 0:
        ax.set_title(title)
      if r == rows - 1:
        ax.set_xlabel(x)
      if c == 0:
        ax.set_ylabel(_LABELS.get(metric, metric))
      if ax.lines:
        ax.legend(loc="best", fontsize="small")
  fig.tight_layout()
  return save_figure(fig, path)


def plot_epsilon(
  runs: Mapping[str, History],
  path: str | os.PathLike[str],
  *,
  keys: Sequence[str] = ("epsilon",),
  x: str = "epoch",
  delta: float | None = None,
) -> Path:
  """Epsilon spent so far against ``x`` (epochs): one line per run and key.

  Args:
    runs: label -> per-epoch history holding one or more of ``keys``.
    path: PNG file to write.
    keys: the history keys to draw, e.g. ``("epsilon_pld", "epsilon_rdp")``; with several
      keys each line is labelled ``"<run> (<key suffix>)"``.
    x: the history key of the horizontal axis.
    delta: shown in the axis label when given.

  Returns:
    The path written.
  """
  fig = Figure(figsize=(5, 3.5))
  ax = fig.subplots()
  for i, (label, history) in enumerate(runs.items()):
    for key in keys:
      xs, ys = _series(history, key, x)
      if xs:
        suffix = key.rsplit("_", 1)[-1].upper() if "_" in key else key
        ax.plot(
          xs,
          ys,
          color=f"C{i % 10}",
          label=label if len(keys) == 1 else f"{label} ({suffix})",
          linestyle="-" if key == keys[0] else "--",
          marker="o" if len(xs) < min(len(history), 15) else None,
        )
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_xlabel(x)
  ax.set_ylabel("epsilon" if delta is None else f"epsilon (delta = {delta:g})")
  ax.set_ylim(bottom=0)
  ax.grid(alpha=0.3)
  if len(ax.lines) > 1:
    ax.legend(loc="best", fontsize="small")
  fig.tight_layout()
  return save_figure(fig, path)


def plot_privacy_utility(
  epsilons: Sequence[float],
  utilities: Sequence[float],
  path: str | os.PathLike[str],
  *,
  baseline: float | None = None,
  ylabel: str = "test accuracy",
  baseline_label: str = "non-private",
  title: str | None = None,
) -> Path:
  """Utility against epsilon (log x axis), with the non-private utility as a line.

  Args:
    epsilons: the epsilon of each private run (finite, > 0).
    utilities: the utility of each run (e.g. test accuracy), same length.
    path: PNG file to write.
    baseline: the non-private utility, drawn as a horizontal dashed line.
    ylabel: the y axis label.
    baseline_label: legend label of the baseline.
    title: figure title.

  Returns:
    The path written.
  """
  if len(epsilons) != len(utilities):
    raise ValueError(
      f"epsilons and utilities must have the same length, got {len(epsilons)} and {len(utilities)}"
    )
  pts = sorted(zip(epsilons, utilities, strict=True))
  fig = Figure(figsize=(5, 3.5))
  ax = fig.subplots()
  if pts:
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label="DP-SGD")
    for e, u in pts:
      ax.annotate(
        f"{u:.4g}", (e, u), textcoords="offset points", xytext=(0, 6), ha="center", fontsize="small"
      )
  if baseline is not None and math.isfinite(baseline):
    ax.axhline(baseline, color="grey", linestyle="--", label=f"{baseline_label} ({baseline:.4g})")
  ax.set_xscale("log")
  ax.set_xlabel("epsilon")
  ax.set_ylabel(ylabel)
  if pts:
    ax.set_xticks([p[0] for p in pts], [f"{p[0]:.3g}" for p in pts])
    ax.xaxis.set_minor_formatter(NullFormatter())
  ax.grid(alpha=0.3, which="both")
  ax.legend(loc="lower right", fontsize="small")
  if title:
    ax.set_title(title)
  fig.tight_layout()
  return save_figure(fig, path)


def plot_series(
  series: Mapping[str, Sequence[tuple[float | str, float, float]]],
  path: str | os.PathLike[str],
  *,
  xlabel: str,
  ylabel: str,
  logx: bool = False,
  title: str | None = None,
) -> Path:
  """A study's lines: one per label, the mean at each x with a +- std error bar.

  Args:
    series: label -> ``[(x, mean, std), ...]``; x numbers (sorted; a log axis with ``logx``)
      or names (a categorical axis, in first-seen order). NaN means are left out.
    path: PNG file to write.
    xlabel, ylabel: the axis labels.
    logx: a log x axis (numeric x only).
    title: figure title.

  Returns:
    The path written.
  """
  names: list[str] = []
  for points in series.values():
    names += [str(x) for x, *_ in points if isinstance(x, str) and str(x) not in names]
  fig = Figure(figsize=(5.5, 3.8))
  ax = fig.subplots()
  for label, points in series.items():
    pts = [(x, m, sd) for x, m, sd in points if m is not None and math.isfinite(m)]
    if not pts:
      continue
    if not names:
      pts.sort(key=lambda p: float(p[0]))
    xs = [names.index(str(p[0])) if names else float(p[0]) for p in pts]
    ax.errorbar(xs, [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                label=label)  # fmt: skip
  if names:
    ax.set_xticks(range(len(names)), names)
  elif logx:
    ax.set_xscale("log")
    ticks = sorted({float(x) for pts in series.values() for x, *_ in pts})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  if len(ax.lines) or ax.containers:
    ax.legend(loc="best", fontsize="small")
  if title:
    ax.set_title(title, fontsize="medium")
  fig.tight_layout()
  return save_figure(fig, path)


def plot_member_losses(
  losses: Mapping[str, tuple[np.ndarray, np.ndarray]],
  path: str | os.PathLike[str],
  *,
  title: str | None = None,
) -> Path:
  """Per-example loss histograms of members (trained on) and non-members, one panel per
  model: the gap between the two is what a loss-threshold attack exploits.

  Args:
    losses: ``{model: (member_losses, nonmember_losses)}``.
    path: PNG file to write.
    title: figure title.

  Returns:
    The path written.
  """
  fig = Figure(figsize=(4.2 * len(losses), 3.2))
  axes = fig.subplots(1, len(losses), squeeze=False)[0]
  for ax, (name, (inside, outside)) in zip(axes, losses.items(), strict=True):
    both = np.log10(np.maximum(np.concatenate([inside, outside]), 1e-8))
    bins = np.linspace(both.min(), both.max(), 50)
    for values, label in ((inside, "members"), (outside, "non-members")):
      ax.hist(np.log10(np.maximum(values, 1e-8)), bins=bins, alpha=0.55, label=label, density=True)
    ax.set_title(name, fontsize="small")
    ax.set_xlabel("log10 loss")
    ax.legend(fontsize="small")
  if title:
    fig.suptitle(title, fontsize="medium")
  fig.tight_layout()
  return save_figure(fig, path)


def plot_roc(
  curves: dict[str, tuple[Sequence[float], Sequence[float]]],
  path: str | os.PathLike[str],
  *,
  title: str | None = None,
) -> Path:
  """Membership-inference ROC curves on log-log axes (the low false-positive region is the
  one that matters, Carlini et al. 2022), with the chance diagonal.

  Args:
    curves: ``{label: (fpr, tpr)}``.
    path: PNG file to write.
    title: figure title.

  Returns:
    The path written.
  """
  fig = Figure(figsize=(4.6, 4.2))
  ax = fig.subplots()
  floor = 1e-5
  for label, (fpr, tpr) in curves.items():
    f = np.maximum(np.asarray(fpr, float), floor)
    ax.plot(f, np.maximum(np.asarray(tpr, float), floor), label=label, linewidth=1.2)
  ax.plot([floor, 1], [floor, 1], color="grey", linestyle=":", label="chance")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlim(1e-4, 1)
  ax.set_ylim(1e-4, 1)
  ax.set_xlabel("false-positive rate")
  ax.set_ylabel("true-positive rate")
  ax.legend(fontsize="small")
  if title:
    ax.set_title(title, fontsize="medium")
  fig.tight_layout()
  return save_figure(fig, path)


def class_grid(
  images: np.ndarray, labels: np.ndarray, num_classes: int, per_class: int
) -> np.ndarray:
  """The first ``per_class`` images of each class, as a ``(K, M, H, W, C)`` array.

  A class with fewer than ``per_class`` images is padded with blank (zero) images.
  """
  images, labels = np.asarray(images), np.asarray(labels)
  if images.ndim != 4 or labels.shape != images.shape[:1]:
    raise ValueError(
      f"images must be (N, H, W, C) with labels (N,), got {images.shape} and {labels.shape}"
    )
  if num_classes < 1 or per_class < 1:
    raise ValueError(f"num_classes and per_class must be >= 1, got {num_classes}, {per_class}")
  grid = np.zeros((num_classes, per_class, *images.shape[1:]), np.float32)
  for c in range(num_classes):
    picked = images[labels == c][:per_class]
    grid[c, : len(picked)] = picked
  return grid


def _mosaic(grid: np.ndarray, gap: int = 1) -> np.ndarray:
  """(K, M, H, W, C) -> one (K(H+gap)-gap, M(W+gap)-gap, C) image with white gaps."""
  k, m, h, w, c = grid.shape
  out = np.ones((k * (h + gap) - gap, m * (w + gap) - gap, c), np.float32)
  for i in range(k):
    for j in range(m):
      out[i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = grid[i, j]
  return out


def plot_image_grids(
  panels: Mapping[str, np.ndarray],
  path: str | os.PathLike[str],
  *,
  row_labels: Sequence[str] | None = None,
  title: str | None = None,
) -> Path:
  """Image grids side by side, one panel each: rows are classes, columns are examples.

  For a synthetic dataset: ``{"real": class_grid(real...), "synthetic": class_grid(...)}``
  compares real and synthetic images class by class; one panel per privacy level shows how
  the samples degrade with epsilon.

  Args:
    panels: panel title -> ``(K, M, H, W, C)`` images in [0, 1] (:func:`class_grid`); every
      panel has the same K, H, W, C (M may differ). C is 1 (grey) or 3 (RGB).
    path: PNG file to write.
    row_labels: one label per row (e.g. the class names), shown left of the first panel;
      defaults to ``0 .. K-1``.
    title: figure title.

  Returns:
    The path written.
  """
  if not panels:
    raise ValueError("panels must hold at least one grid")
  grids = {name: np.asarray(g, np.float32) for name, g in panels.items()}
  shapes = {(g.shape[0], *g.shape[2:]) for g in grids.values()}
  if any(g.ndim != 5 for g in grids.values()) or len(shapes) != 1:
    raise ValueError(
      "panels must be (K, M, H, W, C) arrays with equal K, H, W, C; got "
      + ", ".join(str(g.shape) for g in grids.values())
    )
  k, h = next(iter(grids.values())).shape[0], next(iter(grids.values())).shape[2]
  labels = [str(c) for c in range(k)] if row_labels is None else [str(r) for r in row_labels]
  if len(labels) != k:
    raise ValueError(f"row_labels must have {k} entries (one per row), got {len(labels)}")
  widths = [g.shape[1] for g in grids.values()]
  fig = Figure(figsize=(0.45 * sum(widths) + 0.4 * len(grids) + 0.5, 0.45 * k + 0.8))
  axes = fig.subplots(1, len(grids), squeeze=False, gridspec_kw={"width_ratios": widths})[0]
  for i, (ax, (name, grid)) in enumerate(zip(axes, grids.items(), strict=True)):
    mosaic = np.clip(_mosaic(grid), 0.0, 1.0)
    ax.imshow(mosaic[..., 0] if mosaic.shape[-1] == 1 else mosaic, cmap="gray", vmin=0, vmax=1)
    ax.set_title(name, fontsize="small")
    ax.set_xticks([])
    if i == 0:
      ax.set_yticks([r * (h + 1) + h / 2 for r in range(k)], labels, fontsize="small")
    else:
      ax.set_yticks([])
  if title:
    fig.suptitle(title, fontsize="medium")
  fig.tight_layout()
  return save_figure(fig, path)
