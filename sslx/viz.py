"""Pictures people want to look at, written as PNG: image grids, and attention maps as heat maps over images."""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
from PIL import Image


def denormalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """Undoes ``(x - mean) / std`` and clips to [0, 1]."""
  images = np.asarray(images, np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
  return np.clip(images, 0.0, 1.0)


def image_grid(rows: Mapping[str, np.ndarray], *, min_tile: int = 96, pad: int = 2) -> np.ndarray:
  """Tiles equally shaped batches (B, H, W, C) in [0, 1]: one row per entry, one column per example.

  Small images (Fashion-MNIST is 28 px) are enlarged by an integer factor with nearest-neighbour so the
  pixels a model reconstructs stay visible.
  """
  batches = [np.asarray(batch, np.float32) for batch in rows.values()]
  num, height, width, channels = batches[0].shape
  if any(batch.shape != batches[0].shape for batch in batches):
    raise ValueError(f"all rows must share one shape; got {[b.shape for b in batches]}")
  scale = max(1, -(-min_tile // max(height, width)))
  tile_h, tile_w = height * scale, width * scale
  grid = np.ones((len(batches) * (tile_h + pad) + pad, num * (tile_w + pad) + pad, 3), np.float32)
  for row, batch in enumerate(batches):
    batch = np.repeat(np.repeat(batch, scale, axis=1), scale, axis=2)
    if channels == 1:
      batch = np.repeat(batch, 3, axis=-1)
    for col in range(num):
      top, left = pad + row * (tile_h + pad), pad + col * (tile_w + pad)
      grid[top:top + tile_h, left:left + tile_w] = batch[col]
  return grid


def save_image_grid(path: str, rows: Mapping[str, np.ndarray], **kwargs) -> str:
  """Writes `image_grid(rows)` as an 8-bit PNG at ``path`` and returns the path."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  grid = image_grid(rows, **kwargs)
  Image.fromarray(np.round(grid * 255).astype(np.uint8)).save(path)
  return path


def heat_colors(values: np.ndarray) -> np.ndarray:
  """``values`` in [0, 1] -> RGB ``(..., 3)`` on a black-red-yellow-white ramp: ``r = 3v``, ``g = 3v - 1``,
  ``b = 3v - 2``, each clipped to [0, 1]."""
  values = np.asarray(values, np.float32)[..., None]
  return np.clip(3 * values - np.arange(3, dtype=np.float32), 0.0, 1.0)


def attention_rows(images: np.ndarray, maps: np.ndarray, *, alpha: float = 0.6) -> dict[str, np.ndarray]:
  """`image_grid` rows, one per image: the image, then each head's map as a heat map over it.

  Args:
    images: ``(B, H, W, C)`` in [0, 1].
    maps: ``(B, heads, gh, gw)`` with ``gh`` and ``gw`` dividing ``H`` and ``W`` (a ViT's patch grid); each map
      is stretched to [0, 1] on its own (heads differ in how peaked they are; the picture shows where each
      looks), enlarged to the image by repeating each patch's value, and blended as
      ``(1 - alpha) * image + alpha * heat``.
  """
  images, maps = np.asarray(images, np.float32), np.asarray(maps, np.float32)
  height, width = images.shape[1:3]
  if height % maps.shape[2] or width % maps.shape[3]:
    raise ValueError(f"maps of grid {maps.shape[2:]} do not tile images of {height}x{width} pixels")
  low, high = maps.min(axis=(2, 3), keepdims=True), maps.max(axis=(2, 3), keepdims=True)
  maps = (maps - low) / np.maximum(high - low, 1e-12)
  maps = np.repeat(np.repeat(maps, height // maps.shape[2], axis=2), width // maps.shape[3], axis=3)
  rgb = np.broadcast_to(images, (*images.shape[:3], 3))  # grey images become grey RGB
  overlays = (1 - alpha) * rgb[:, None] + alpha * heat_colors(maps)
  return {f"image {i}": np.concatenate([rgb[i][None], overlays[i]]) for i in range(len(images))}


def save_attention_grid(path: str, images: np.ndarray, maps: np.ndarray, **kwargs) -> str:
  """Writes `attention_rows(images, maps)` as a PNG grid (`save_image_grid`) and returns the path."""
  return save_image_grid(path, attention_rows(images, maps), **kwargs)
