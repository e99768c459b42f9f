"""Checksums of a train state's arrays, saved beside each checkpoint and checked when it is restored.

Orbax stores arrays with OCDBT and zstd, and neither guards the chunk bytes: zstd keeps incompressible
data (most float weights) raw, and only OCDBT's index nodes carry a CRC. A byte flipped inside a weight
file therefore restores without an error, as a wrong weight. Each array's checksum is the wrapping
``uint32`` sum of its elements' bits, computed on the devices where the array lives (integer addition
is exact and order-free, so any sharding gives the same number); a damaged element changes it.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sslx import trees


def _bits_sum(leaf: jax.Array) -> jax.Array:
  leaf = jnp.asarray(leaf)
  if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.random.key_data(leaf)
  width = np.dtype(leaf.dtype).itemsize
  if leaf.dtype == jnp.bool_ or width == 1:
    bits = leaf.astype(jnp.uint32)
  elif width in (2, 4):
    bits = jax.lax.bitcast_convert_type(leaf, {2: jnp.uint16, 4: jnp.uint32}[width]).astype(jnp.uint32)
  else:  # 8 bytes: both halves
    bits = jax.lax.bitcast_convert_type(leaf, jnp.uint32)
  return jnp.sum(bits, dtype=jnp.uint32)


def _sums(leaves: list) -> list:
  return [_bits_sum(leaf) for leaf in leaves]


@functools.lru_cache(maxsize=None)
def _jitted_sums(mesh: Optional[Mesh]):
  # Replicated results: every process can read them, however the arrays are spread over processes.
  return jax.jit(_sums, out_shardings=None if mesh is None else NamedSharding(mesh, PartitionSpec()))


def checksums(state: Any) -> dict[str, int]:
  """``{array path: checksum}`` of every array in ``state`` (a collective on several processes)."""
  named = {name: leaf for name, leaf in trees.leaves_by_name(state).items() if hasattr(leaf, "shape")}
  meshes = {leaf.sharding.mesh for leaf in named.values() if isinstance(getattr(leaf, "sharding", None), NamedSharding)}
  sums = jax.device_get(_jitted_sums(meshes.pop() if len(meshes) == 1 else None)(list(named.values())))
  return {name: int(value) for name, value in zip(named, sums, strict=True)}


def mismatches(saved: dict[str, int], restored: Any) -> list[str]:
  """The array paths of ``restored`` whose checksum differs from the ``saved`` one."""
  now = checksums(restored)
  return sorted(name for name, value in saved.items() if now.get(name) != value)
