"""The run folder: one writer for everything an experiment writes, released or not.

    runs/<experiment>/<name>/
      config.json          the settings (the noise mode included; never a noise key)
      metrics.json         final results, each model's epsilon and the folder's composed one
      metrics.jsonl        per-epoch released metrics (validation split, epsilon so far)
      plots/*.png          figures of released results (synthetic or test images only)
      checkpoints/, *.npz  DP models and DP synthetic data
      tensorboard/         the released scalars (with --tensorboard)
      nondp/               NOT differentially private: do not publish (see NONDP_NOTE)
        diagnostics.jsonl  train-batch loss and accuracy, gradient norms, fraction clipped
        metrics.json       non-private models' results; checkpoints/, plots/, tensorboard/

Everything outside ``nondp/`` is released: it holds no training example and no statistic of
the private split that was not noised, and its privacy is the composition of every private
release in it, kept in one :class:`~jaxdp.accounting.PrivacyLedger` (``RunFolder.ledger``)
and written to ``metrics.json["privacy"]``. What training computes without noise on private
batches, and any model trained without DP on private data, goes to ``nondp/``.

TensorBoard: ``tensorboard --logdir <run folder>`` shows both the released scalars and the
non-DP diagnostics (per-example gradient-norm histograms among them).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from flax import serialization

from jaxdp import accounting, synth
from jaxdp.data import Dataset
from jaxdp.experiment.cli import UsageError
from jaxdp.plots import plot_image_grids

T = TypeVar("T")

__all__ = ["NONDP", "NONDP_NOTE", "MetricStream", "RunFolder", "format_table", "fresh_dir", "slug"]

NONDP = "nondp"
NONDP_NOTE = (
  "NOT differentially private. This folder holds statistics computed without noise on the "
  "private training data (train-batch loss and accuracy, gradient norms, fraction clipped) "
  "and models trained without DP on it. They are diagnostics for the person running the "
  "experiment: do not publish them.\n"
)


def fresh_dir(base: Path) -> Path:
  """Creates and returns ``base``, or ``base-2``, ``base-3``, ... if it exists."""
  path, k = base, 1
  while path.exists():
    k += 1
    path = base.with_name(f"{base.name}-{k}")
  path.mkdir(parents=True)
  return path


def slug(label: str) -> str:
  """A file-name form of a model label: ``"DP-SGD eps=3"`` -> ``"DP-SGD_eps3"``."""
  return label.replace(" ", "_").replace("=", "").replace("/", "-")


def _jsonable(value: Any) -> Any:
  """Numpy scalars and arrays as Python values, for json."""
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, np.generic):
    return value.item()
  return value


def write_json(path: Path, value: Any) -> Path:
  """``value`` as indented JSON (inf and NaN allowed, as Python writes them)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(_jsonable(value), indent=2, allow_nan=True) + "\n")
  return path


