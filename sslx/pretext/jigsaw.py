"""Jigsaw puzzles (Noroozi & Favaro 2016): 9 tiles of an image, each normalised alone, then shuffled.

The image (the paper's 225 px crop) is split into a 3 x 3 grid of square cells of ``cell = H // 3`` pixels
(75 px), numbered in raster order (cell ``n`` is row ``n // 3``, column ``n % 3``). Inside each cell a tile of
``tile_size`` pixels (64 px) is cut at a random offset in ``[0, cell - tile_size]`` on each axis (the paper's
gap between tiles, so edges and continued lines do not give the order away). With ``channel_jitter = j``
each colour channel of a tile is cut at its own offset, the tile's moved by up to ``j`` pixels and kept
inside the cell (the paper's defence against chromatic aberration).

Offsets come from `draw_offsets` (a key) and are passed to `extract_tiles`, which only indexes: every tile
pixel is an input pixel. `normalize_tiles` standardises each tile by its own mean and standard deviation
over its pixels and channels (so tiles cannot be matched by their brightness and contrast).

Shuffling: with permutation ``p``, place ``i`` of the puzzle holds tile ``p[i]`` (``puzzle[i] = tiles[p[i]]``,
as bbrattoli/JigsawPuzzlePytorch stacks them); `unshuffle_tiles` puts every tile back, exactly.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

GRID = 3
NUM_TILES = GRID * GRID
TILE_NORM_EPS = 1e-5  # a constant tile (blank background) becomes zeros rather than NaNs


def cell_size(image_size: int) -> int:
  """Side of the 3 x 3 cells of a square image of ``image_size`` pixels, which 3 must divide."""
  if image_size % GRID:
    raise ValueError(f"an image of {image_size} px does not split into {GRID} x {GRID} equal cells")
  return image_size // GRID


def draw_offsets(key: jax.Array, batch_size: int, *, cell: int, tile_size: int, channels: int,
                 channel_jitter: int = 0) -> jax.Array:
  """``(B, 9, C, 2)`` int32 (row, column) offsets of each channel of each tile inside its cell.

  A tile's offset is uniform in ``[0, cell - tile_size]`` per axis; with ``channel_jitter = j`` each channel's
  is the tile's plus an integer uniform in ``[-j, j]`` per axis, clipped to the same range.
  """
  if not 0 < tile_size <= cell:
    raise ValueError(f"a tile of {tile_size} px does not fit in a cell of {cell} px")
  tile_key, jitter_key = jax.random.split(key)
  offsets = jax.random.randint(tile_key, (batch_size, NUM_TILES, 1, 2), 0, cell - tile_size + 1)
  offsets = jnp.broadcast_to(offsets, (batch_size, NUM_TILES, channels, 2))
  if channel_jitter:
    shifts = jax.random.randint(jitter_key, offsets.shape, -channel_jitter, channel_jitter + 1)
    offsets = jnp.clip(offsets + shifts, 0, cell - tile_size)
  return offsets.astype(jnp.int32)


def extract_tiles(images: jax.Array, offsets: jax.Array, tile_size: int) -> jax.Array:
  """``(B, 9, t, t, C)`` tiles of ``(B, H, W, C)`` images (``H = W``, a multiple of 3), in raster order.

  Channel ``c`` of tile ``n`` of image ``b`` is ``images[b, r*cell + y : r*cell + y + t, q*cell + x : ...,
  c]`` with ``(r, q) = divmod(n, 3)`` and ``(y, x) = offsets[b, n, c]``; offsets outside ``[0, cell - t]``
  are clamped into it (`jax.lax.dynamic_slice`).
  """
  batch, height, width, channels = images.shape
  if height != width:
    raise ValueError(f"jigsaw tiles need square images, got {height}x{width}")
  cell = cell_size(height)
  # (B, H, W, C) -> (B, 3, cell, 3, cell, C) -> (B, 9, C, cell, cell): one plane per tile and channel.
  planes = images.reshape(batch, GRID, cell, GRID, cell, channels).transpose(0, 1, 3, 5, 2, 4)
  planes = planes.reshape(batch, NUM_TILES, channels, cell, cell)

  def cut(plane, offset):
    return jax.lax.dynamic_slice(plane, (offset[0], offset[1]), (tile_size, tile_size))

  tiles = jax.vmap(jax.vmap(jax.vmap(cut)))(planes, offsets)  # (B, 9, C, t, t)
  return tiles.transpose(0, 1, 3, 4, 2)


def normalize_tiles(tiles: jax.Array, eps: float = TILE_NORM_EPS) -> jax.Array:
  """Each tile ``(t, t, C)`` of ``(..., t, t, C)`` minus its mean, over the square root of its (population)
  variance plus ``eps``, in float32: ``(x - mean) / sqrt(var + eps)`` over the tile's ``t * t * C`` values."""
  tiles = tiles.astype(jnp.float32)
  mean = jnp.mean(tiles, axis=(-3, -2, -1), keepdims=True)
  variance = jnp.mean(jnp.square(tiles - mean), axis=(-3, -2, -1), keepdims=True)
  return (tiles - mean) * jax.lax.rsqrt(variance + eps)


def shuffle_tiles(tiles: jax.Array, permutations: jax.Array) -> jax.Array:
  """``puzzle[b, i] = tiles[b, permutations[b, i]]`` for ``(B, 9, ...)`` tiles and ``(B, 9)`` permutations."""
  index = permutations.reshape(permutations.shape + (1,) * (tiles.ndim - 2))
  return jnp.take_along_axis(tiles, index, axis=1)


def unshuffle_tiles(puzzles: jax.Array, permutations: jax.Array) -> jax.Array:
  """The inverse of `shuffle_tiles`: ``tiles[b, permutations[b, i]] = puzzles[b, i]``."""
  return shuffle_tiles(puzzles, jnp.argsort(permutations, axis=1))


def make_puzzles(key: jax.Array, images: jax.Array, permutation_set: np.ndarray, *, tile_size: int,
                 channel_jitter: int = 0) -> tuple[jax.Array, jax.Array]:
  """A batch of puzzles: ``(B, 9, t, t, C)`` normalised, shuffled tiles and ``(B,)`` int32 labels, the rows of
  the ``(N, 9)`` ``permutation_set`` (uniform) that shuffled them."""
  label_key, offset_key = jax.random.split(key)
  batch, size, _, channels = images.shape
  labels = jax.random.randint(label_key, (batch,), 0, len(permutation_set), dtype=jnp.int32)
  offsets = draw_offsets(offset_key, batch, cell=cell_size(size), tile_size=tile_size, channels=channels,
                         channel_jitter=channel_jitter)
  tiles = normalize_tiles(extract_tiles(images, offsets, tile_size))
  return shuffle_tiles(tiles, jnp.asarray(permutation_set, jnp.int32)[labels]), labels

