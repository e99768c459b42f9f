"""Permutation sets of the 9 jigsaw tiles, chosen greedily for a large minimum Hamming distance.

The jigsaw task (Noroozi & Favaro 2016) classifies which of a fixed set of ``N`` permutations shuffled the
tiles; the further apart the permutations (the Hamming distance: how many of the 9 places two permutations
fill differently), the less ambiguous the task. `permutation_set(N)` chooses the set as a farthest-point
traversal of all ``9! = 362,880`` permutations:

1. start from the identity ``(0, 1, ..., 8)`` (the lexicographically first permutation);
2. repeatedly add the permutation whose minimum Hamming distance to the permutations chosen so far is largest;
   ties go to the lexicographically smallest permutation (``np.argmax``'s first index over the permutations
   listed in ``itertools.permutations`` order), so the set is the same in every process and on every machine.

Noroozi's Algorithm 1 (and bbrattoli/JigsawPuzzlePytorch's ``select_permutations.py``) starts from a random
permutation and ranks candidates by their *mean* distance to the chosen set; ranking by the *minimum* is what
maximises the reported minimum distance and gives the packing guarantee below, so the sets differ from the
published files (the task, N-way classification over well separated permutations, is the same).

Guarantee: when the ``n``-th permutation is added at minimum distance ``d_n``, every permutation lies within
``d_n`` of one of the ``n - 1`` chosen before, so ``(n - 1) |B(d_n)| >= 9!`` with ``|B(d)|`` the number of
permutations within distance ``d`` of one permutation; ``d_n`` never increases, so the set's minimum pairwise
distance is ``d_N`` (e.g. at least 5 for N = 64 and 100, at least 4 for N = 1000).

Each set is computed once per process (kept in memory) and once per machine: written atomically to
``$SSLX_CACHE_DIR/permutations/`` (default ``~/.cache/sslx``); a cached file that does not hold ``N`` distinct
permutations starting with the identity is recomputed and replaced. N = 1000 takes under a second.
"""
from __future__ import annotations

import functools
import itertools
import logging
import os
import tempfile
from typing import NamedTuple

import numpy as np

NUM_TILES = 9
# The largest published set (Goyal et al. 2019 scaled the jigsaw task up to 10,000 permutations); choosing
# takes ~0.6 ms a permutation on one core.
MAX_PERMUTATIONS = 10_000
# Part of the cache file's name: a change to the selection rule must never read an old rule's sets.
_ALGORITHM_VERSION = "maxmin-v1"


class PermutationSet(NamedTuple):
  """``permutations``: ``(N, 9)`` int32, read-only; row ``i`` is class ``i``. ``min_distance``: the smallest
  Hamming distance between two of its rows."""
  permutations: np.ndarray
  min_distance: int


def check_num_permutations(num_permutations, key: str = "method.num_permutations") -> None:
  """Raises a ValueError naming ``config.<key>`` unless it is an int in ``[2, MAX_PERMUTATIONS]``."""
  if (isinstance(num_permutations, bool) or not isinstance(num_permutations, int)
      or not 2 <= num_permutations <= MAX_PERMUTATIONS):
    raise ValueError(f"config.{key}={num_permutations!r} must be an int in [2, {MAX_PERMUTATIONS}]: the "
                     "jigsaw task classifies among that many permutations of the 9 tiles")


