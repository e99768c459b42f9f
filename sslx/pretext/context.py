"""Context prediction (Doersch, Gupta & Efros, ICCV 2015): a centre patch and one of its 8 neighbours.

Layout: a 3 x 3 grid of ``P x P`` patches whose neighbours are ``G`` pixels apart (the pitch is ``P + G``),
each patch then moved by its own jitter, an integer uniform in ``[-J, J]`` along each axis. The grid with
its jitter margins spans ``E = 3P + 2G + 2J`` pixels (`layout_extent`) and its top-left corner ``o`` is
uniform over the positions that keep it inside the image, so every patch lies inside the image by
construction (no clamping). With ``(r, c)`` a neighbour's cell offset from the centre, the top-left corners
along each axis are

  ``centre = o + J + (P + G) + j_centre``,  ``neighbour = o + J + (1 + r_or_c)(P + G) + j_neighbour``.

Labels (`NEIGHBOUR_OFFSETS`, the reference code's order, 0-based): the 8 cells in row-major order without
the centre,

  ``0 1 2``
  ``3 . 4``
  ``5 6 7``   e.g. label 1 sits right above the centre, label 4 right of it.

Doersch's numbers are ``P = 96``, ``G = 48``, ``J = 7`` on images resized to 150k-450k pixels
(cdoersch/deepcontext ``train.py``). The gap and the jitter keep the network from matching low-level cues
across patch borders (lines and textures that continue); chromatic aberration, which tells a patch's
position in the lens from its colour fringes, is removed by `drop_colours` or `project_green_magenta`.

Every random choice comes from the key passed in; shapes are static (the patch size is fixed, only the
positions vary: one ``lax.dynamic_slice`` per example under ``vmap``).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# (row, column) cell offset of each label's neighbour from the centre patch.
NEIGHBOUR_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
NUM_POSITIONS = len(NEIGHBOUR_OFFSETS)
# Doersch's "colour dropping" fills a dropped channel with noise of 1/100 the kept channel's deviation.
DROPPED_CHANNEL_NOISE = 0.01
# The green-magenta axis of RGB, the direction chromatic aberration shifts colours along.
GREEN_MAGENTA = np.array([-1.0, 2.0, -1.0]) / np.sqrt(6.0)


class PatchPairs(NamedTuple):
  """One centre patch and one neighbour per image, with where they were cut.

  ``centre``, ``neighbour``: ``(B, P, P, C)``; ``label``: ``(B,)`` int32 in ``[0, 8)``; ``centre_corner``,
  ``neighbour_corner``: ``(B, 2)`` int32 top-left (row, column) of each patch in the image.
  """
  centre: jax.Array
  neighbour: jax.Array
  label: jax.Array
  centre_corner: jax.Array
  neighbour_corner: jax.Array


def layout_extent(patch_size: int, gap: int, jitter: int) -> int:
  """Side in pixels of the 3 x 3 layout with its jitter margins: ``3P + 2G + 2J``."""
  return 3 * patch_size + 2 * gap + 2 * jitter


def sample_positions(key, batch: int, image_hw: Sequence[int], *, patch_size: int, gap: int,
                     jitter: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(label, centre_corner, neighbour_corner)`` for ``batch`` images of ``image_hw`` (see the module
  docstring); raises a ValueError if the layout does not fit."""
  extent = layout_extent(patch_size, gap, jitter)
  if min(image_hw) < extent:
    raise ValueError(f"a 3 x 3 layout of {patch_size} px patches, gap {gap}, jitter {jitter} spans {extent} "
                     f"px but the images are {image_hw[0]}x{image_hw[1]}")
  origin_key, label_key, jitter_key = jax.random.split(key, 3)
  slack = jnp.asarray([image_hw[0] - extent, image_hw[1] - extent])
  origin = jax.random.randint(origin_key, (batch, 2), 0, slack + 1)
  label = jax.random.randint(label_key, (batch,), 0, NUM_POSITIONS)
  shifts = jax.random.randint(jitter_key, (2, batch, 2), -jitter, jitter + 1)
  pitch = patch_size + gap
  centre_cell = origin + jitter + pitch
  offsets = jnp.asarray(NEIGHBOUR_OFFSETS, jnp.int32)[label]
  return label, centre_cell + shifts[0], centre_cell + offsets * pitch + shifts[1]


def crop_patches(images, corners, patch_size: int):
  """``(B, P, P, C)``: from each image the ``P x P`` patch whose top-left pixel is ``corners[b]``."""

  def crop(image, corner):
    return jax.lax.dynamic_slice(image, (corner[0], corner[1], 0), (patch_size, patch_size, image.shape[-1]))

  return jax.vmap(crop)(images, corners)


def sample_patch_pairs(key, images, *, patch_size: int, gap: int, jitter: int) -> PatchPairs:
  """A centre patch, one random neighbour and its label from each image ``(B, H, W, C)``."""
  label, centre_corner, neighbour_corner = sample_positions(
      key, images.shape[0], images.shape[1:3], patch_size=patch_size, gap=gap, jitter=jitter)
  centre = crop_patches(images, centre_corner, patch_size)
  neighbour = crop_patches(images, neighbour_corner, patch_size)
  return PatchPairs(centre, neighbour, label, centre_corner, neighbour_corner)


def drop_colours(key, patches):
  """Doersch's colour dropping: each patch keeps one of its 3 channels, chosen uniformly; the other two
  become Gaussian noise with a standard deviation of `DROPPED_CHANNEL_NOISE` times the kept channel's
  (over that patch's pixels). ``patches`` ``(N, P, P, 3)`` normalised, where 0 is the dataset mean."""
  keep_key, noise_key = jax.random.split(key)
  keep = jax.random.randint(keep_key, (patches.shape[0],), 0, patches.shape[-1])
  kept = jax.nn.one_hot(keep, patches.shape[-1], dtype=bool)[:, None, None, :]
  kept_std = jnp.std(jnp.sum(jnp.where(kept, patches, 0.0), axis=-1), axis=(1, 2))
  noise = jax.random.normal(noise_key, patches.shape, patches.dtype)
  noise = noise * (DROPPED_CHANNEL_NOISE * kept_std)[:, None, None, None]
  return jnp.where(kept, patches, noise)


def project_green_magenta(patches, mean: Sequence[float], std: Sequence[float]):
  """Doersch's "projection": removes the green-magenta component of every RGB pixel, ``x' = x - (a.x) a``
  with ``a = (-1, 2, -1) / sqrt(6)``, in raw pixel values (the normalised ``z = (x - mean) / std`` is mapped
  back, projected and normalised again)."""
  mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
  axis = jnp.asarray(GREEN_MAGENTA, jnp.float32)
  raw = patches * std + mean
  raw = raw - (raw @ axis)[..., None] * axis
  return (raw - mean) / std


def standardize_patches(patches, eps: float = 1e-6):
  """The reference code's per-patch normalisation: each channel minus its mean over the patch, then the
  whole patch divided by its root mean square, so brightness and contrast across patches are no cue."""
  centred = patches - jnp.mean(patches, axis=(1, 2), keepdims=True)
  return centred / jnp.sqrt(jnp.mean(jnp.square(centred), axis=(1, 2, 3), keepdims=True) + eps)
