"""Data parallelism for the private step: a device mesh, replicated state, sharded batches.

The step (:mod:`jaxdp.step`) runs on a one-axis :class:`jax.sharding.Mesh` named
``DATA_AXIS``: the physical batch's rows (indices, mask, per-example keys) are split over
its devices, each device gathers and clips its own rows from its replica of the dataset,
and one all-reduce (``psum``) adds the clipped sums. The noise is drawn after the
all-reduce from the step's one noise key, so it enters the update exactly once, and every
device computes the same update from the same replicated state:

    G   = psum_d  sum_{i in rows(d)} clip_C(g_i)        (one all-reduce)
    g   = (G + N(0, (sigma C)^2 I)) / B_expected        (once, replicated)

Per-example keys are those of the single-device step (``split(key, P)`` row by row), so a
run on D devices takes the single-device step's numbers up to the order of float additions.

Several hosts: call ``jax.distributed.initialize()`` first on every host; ``jax.devices()``
then lists every host's devices and :func:`data_mesh` spans them all. Every host must draw
the same batches and noise: :class:`jaxdp.keys.KeySource` shares process 0's secret entropy
with the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
  "DATA_AXIS",
  "check_rows",
  "data_mesh",
  "describe",
  "mesh_for",
  "replicate",
  "replicated_sharding",
  "resolve_devices",
  "row_multiple",
  "rows_sharding",
  "shard_rows",
]

PyTree = Any
DATA_AXIS = "data"


def resolve_devices(
  devices: int | Sequence[jax.Device] | None, name: str = "devices"
) -> list[jax.Device]:
  """The devices a step runs on: all (None), the first ``devices`` of them, or a list.

  Raises:
    ValueError: for a count outside ``1..len(jax.devices())`` or an empty list.
  """
  available = jax.devices()
  if devices is None:
    return list(available)
  if isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
    if not 1 <= devices <= len(available):
      raise ValueError(
        f"{name} must be between 1 and {len(available)} (the {jax.default_backend()} devices "
        f"JAX sees), got {devices}"
      )
    return list(available[: int(devices)])
  chosen = list(devices)
  if not chosen:
    raise ValueError(f"{name} must name at least one device")
  return chosen


def data_mesh(devices: int | Sequence[jax.Device] | None = None) -> Mesh:
  """A one-axis mesh (``DATA_AXIS``) over ``devices`` (see :func:`resolve_devices`)."""
  return Mesh(np.asarray(resolve_devices(devices)), (DATA_AXIS,))


def mesh_for(devices: int | Sequence[jax.Device] | None, name: str = "devices") -> Mesh | None:
  """:func:`data_mesh` over ``devices``, or None (the plain one-device step) for a single one."""
  chosen = resolve_devices(devices, name)
  return data_mesh(chosen) if len(chosen) > 1 else None


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """A full copy on every device of ``mesh``."""
  return NamedSharding(mesh, PartitionSpec())


def rows_sharding(mesh: Mesh) -> NamedSharding:
  """The leading (example) axis split over the mesh's ``DATA_AXIS``."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
  if isinstance(x, jax.Array) and x.sharding == sharding:
    return x
  if jax.process_count() > 1:
    # Every process holds the whole value; each fills in its own devices' pieces.
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
  return jax.device_put(x, sharding)


def replicate(tree: PyTree, mesh: Mesh | None) -> PyTree:
  """``tree`` with every array copied to every device of ``mesh`` (unchanged for None)."""
  if mesh is None:
    return tree
  sharding = replicated_sharding(mesh)
  return jax.tree_util.tree_map(lambda x: _put(x, sharding), tree)


def shard_rows(tree: PyTree, mesh: Mesh) -> PyTree:
  """``tree``'s arrays split along their leading axis over the mesh's ``DATA_AXIS``."""
  sharding = rows_sharding(mesh)
  return jax.tree_util.tree_map(lambda x: _put(x, sharding), tree)


def row_multiple(mesh: Mesh | None) -> int:
  """The number of shards the rows of a physical batch split into (1 without a mesh)."""
  return 1 if mesh is None else int(mesh.shape[DATA_AXIS])


def check_rows(rows: int, mesh: Mesh | None) -> None:
  """Raises unless a physical batch of ``rows`` splits evenly over ``mesh``."""
  d = row_multiple(mesh)
  if rows % d:
    raise ValueError(
      f"the physical batch size ({rows}) must be a multiple of the {d} devices of the mesh "
      "(PoissonSampler(..., row_multiple=...) rounds it up)"
    )


def describe(mesh: Mesh | None) -> str:
  """E.g. "4 cpu devices" (for logs and config.json)."""
  if mesh is None:
    return f"1 {jax.default_backend()} device"
  devices = mesh.devices.ravel()
  kinds = sorted({d.platform for d in devices})
  return f"{devices.size} {'/'.join(kinds)} device{'s' if devices.size > 1 else ''}"
