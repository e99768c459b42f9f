"""Conversion between NHWC images and sequences of flattened patches.

Each patch is flattened in (row-in-patch, column-in-patch, channel) order and patches are listed in
row-major order over the patch grid. This is the layout of the reference MAE code and of Hugging Face
``ViTMAEForPreTraining.patchify``, and it matches the flattening of a ``(p, p, C, D)`` convolution kernel,
so ``patchify(x) @ kernel.reshape(-1, D)`` equals the strided patch-embedding convolution.
"""
from __future__ import annotations

import collections
from typing import Optional, Sequence

import jax.numpy as jnp


def patchify(images, patch_size: int):
  """Splits images into flattened, non-overlapping patches.

  Args:
    images: ``(B, H, W, C)`` array.
    patch_size: side ``p`` of a square patch; must divide both H and W.

  Returns:
    ``(B, L, p * p * C)`` array with ``L = (H / p) * (W / p)``.
  """
  b, h, w, c = images.shape
  if h % patch_size or w % patch_size:
    raise ValueError(f"Image size {h}x{w} is not divisible by patch size {patch_size}.")
  gh, gw = h // patch_size, w // patch_size
  x = jnp.reshape(images, (b, gh, patch_size, gw, patch_size, c))
  x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
  return jnp.reshape(x, (b, gh * gw, patch_size * patch_size * c))


def unpatchify(patches, patch_size: int, image_hw: Optional[Sequence[int]] = None,
               channels: Optional[int] = None):
  """Inverse of :func:`patchify`.

  Args:
    patches: ``(B, L, p * p * C)`` array.
    patch_size: side ``p`` of a square patch.
    image_hw: ``(H, W)`` of the image in pixels; ``None`` assumes a square patch grid.
    channels: ``C``; ``None`` infers it from the patch vector length.

  Returns:
    ``(B, H, W, C)`` array.
  """
  b, num_patches, dim = patches.shape
  if channels is None:
    channels = dim // (patch_size * patch_size)
  if patch_size * patch_size * channels != dim:
    raise ValueError(f"Patch vectors of length {dim} do not hold {patch_size}x{patch_size} patches with "
                     f"{channels} channels.")
  if image_hw is None:
    side = int(round(num_patches ** 0.5))
    image_hw = (side * patch_size, side * patch_size)
  h, w = image_hw
  if h % patch_size or w % patch_size:
    raise ValueError(f"Image size {h}x{w} is not divisible by patch size {patch_size}.")
  gh, gw = h // patch_size, w // patch_size
  if gh * gw != num_patches:
    raise ValueError(f"{num_patches} patches do not tile a {h}x{w} image with patch size {patch_size}.")
  x = jnp.reshape(patches, (b, gh, gw, patch_size, patch_size, channels))
  x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
  return jnp.reshape(x, (b, h, w, channels))


def reconstruction_rows(images, pred, mask, patch_size: int) -> collections.OrderedDict:
  """The picture rows of a masked-reconstruction method: the images, their visible patches (masked ones
  black) and the visible patches completed by the predicted ones.

  ``images`` ``(B, H, W, C)``; ``pred`` ``(B, L, p * p * C)`` in pixel space; ``mask`` ``(B, L)``, nonzero =
  masked.
  """
  target = patchify(images, patch_size)
  masked = jnp.asarray(mask, jnp.float32)[..., None]
  visible = target * (1.0 - masked)
  image_hw = images.shape[1:3]
  # An OrderedDict keeps its row order through jit (a plain dict comes back with sorted keys).
  return collections.OrderedDict(
      original=images,
      masked=unpatchify(visible, patch_size, image_hw),
      reconstruction=unpatchify(visible + pred * masked, patch_size, image_hw))