def cache_dir() -> str:
  """``$SSLX_CACHE_DIR`` when set, else ``~/.cache/sslx``."""
  return os.environ.get("SSLX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "sslx")


def min_pairwise_distance(permutations: np.ndarray) -> int:
  """The smallest Hamming distance between two different rows, all pairs compared (in blocks of rows, so
  10,000 permutations need ~25 MB rather than 900)."""
  smallest = NUM_TILES
  for start in range(0, len(permutations), 256):
    block = permutations[start:start + 256]
    distances = np.count_nonzero(block[:, None, :] != permutations[None, :, :], axis=-1)
    distances[np.arange(len(block)), np.arange(start, start + len(block))] = NUM_TILES  # not to itself
    smallest = min(smallest, int(distances.min()))
  return smallest


@functools.cache
def all_permutations() -> np.ndarray:
  """The ``9!`` permutations of ``range(9)`` in lexicographic order, ``(362880, 9)`` int8, read-only."""
  table = np.array(list(itertools.permutations(range(NUM_TILES))), dtype=np.int8)
  table.flags.writeable = False
  return table


def _distances_to(columns: np.ndarray, permutation: np.ndarray) -> np.ndarray:
  """Hamming distance of every permutation (``columns``: the table transposed, ``(9, 9!)``) to one: nine
  compares of contiguous columns, ~20x faster than comparing rows of 9."""
  distances = np.zeros(columns.shape[1], np.int8)
  for place in range(NUM_TILES):
    distances += columns[place] != permutation[place]
  return distances


def choose_permutations(num_permutations: int) -> np.ndarray:
  """The greedy max-min selection of the module docstring, computed afresh: ``(N, 9)`` int32."""
  check_num_permutations(num_permutations)
  table = all_permutations()
  columns = np.ascontiguousarray(table.T)
  chosen = [0]
  # distance_to_set[j]: permutation j's minimum distance to the chosen ones (0 for the chosen themselves,
  # so none is picked twice while an unchosen permutation lies at distance >= 2).
  distance_to_set = _distances_to(columns, table[0])
  for _ in range(num_permutations - 1):
    best = int(np.argmax(distance_to_set))
    chosen.append(best)
    np.minimum(distance_to_set, _distances_to(columns, table[best]), out=distance_to_set)
  return table[chosen].astype(np.int32)


def _is_valid(permutations: np.ndarray, num_permutations: int) -> bool:
  """What a cached file must hold: ``N`` distinct permutations of ``range(9)``, the identity first."""
  if permutations.shape != (num_permutations, NUM_TILES) or permutations.dtype.kind not in "iu":
    return False
  identity = np.broadcast_to(np.arange(NUM_TILES), permutations.shape)
  if not np.array_equal(np.sort(permutations, axis=1), identity):
    return False
  return (np.array_equal(permutations[0], np.arange(NUM_TILES))
          and len(np.unique(permutations, axis=0)) == num_permutations)


def _cache_path(num_permutations: int) -> str:
  return os.path.join(cache_dir(), "permutations", f"jigsaw_{_ALGORITHM_VERSION}_{num_permutations}.npy")


def _read_cached(path: str, num_permutations: int):
  try:
    permutations = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError):  # absent, truncated or not an .npy file
    return None
  return permutations.astype(np.int32) if _is_valid(permutations, num_permutations) else None


def _write_atomically(path: str, permutations: np.ndarray) -> None:
  """Written under a temporary name, then renamed: readers in other processes see all of it or nothing."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  handle, partial = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".partial")
  try:
    with os.fdopen(handle, "wb") as f:
      np.save(f, permutations)
    os.chmod(partial, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
    os.replace(partial, path)
  except BaseException:
    if os.path.exists(partial):
      os.remove(partial)
    raise


@functools.lru_cache(maxsize=None)
def permutation_set(num_permutations: int) -> PermutationSet:
  """The set of ``num_permutations`` permutations (see the module docstring), from this process's memory,
  the disk cache, or computed (then cached). An unwritable cache only costs the recomputation next time."""
  check_num_permutations(num_permutations)
  path = _cache_path(num_permutations)
  permutations = _read_cached(path, num_permutations)
  if permutations is None:
    permutations = choose_permutations(num_permutations)
    try:
      _write_atomically(path, permutations)
    except OSError as error:
      logging.warning("jigsaw permutations not cached in %s: %s", path, error)
  permutations.flags.writeable = False
  return PermutationSet(permutations, min_pairwise_distance(permutations))
