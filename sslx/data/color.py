"""Photometric ops on uint8 (H, W, C) images, C = 1 or 3: colour jitter, grayscale, blur, solarize.

The definitions are torchvision's, which the SimCLR, MoCo, BYOL and DINO recipes use:
brightness blends with black, contrast with the mean luma, saturation with the luma image, and hue
is a shift in HSV space; luma is 0.299 R + 0.587 G + 0.114 B (ITU-R 601-2, as PIL's 'L' mode).
Unlike torchvision, which rounds to uint8 after each adjustment, colour jitter stays in float32
(clipped to [0, 255] after each adjustment, as torchvision clips) and rounds once at the end.

Random ops take a ``np.random.Generator``. Each first draws one uniform number to decide whether it
applies (``< p``), whatever ``p`` is, and draws its parameters only when it applies.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def luma(image: np.ndarray) -> np.ndarray:
  """float32 (H, W, 1) luma of an RGB image; a 1-channel image is its own luma."""
  image = np.asarray(image, np.float32)
  if image.shape[-1] == 1:
    return image
  return image @ np.asarray(LUMA_WEIGHTS, np.float32)[:, None]


def _blend(image: np.ndarray, other, factor: float) -> np.ndarray:
  """``other + factor * (image - other)`` clipped to [0, 255]: factor 0 gives ``other``."""
  # In place after the first subtraction: fresh image-sized buffers cost page faults.
  out = image - other
  out *= np.float32(factor)
  out += other
  return np.clip(out, 0, 255, out=out)


def adjust_brightness(image: np.ndarray, factor: float) -> np.ndarray:
  """Scales pixel values by ``factor`` (a blend with black); float32 in [0, 255]."""
  return _blend(np.asarray(image, np.float32), 0, factor)


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
  """Blends with the image's mean luma, a single gray value; float32 in [0, 255]."""
  image = np.asarray(image, np.float32)
  return _blend(image, luma(image).mean(), factor)


def adjust_saturation(image: np.ndarray, factor: float) -> np.ndarray:
  """Blends with the luma image (factor 0 is grayscale); float32 in [0, 255]."""
  image = np.asarray(image, np.float32)
  return _blend(image, luma(image), factor)


def adjust_hue(image: np.ndarray, shift: float) -> np.ndarray:
  """Rotates hue by ``shift`` turns (in [-0.5, 0.5]) in HSV space; float32 in [0, 255].

  Saturation and value, hence each pixel's largest and smallest channel, are unchanged. A
  1-channel image has no hue and is returned as is.
  """
  image = np.asarray(image, np.float32)
  if image.shape[-1] == 1:
    return image
  # Per-channel 2-D arrays: numpy reduces and takes remainders over a length-3 axis slowly.
  red, green, blue = image[..., 0], image[..., 1], image[..., 2]
  value = np.maximum(np.maximum(red, green), blue)
  chroma = value - np.minimum(np.minimum(red, green), blue)
  safe_chroma = np.where(chroma > 0, chroma, 1)
  # Hue in sixths of a turn, in [-1, 5], from the sector of the largest channel (red on ties).
  sixths = np.where(value == red, (green - blue) / safe_chroma,
                    np.where(value == green, (blue - red) / safe_chroma + 2,
                             (red - green) / safe_chroma + 4))
  sixths = _wrap_sixths(sixths + np.float32(6 * shift))
  # HSV -> RGB as channel n = V - C * clip(min(k, 4 - k), 0, 1), k = (n + 6 H) mod 6, n = 5, 3, 1.
  channels = []
  for n in (5, 3, 1):
    k = _wrap_sixths(sixths + n)
    channels.append(value - chroma * np.clip(np.minimum(k, 4 - k), 0, 1))
  return np.stack(channels, axis=-1)


def _wrap_sixths(x: np.ndarray) -> np.ndarray:
  """``x mod 6`` for ``x`` in [-6, 12), without numpy's slow float remainder."""
  x = np.where(x < 0, x + 6, x)
  return np.where(x >= 6, x - 6, x)


