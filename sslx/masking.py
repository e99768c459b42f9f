"""Pure, jit-friendly mask generators over a sequence of patches.

All generators return fixed-size index sets so that shapes stay static under ``jax.jit``.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def uniform_noise(key: jax.Array, batch: int, num_patches: int) -> jax.Array:
  """Per-patch uniform noise in [0, 1) whose ranking drives :func:`random_masking`."""
  return jax.random.uniform(key, (batch, num_patches), jnp.float32)


def _len_keep(num_patches: int, mask_ratio: float) -> int:
  return int(num_patches * (1 - mask_ratio))


def num_kept(num_patches: int, mask_ratio: float) -> int:
  """Number of visible patches, ``int(L * (1 - mask_ratio))`` as in the reference MAE code.

  Raises:
    ValueError: the ratio is not in (0, 1), leaves no patch visible, or (below about 1e-16 L, where
      ``1 - mask_ratio`` rounds to 1) masks none, which would leave the loss nothing to average over.
  """
  if not 0.0 < mask_ratio < 1.0:
    raise ValueError(f"mask_ratio must lie strictly between 0 and 1, got {mask_ratio}.")
  len_keep = _len_keep(num_patches, mask_ratio)
  if len_keep < 1:
    raise ValueError(f"mask_ratio={mask_ratio} leaves no visible patch out of {num_patches}.")
  if len_keep >= num_patches:
    raise ValueError(f"mask_ratio={mask_ratio} masks none of the {num_patches} patches.")
  return len_keep


def max_mask_ratio(num_patches: int) -> float:
  """The largest ratio `num_kept` accepts for ``num_patches`` patches: ``1 - 1/L`` up to float rounding."""
  if num_patches < 2:
    raise ValueError(f"{num_patches} patch(es) cannot be split into visible and masked ones.")
  ratio = 1.0 - 1.0 / num_patches
  # The product rounds either way, so the exact float boundary is a few steps from 1 - 1/L.
  while _len_keep(num_patches, ratio) < 1:
    ratio = math.nextafter(ratio, 0.0)
  while _len_keep(num_patches, math.nextafter(ratio, 1.0)) >= 1:
    ratio = math.nextafter(ratio, 1.0)
  return ratio


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