class MetricStream:
  """Per-epoch scalars of one audience: a JSON-lines file and, optionally, TensorBoard."""

  def __init__(self, folder: Path, jsonl: str, tensorboard: bool) -> None:
    self.folder = folder
    self._jsonl = folder / jsonl
    self._tensorboard = tensorboard
    self._writer: Any = None

  def _tb(self) -> Any:
    if self._writer is None and self._tensorboard:
      from tensorboardX import SummaryWriter  # imported only when asked for

      self._writer = SummaryWriter(str(self.folder / "tensorboard"), flush_secs=10)
    return self._writer

  def log(self, model: str, step: int, scalars: Mapping[str, Any]) -> None:
    """Appends ``{"model", "step", **scalars}`` to the JSON lines (and TensorBoard)."""
    self.folder.mkdir(parents=True, exist_ok=True)
    row = {"model": model, "step": int(step), **_jsonable(dict(scalars))}
    with self._jsonl.open("a") as f:
      f.write(json.dumps(row, allow_nan=True) + "\n")
    writer = self._tb()
    if writer is not None:
      for key, value in scalars.items():
        scalar = isinstance(value, (int, float, np.generic)) and key not in ("step", "epoch")
        if scalar and math.isfinite(float(value)):
          writer.add_scalar(f"{slug(model)}/{key}", float(value), int(step))

  def histogram(self, model: str, name: str, step: int, values: np.ndarray) -> None:
    """A TensorBoard histogram (nothing without TensorBoard)."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    writer = self._tb()
    if writer is not None and values.size:
      writer.add_histogram(f"{slug(model)}/{name}", values, int(step))

  def figure(self, tag: str, png: Path) -> None:
    """A written PNG figure as a TensorBoard image (nothing without TensorBoard)."""
    writer = self._tb()
    if writer is not None:
      from matplotlib import image as mpimg

      writer.add_image(tag, mpimg.imread(png)[..., :3], 0, dataformats="HWC")

  def close(self) -> None:
    """Flushes and closes the TensorBoard writer."""
    if self._writer is not None:
      self._writer.close()
      self._writer = None


class RunFolder:
  """A run folder (see the module docstring): released files at the top, non-DP in nondp/.

  Args:
    path: the folder (created by :meth:`create`).
    delta: the delta every epsilon of the folder is reported at.
    accountant: the accountant of ``metrics.json["privacy"]["epsilon"]`` (both are given).
    tensorboard: also write TensorBoard event files.
  """

  def __init__(
    self,
    path: Path,
    *,
    delta: float,
    accountant: str = "pld",
    tensorboard: bool = False,
    checkpoint_every: int = 0,
    resumed: bool = False,
  ) -> None:
    self.path = Path(path)
    self.checkpoint_every = checkpoint_every
    self.resumed = resumed
    self.delta = delta
    self.accountant = accountant
    self.ledger = accounting.PrivacyLedger()
    self.released = MetricStream(self.path, "metrics.jsonl", tensorboard)
    self.diagnostics = MetricStream(self.path / NONDP, "diagnostics.jsonl", tensorboard)
    (self.path / NONDP).mkdir(parents=True, exist_ok=True)
    (self.path / NONDP / "README.txt").write_text(NONDP_NOTE)
    self._t0 = time.perf_counter()

  @classmethod
  def create(cls, out: str | Path, name: str, **kwargs: Any) -> RunFolder:
    """A fresh folder ``out/name`` (``name-2`` ... if taken)."""
    return cls(fresh_dir(Path(out) / name), **kwargs)

  @classmethod
  def start(cls, cfg: Any, tag: str) -> RunFolder:
    """The run folder of an experiment's config (run, privacy settings): created, with its
    ``config.json``, or with ``--resume`` the existing one (its settings must match);
    warns on stdout when the noise is not secret."""
    kwargs = dict(
      delta=cfg.delta,
      accountant=cfg.accountant,
      tensorboard=cfg.tensorboard,
      checkpoint_every=getattr(cfg, "checkpoint_every", 0),
    )
    if getattr(cfg, "resume", None):
      run = cls(Path(cfg.resume), resumed=True, **kwargs)
      run.check_resume(cfg)
    else:
      stamp = time.strftime("%Y%m%d-%H%M%S")
      name = cfg.name or f"{stamp}-{tag}" + ("-quick" if cfg.quick else "")
      run = cls.create(cfg.out, name, **kwargs)
      derived = cfg.derived() if hasattr(cfg, "derived") else {}
      run.write_config(cfg, noise=cfg.noise_mode, **derived)
    if cfg.insecure_reproducible_noise:
      print(
        "WARNING: --insecure-reproducible-noise: the DP noise and batches derive from --seed, "
        "which config.json records. This run has NO privacy guarantee; never release it.",
        flush=True,
      )
    return run

  # Settings that may differ between a run and its resumption.
  RESUMABLE = (
    "resume",
    "progress",
    "checkpoint_every",
    "name",
    "out",
    "tensorboard",
    "parallel",  # a study's cells side by side: each cell is its own run either way
    # How the steps run: the same mechanism, the same numbers up to float summation order.
    "devices",
    "microbatch_size",
    "physical_batch",
  )

  def check_resume(self, cfg: Any) -> None:
    """Raises UsageError unless ``cfg`` is the settings of the run being resumed."""
    saved_path = self.path / "config.json"
    if not saved_path.is_file():
      raise UsageError(f"--resume: {self.path} is not a run folder (no config.json)")
    saved = json.loads(saved_path.read_text())
    now = json.loads(json.dumps(_jsonable(dataclasses.asdict(cfg))))
    differ = sorted(k for k in now if k not in self.RESUMABLE and k in saved and saved[k] != now[k])
    if differ:
      raise UsageError(
        f"--resume: the flags must be the run's; these differ from {saved_path}: "
        + ", ".join(f"--{k.replace('_', '-')}" for k in differ)
      )

  def checkpointer(self, label: str) -> Any:
    """The resumable checkpoints of model ``label`` (under ``nondp/resume/``: they hold
    the secret noise key and sampler state), or None when checkpoints are off."""
    if not (self.checkpoint_every or self.resumed):
      return None
    from jaxdp.checkpoint import Checkpointer  # orbax only when asked for

    every = self.checkpoint_every or 10**9
    return Checkpointer(self.path / NONDP / "resume" / slug(label), every=every)

  def cached(self, label: str, compute: Callable[[], T]) -> T:
    """``compute()``, the result of job ``label``, kept when checkpoints are on so that a
    resumed run reads it back instead of running the job again (a whole-job checkpoint, for
    jobs that do not train through :meth:`checkpointer`, e.g. an audit's runs).

    The result is pickled under ``nondp/resume/`` (deleted when the run completes) through
    a temporary file renamed when complete: a run killed while writing computes it again.
    """
    if not (self.checkpoint_every or self.resumed):
      return compute()
    path = self.path / NONDP / "resume" / f"{slug(label)}.pickle"
    if path.is_file():
      return pickle.loads(path.read_bytes())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(pickle.dumps(result))
    tmp.replace(path)
    return result

  def stream(self, released: bool) -> MetricStream:
    """The metric stream of released (DP) results, or of non-DP diagnostics."""
    return self.released if released else self.diagnostics

  def file(self, relative: str, *, released: bool = True) -> Path:
    """The path of a file of the folder: at the top if released, else under ``nondp/``."""
    path = (self.path if released else self.path / NONDP) / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    return path

  def write_config(self, config: Any, **extra: Any) -> Path:
    """``config.json``: the dataclass's fields and ``extra`` (e.g. the noise mode)."""
    fields = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return write_json(self.path / "config.json", {**fields, **extra})

  def save_params(self, label: str, params: Any, *, released: bool) -> str:
    """A checkpoint (``flax.serialization`` msgpack); returns its path in the folder."""
    path = self.file(f"checkpoints/{slug(label)}.msgpack", released=released)
    path.write_bytes(serialization.to_bytes(params))
    return str(path.relative_to(self.path))

  def save_dataset(self, label: str, dataset: Dataset, *, released: bool) -> str:
    """A labelled dataset as ``.npz`` (:func:`jaxdp.synth.save_npz`); returns its path."""
    path = synth.save_npz(self.file(f"synthetic-{slug(label)}.npz", released=released), dataset)
    return str(path.relative_to(self.path))

  def plot_images(
    self, name: str, panels: Mapping[str, np.ndarray], *, released: bool = True, **kwargs: Any
  ) -> Path:
    """Image grids (:func:`jaxdp.plots.plot_image_grids`) as ``plots/<name>.png``."""
    return plot_image_grids(panels, self.file(f"plots/{name}.png", released=released), **kwargs)

  def privacy(self) -> dict[str, Any]:
    """The composed privacy of everything released here (the ledger's entries)."""
    out: dict[str, Any] = {"delta": self.delta, "accountant": self.accountant}
    for acc in accounting.ACCOUNTANTS:
      out[f"epsilon_{acc}"] = self.ledger.epsilon(self.delta, acc) if len(self.ledger) else 0.0
    out["epsilon"] = out[f"epsilon_{self.accountant}"]
    out["ledger"] = self.ledger.to_dict()
    return out

  def finish(self, metrics: Mapping[str, Any], nondp: Mapping[str, Any] | None = None) -> dict:
    """Writes ``metrics.json`` (with ``privacy``, the composed epsilon of the release) and,
    if given, ``nondp/metrics.json``; closes the streams; returns the released metrics."""
    out = {**metrics, "privacy": self.privacy(), "wall_time_s": time.perf_counter() - self._t0}
    out["run_dir"] = str(self.path)
    write_json(self.path / "metrics.json", out)
    if nondp:
      write_json(self.file("metrics.json", released=False), nondp)
    # The resumable checkpoints hold the secret keys: gone once the run is complete.
    shutil.rmtree(self.path / NONDP / "resume", ignore_errors=True)
    self.released.close()
    self.diagnostics.close()
    return out


def format_table(head: list[str], rows: list[list[str]]) -> str:
  """A plain aligned text table (the summary an experiment prints last)."""
  widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
  fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
  return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)])
