"""Pictures people want to look at: image grids written as PNG."""
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
