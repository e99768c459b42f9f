"""Inpainting regions (Pathak et al., CVPR 2016, context encoders): which pixels to hide, how to weigh them.

A region is a boolean ``(B, H, W)`` pixel mask, True = missing. Two kinds, each covering exactly a quarter of
the image:

- `central_region`: the central ``H/2 x W/2`` square, rows and columns ``[H/4, H/4 + H/2)`` (``H``, ``W``
  even): exactly ``H W / 4`` pixels.
- `random_blocks`: the image is tiled by ``b x b`` blocks (``b`` divides ``H`` and ``W``, and the
  ``n = (H/b)(W/b)`` blocks split into quarters); exactly ``n / 4`` of them, a uniformly random subset per
  image, are missing, and the tiling is then shifted by a uniform offset in ``[0, b)`` along each axis
  (wrapping around the border), so blocks do not sit on a fixed grid. Exactly ``H W / 4`` pixels. It stands
  in for Pathak's "random block" and "random region" masks (blocks / PASCAL segment shapes covering up to a
  quarter, ~20-30% in the reference ``train_random.lua``), with an exact area so that every step masks alike.

Missing pixels are filled with the dataset mean, 0 after normalisation (`fill_regions`; the reference fills
its [-1, 1] images with ImageNet's mean pixel).

Loss weights (`loss_weights`): 1 on the region and ``overlap_weight`` (Pathak: 10) on the overlap band, the
visible pixels within Chebyshev distance ``overlap`` (4) of the region (`overlap_band`), 0 elsewhere. In the
reference ``train.lua`` (``overlapPred=4``) the predicted square is the central ``H/2`` one, the hole is that
square shrunk by 4 px on every side and the 4 px rim, visible in the input, weighs 10x; here the region itself
is the quarter that goes missing and the band lies outside it, the same geometry with the square grown by
the band (a hole of ``H/2``, a predicted square of ``H/2 + 8``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sslx import losses

REGIONS = ("center", "random_blocks")


def central_region(batch: int, height: int, width: int):
  """``(B, H, W)`` bool: the central ``H/2 x W/2`` square of every image."""
  rows = (jnp.arange(height) >= height // 4) & (jnp.arange(height) < height // 4 + height // 2)
  cols = (jnp.arange(width) >= width // 4) & (jnp.arange(width) < width // 4 + width // 2)
  return jnp.broadcast_to(rows[:, None] & cols[None, :], (batch, height, width))


def random_blocks(key, batch: int, height: int, width: int, block_size: int):
  """``(B, H, W)`` bool: a quarter of the ``block_size`` blocks of each image, shifted (module docstring)."""
  grid = (height // block_size, width // block_size)
  num_blocks = grid[0] * grid[1]
  choice_key, shift_key = jax.random.split(key)
  ranks = jnp.argsort(jnp.argsort(jax.random.uniform(choice_key, (batch, num_blocks)), axis=1), axis=1)
  blocks = (ranks < num_blocks // 4).reshape(batch, *grid)
  pixels = jnp.repeat(jnp.repeat(blocks, block_size, axis=1), block_size, axis=2)
  shifts = jax.random.randint(shift_key, (batch, 2), 0, block_size)
  return jax.vmap(lambda mask, shift: jnp.roll(mask, (shift[0], shift[1]), axis=(0, 1)))(pixels, shifts)


def overlap_band(region, overlap: int):
  """``(B, H, W)`` bool: pixels outside ``region`` within Chebyshev distance ``overlap`` of it."""
  window = 2 * overlap + 1
  grown = jax.lax.reduce_window(region.astype(jnp.int32), 0, jax.lax.max, (1, window, window), (1, 1, 1),
                                ((0, 0), (overlap, overlap), (overlap, overlap)))
  return (grown > 0) & ~region


def loss_weights(region, overlap: int, overlap_weight: float):
  """``(B, H, W)`` float32: 1 on the region, ``overlap_weight`` on its `overlap_band`, 0 elsewhere."""
  band = overlap_band(region, overlap)
  return jnp.where(region, 1.0, jnp.where(band, jnp.float32(overlap_weight), 0.0)).astype(jnp.float32)


def fill_regions(images, region):
  """The images with the region's pixels set to 0, the dataset mean after normalisation."""
  return jnp.where(region[..., None], jnp.zeros((), images.dtype), images)


def region_l2_loss(pred, target, weights):
  """Pathak's weighted L2 over the predicted pixels (the region and its overlap band):

    ``loss = sum_{b, q} w_bq sum_c (pred_bqc - target_bqc)^2 / (C * #{(b, q) : w_bq > 0})``,

  ``q`` a pixel, ``c`` a channel: the weighted squared error averaged over the predicted pixels, as the
  reference scales ``MSECriterion``'s gradient (a mean over the predicted square) by its weight matrix. It is
  `losses.masked_reconstruction_loss` with each pixel as a "patch" of ``C`` values and ``w`` as the mask (a
  weighted mean, divided by ``sum w``), rescaled by ``sum w / #{w > 0}``. Computed in float32.

  Args:
    pred, target: ``(B, H, W, C)``.
    weights: ``(B, H, W)`` non-negative, e.g. `loss_weights`.
  """
  batch, height, width, channels = target.shape
  as_pixels = lambda x: jnp.reshape(jnp.asarray(x, jnp.float32), (batch, height * width, channels))
  weights = jnp.reshape(jnp.asarray(weights, jnp.float32), (batch, height * width))
  weighted_mean = losses.masked_reconstruction_loss(as_pixels(pred), as_pixels(target), weights,
                                                    norm_pix=False, p=2)
  return weighted_mean * jnp.sum(weights) / jnp.sum((weights > 0).astype(jnp.float32))
