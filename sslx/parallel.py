"""Device mesh, logical-axis sharding rules and host-to-global batch assembly.

Every array in a run is placed by a `NamedSharding` over one 2-D mesh with axes ``('data', 'fsdp')``:
the batch is split over both axes; parameters are replicated (pure data parallel) unless
``config.parallel.fsdp > 1``, in which case the logical axes ``'embed'`` and ``'conv_out'`` are split over
the ``'fsdp'`` axis (ZeRO-3 / FSDP style). Models name their parameter axes with
``nn.with_logical_partitioning``; the mapping from logical names to mesh axes lives only here.
`run_on_batch_shards` runs a function per device over the batch axes (losses that compare every example with
the whole global batch, e.g. contrastive ones, without building the global x global matrix on one device).
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, NamedTuple, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")

# Logical parameter axis names used by sslx models, and where each goes on the mesh.
_REPLICATED_RULES = (("embed", None), ("mlp", None), ("heads", None), ("head_dim", None), ("patch", None),
                     ("conv_in", None), ("conv_out", None), ("layers", None))
# A conv kernel's output channels (and its BatchNorm's) split like a transformer's width. The leading axis of
# stacked (scanned) blocks stays whole: each scan iteration reads one layer, which every device needs.
_FSDP_RULES = (("embed", "fsdp"), ("mlp", None), ("heads", None), ("head_dim", None), ("patch", None),
               ("conv_in", None), ("conv_out", "fsdp"), ("layers", None))


def maybe_initialize_distributed() -> None:
  """Calls `jax.distributed.initialize()` when this process is one of several (pod slice, SLURM, MPI).

  A single-process run skips it, so laptops and one-GPU machines need no coordinator. By hand: set
  ``JAX_COORDINATOR_ADDRESS=host:port``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` on every process.
  """
  multi_process_markers = (
      int(os.environ.get("SLURM_NTASKS", "1")) > 1,
      int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1,
      "JAX_COORDINATOR_ADDRESS" in os.environ,
      len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1,
  )
  if not any(multi_process_markers):
    return
  if "JAX_COORDINATOR_ADDRESS" in os.environ and "JAX_NUM_PROCESSES" in os.environ:
    # A hand-made cluster: jax reads only the address from the environment, so pass count and id.
    jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], int(os.environ["JAX_NUM_PROCESSES"]),
                               int(os.environ["JAX_PROCESS_ID"]))
  else:
    jax.distributed.initialize()  # SLURM, Open MPI and TPU pods describe themselves


def create_mesh(fsdp: int = 1) -> Mesh:
  """A ``('data', 'fsdp')`` mesh over all devices of all processes."""
  num_devices = jax.device_count()
  if fsdp < 1 or num_devices % fsdp:
    raise ValueError(f"config.parallel.fsdp={fsdp} must be >= 1 and divide the device count {num_devices}")
  # Auto axes: XLA's sharding propagation places intermediates; we only pin inputs, outputs and params.
  auto = (jax.sharding.AxisType.Auto,) * len(DATA_AXES)
  return jax.make_mesh((num_devices // fsdp, fsdp), DATA_AXES, axis_types=auto)


def logical_axis_rules(fsdp: int) -> tuple[tuple[str, Any], ...]:
  return _FSDP_RULES if fsdp > 1 else _REPLICATED_RULES


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every device."""
  return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shardings_from_logical(boxed_abstract_tree: Any, mesh: Mesh, rules) -> Any:
  """Maps a tree that may hold `nn.LogicallyPartitioned` leaves to `NamedSharding`s (unboxed structure)."""
  logical_specs = nn.get_partition_spec(boxed_abstract_tree)
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
  """Turns this process's slice of the batch (numpy) into globally sharded jax Arrays."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


class BatchShards(NamedTuple):
  """The collectives a per-shard function needs over the batch axes; with no axes (one device) they are
  identities, so one function body serves both cases."""
  axes: tuple[str, ...] = ()
  size: int = 1  # devices along ``axes``

  def all_gather(self, x: jax.Array) -> jax.Array:
    """The global batch from every device's rows, in batch order. Its transpose is a reduce-scatter, so
    each device's rows get the gradient summed over all devices that read them."""
    return jax.lax.all_gather(x, self.axes, tiled=True) if self.axes else x

  def first_row(self, local_rows: int):
    """Global index of this device's first row."""
    return jax.lax.axis_index(self.axes) * local_rows if self.axes else 0

  def mean(self, local_values: jax.Array) -> jax.Array:
    """Mean over the global batch of per-row values, from this device's rows."""
    total = jnp.sum(local_values)
    return (jax.lax.psum(total, self.axes) if self.axes else total) / (local_values.shape[0] * self.size)


def run_on_batch_shards(fn: Callable, *, batched: dict, replicated: dict, batched_out: Any,
                        mesh: Optional[Union[Mesh, AbstractMesh]] = None):
  """``fn(shards, **batched, **replicated)`` on each device's rows of the batch, over ``DATA_AXES``.

  ``mesh`` defaults to the current one (``jax.set_mesh``). Where its batch axes hold more than one device,
  ``fn`` runs under `jax.shard_map`: the arrays of ``batched`` are split along their leading axis, those of
  ``replicated`` are whole on every device, and ``fn`` reaches the other devices' rows only through
  ``shards`` (a `BatchShards`). Otherwise ``fn(BatchShards(), ...)`` runs on the whole arrays.
  ``batched_out`` is a pytree prefix of ``fn``'s output: True where an output is per-row (split like the
  batch), False where it is the same on every device.
  """
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  axes = tuple(axis for axis in DATA_AXES if axis in mesh.axis_names)
  size = math.prod(mesh.shape[axis] for axis in axes)
  if size == 1:
    return fn(BatchShards(), **batched, **replicated)
  for name, value in batched.items():
    if value.shape[0] % size:
      raise ValueError(f"{name} has shape {value.shape}: its {value.shape[0]} rows cannot be split evenly "
                       f"over the {size} devices of the mesh axes {axes}")
  spec = lambda is_batched: P(axes) if is_batched else P()
  per_shard = jax.shard_map(lambda b, r: fn(BatchShards(axes, size), **b, **r), mesh=mesh,
                            in_specs=(P(axes), P()), out_specs=jax.tree.map(spec, batched_out),
                            axis_names=frozenset(axes))
  return per_shard(batched, replicated)