_ADJUSTMENTS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(image: np.ndarray, rng: np.random.Generator, *, brightness: float = 0.0,
                 contrast: float = 0.0, saturation: float = 0.0, hue: float = 0.0,
                 p: float = 1.0) -> np.ndarray:
  """torchvision's ``RandomApply([ColorJitter(brightness, contrast, saturation, hue)], p)``.

  With probability ``p``, applies the four adjustments in a random order, with factors uniform in
  ``[max(0, 1 - x), 1 + x]`` for brightness, contrast and saturation and a hue shift uniform in
  ``[-hue, hue]``; an adjustment whose strength is 0 is skipped. SimCLR's strength ``s`` is
  ``brightness = contrast = saturation = 0.8 s``, ``hue = 0.2 s``.

  Draws, after the apply-or-not draw: a permutation of the four adjustments, then the factors of
  the non-zero strengths in the order brightness, contrast, saturation, hue.
  """
  if rng.random() >= p:
    return image
  order = rng.permutation(4)
  factors: list[Optional[float]] = [None] * 4
  for i, strength in enumerate((brightness, contrast, saturation)):
    if strength > 0:
      factors[i] = rng.uniform(max(0.0, 1 - strength), 1 + strength)
  if hue > 0:
    factors[3] = rng.uniform(-hue, hue)
  out = np.asarray(image, np.float32)
  for i in order:
    if factors[i] is not None:
      out = _ADJUSTMENTS[i](out, factors[i])
  return np.rint(out).astype(np.uint8)


def to_grayscale(image: np.ndarray) -> np.ndarray:
  """The rounded luma, repeated to the image's channel count (uint8)."""
  if image.shape[-1] == 1:
    return image
  gray = np.rint(luma(image)).astype(np.uint8)
  return np.repeat(gray, image.shape[-1], axis=-1)


def random_grayscale(image: np.ndarray, rng: np.random.Generator, p: float = 0.2) -> np.ndarray:
  """``to_grayscale`` with probability ``p`` (torchvision's ``RandomGrayscale``)."""
  return to_grayscale(image) if rng.random() < p else image


def blur_kernel_size(height: int, width: int) -> int:
  """SimCLR's kernel size, about a tenth of the image: ``2 * (min(height, width) // 20) + 1``.

  23 for 224 pixels, 3 for 32; 1 (no blur) below 20 pixels.
  """
  return 2 * (min(height, width) // 20) + 1


def gaussian_blur(image: np.ndarray, sigma: float, kernel_size: int) -> np.ndarray:
  """Separable Gaussian blur with an odd ``kernel_size``, as ``torchvision.transforms.GaussianBlur``.

  The kernel is ``exp(-x**2 / (2 sigma**2))`` at the integer offsets ``|x| <= kernel_size // 2``,
  normalised to sum 1; borders are reflected without repeating the edge pixel ('reflect').
  """
  if kernel_size < 1 or kernel_size % 2 == 0:
    raise ValueError(f"kernel_size must be odd and positive; got {kernel_size}")
  radius = kernel_size // 2
  offsets = np.arange(1, radius + 1, dtype=np.float32)
  side = np.exp(-0.5 * (offsets / np.float32(sigma)) ** 2)
  center = 1 / (1 + 2 * side.sum())
  side *= center
  out = np.asarray(image, np.float32)
  for _ in range(2):
    # Blurs along the leading axis, where shifted slices are contiguous, then swaps H and W.
    n = out.shape[0]
    padded = np.pad(out, [(radius, radius), (0, 0), (0, 0)], mode="reflect")
    blurred = center * out
    pair = np.empty_like(out)
    # The kernel is symmetric: the pixels at offsets -d and +d share one multiply.
    for d, weight in enumerate(side, start=1):
      np.add(padded[radius - d:radius - d + n], padded[radius + d:radius + d + n], out=pair)
      pair *= weight
      blurred += pair
    out = np.ascontiguousarray(blurred.transpose(1, 0, 2))
  return np.rint(out).astype(np.uint8)


def random_gaussian_blur(image: np.ndarray, rng: np.random.Generator, p: float = 0.5,
                         sigma: Sequence[float] = (0.1, 2.0),
                         kernel_size: Optional[int] = None) -> np.ndarray:
  """With probability ``p``, ``gaussian_blur`` with sigma uniform in ``sigma``.

  ``kernel_size`` defaults to ``blur_kernel_size`` of the image.
  """
  if rng.random() >= p:
    return image
  std = rng.uniform(sigma[0], sigma[1])
  kernel_size = kernel_size or blur_kernel_size(image.shape[0], image.shape[1])
  return image if kernel_size == 1 else gaussian_blur(image, std, kernel_size)


def solarize(image: np.ndarray, threshold: int = 128) -> np.ndarray:
  """Inverts the pixels ``>= threshold`` (torchvision's and PIL's ``solarize``)."""
  return np.where(image >= threshold, 255 - image, image)


def random_solarize(image: np.ndarray, rng: np.random.Generator, p: float = 0.2,
                    threshold: int = 128) -> np.ndarray:
  """``solarize`` with probability ``p``."""
  return solarize(image, threshold) if rng.random() < p else image
