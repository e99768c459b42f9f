"""Image ops on uint8 (H, W, C) numpy arrays, C = 1 or 3.

Random ops take a ``np.random.Generator`` and draw from nothing else, so an op's output is a pure
function of its inputs and the generator's state. Resizing uses PIL, whose bilinear and bicubic
filters antialias when downscaling (as torchvision does for PIL images).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

INTERPOLATIONS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


def resize(image: np.ndarray, height: int, width: int,
           interpolation: str = "bicubic") -> np.ndarray:
  """Resizes a uint8 (H, W, C) image to (height, width, C)."""
  if interpolation not in INTERPOLATIONS:
    raise ValueError(f"interpolation {interpolation!r} is unknown; choose one of "
                     f"{tuple(INTERPOLATIONS)}")
  if image.shape[:2] == (height, width):
    return image
  channels = image.shape[-1]
  if channels not in (1, 3):
    raise ValueError(f"resize needs 1 or 3 channels; got image of shape {image.shape}")
  # PIL has no single-channel-with-axis mode: grayscale goes in as a 2-D 'L' image.
  pil = Image.fromarray(image[..., 0] if channels == 1 else image)
  out = np.asarray(pil.resize((width, height), resample=INTERPOLATIONS[interpolation]))
  return out.reshape(height, width, channels)


def sample_crop_box(height: int, width: int, rng: np.random.Generator,
                    scale: Sequence[float] = (0.2, 1.0),
                    ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """Samples a crop box ``(top, left, crop_height, crop_width)`` the way torchvision does.

  Follows ``torchvision.transforms.RandomResizedCrop.get_params``: up to 10 tries of an area
  fraction uniform in ``scale`` and an aspect ratio (width / height) log-uniform in ``ratio``,
  rounded to whole pixels and kept if it fits; the offset is then uniform. If no try fits: the
  central crop of the whole image, clamped to the ratio range.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect_ratio)))
    h = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int,
                        scale: Sequence[float] = (0.2, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3),
                        interpolation: str = "bicubic") -> np.ndarray:
  """Crops a box from ``sample_crop_box`` and resizes it to (size, size, C)."""
  top, left, h, w = sample_crop_box(image.shape[0], image.shape[1], rng, scale, ratio)
  return resize(image[top:top + h, left:left + w], size, size, interpolation)


def horizontal_flip(image: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
  """Mirrors left-right with probability ``p`` (one draw from ``rng`` whatever ``p`` is)."""
  return image[:, ::-1] if rng.random() < p else image


def resize_shorter_and_center_crop(image: np.ndarray, size: int, crop_fraction: float = 0.875,
                                   interpolation: str = "bicubic") -> np.ndarray:
  """Evaluation view: the centre ``size`` x ``size`` crop after resizing the shorter side.

  The shorter side becomes ``round(size / crop_fraction)`` (256 for 224 at 0.875) so the crop keeps
  ``crop_fraction`` of it, as in the standard ImageNet evaluation. An image that is already
  ``size`` x ``size`` is returned unchanged: small datasets are evaluated at their native size.
  """
  height, width = image.shape[:2]
  if (height, width) == (size, size):
    return image
  shorter = int(round(size / crop_fraction))
  # torchvision's rule: the longer side scales proportionally and is truncated.
  if height <= width:
    new_height, new_width = shorter, int(shorter * width / height)
  else:
    new_height, new_width = int(shorter * height / width), shorter
  image = resize(image, new_height, new_width, interpolation)
  top = int(round((new_height - size) / 2))
  left = int(round((new_width - size) / 2))
  return image[top:top + size, left:left + size]


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """Maps uint8 pixels to float32 ``(pixel / 255 - mean) / std``, per channel (last axis).

  ``mean`` and ``std`` are on the [0, 1] scale (ImageNet: (0.485, 0.456, 0.406), (0.229, 0.224,
  0.225)). Works on a single image or a batch.
  """
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  # One fused scale-and-shift instead of three passes over a large batch.
  return image.astype(np.float32) * (1 / (255 * std)) - mean / std
