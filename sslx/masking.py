"""Pure, jit-friendly mask generators over a sequence of patches.

All generators return fixed-size index sets so that shapes stay static under ``jax.jit``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def uniform_noise(key: jax.Array, batch: int, num_patches: int) -> jax.Array:
  """Per-patch uniform noise in [0, 1) whose ranking drives :func:`random_masking`."""
  return jax.random.uniform(key, (batch, num_patches), jnp.float32)


def num_kept(num_patches: int, mask_ratio: float) -> int:
  """Number of visible patches, ``int(L * (1 - mask_ratio))`` as in the reference MAE code."""
  if not 0.0 < mask_ratio < 1.0:
    raise ValueError(f"mask_ratio must lie strictly between 0 and 1, got {mask_ratio}.")
  len_keep = int(num_patches * (1 - mask_ratio))
  if len_keep < 1:
    raise ValueError(f"mask_ratio={mask_ratio} leaves no visible patch out of {num_patches}.")
  return len_keep


def random_masking(noise: jax.Array, mask_ratio: float):
  """MAE random masking: per image, keeps the patches with the smallest noise.

  Args:
    noise: ``(B, L)`` noise, e.g. from :func:`uniform_noise`; its per-row argsort is the shuffle.
    mask_ratio: fraction of patches to remove, in (0, 1); a static Python float.

  Returns:
    ``ids_keep`` ``(B, len_keep)`` int32 indices of the visible patches (in shuffled order),
    ``mask`` ``(B, L)`` float32 in original patch order with 1 = masked (removed) and 0 = kept, and
    ``ids_restore`` ``(B, L)`` int32, the inverse permutation of the shuffle.
  """
  len_keep = num_kept(noise.shape[1], mask_ratio)
  ids_shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)
  ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
  ids_keep = ids_shuffle[:, :len_keep]
  # ids_restore[i] is patch i's rank in the shuffle; the first len_keep ranks are kept.
  mask = (ids_restore >= len_keep).astype(jnp.float32)
  return ids_keep, mask, ids_restore
