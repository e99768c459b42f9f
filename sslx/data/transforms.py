"""Image ops on uint8 (H, W, C) numpy arrays, C = 1 or 3, and augmentations composed from a spec.

Random ops take a ``np.random.Generator`` and draw from nothing else, so an op's output is a pure
function of its inputs and the generator's state. Resizing uses PIL, whose bilinear and bicubic
filters antialias when downscaling (as torchvision does for PIL images). Colour ops are in
``color.py``.

``build_augmentation`` turns a spec string such as SimCLR's::

  random_resized_crop(224, scale=(0.08, 1))|hflip|color_jitter(1.0, p=0.8)|grayscale(p=0.2)|blur

into a picklable callable ``(image, rng) -> image``. The ops and their defaults:

  random_resized_crop(size, scale=(0.2, 1.0), ratio=(3/4, 4/3), interpolation='bicubic')
  center_crop(size, crop_fraction=0.875, interpolation='bicubic')  resize_shorter_and_center_crop
  hflip(p=0.5)
  color_jitter(strength=1.0, *, p=0.8, brightness=, contrast=, saturation=, hue=)
      SimCLR's strength s: brightness = contrast = saturation = 0.8 s, hue = 0.2 s; a keyword
      overrides one (e.g. BYOL's color_jitter(brightness=0.4, contrast=0.4, saturation=0.2,
      hue=0.1)); see color.color_jitter
  grayscale(p=0.2)                                    color.random_grayscale
  blur(p=0.5, sigma=(0.1, 2.0), kernel_size=None)     color.random_gaussian_blur, ~10% kernel
  solarize(p=0.2, threshold=128)                      color.random_solarize
  normalize(mean=None, std=None)   float32 output, so last; defaults from build_augmentation
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np
from PIL import Image

from sslx.data import color

# The largest crop side (and model input side) accepted: validation runs every spec once, so a mistyped
# size would otherwise allocate gigabytes before any error is shown.
MAX_SIZE = 4096

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


# --- Augmentations composed from a spec -----------------------------------------------------------

_OPS: dict[str, Callable[..., Callable]] = {}
# Ops after which every image has the same size: the side is their 'size' argument.
_SIZING_OPS = ("random_resized_crop", "center_crop")


class OpCall(NamedTuple):
  """One parsed op of a spec: ``name(*args, **kwargs)``, and its text for error messages."""
  name: str
  args: tuple[Any, ...]
  kwargs: dict[str, Any]
  text: str


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """Ops applied in order to a uint8 (H, W, C) image; picklable, so grain can send it to workers.

  Attributes:
    spec: the spec it was built from.
    ops: callables ``(image, rng) -> image``.
    output_size: side of the square output if the spec has a crop op, else None (sizes vary).
    normalizes: whether the output is normalized float32 (``normalize`` ends the spec).
  """
  spec: str
  ops: tuple[Callable[[np.ndarray, np.random.Generator], np.ndarray], ...]
  output_size: Optional[int]
  normalizes: bool

  def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    for op in self.ops:
      image = op(image, rng)
    return image


def register_op(name: str):
  """Registers ``builder(*args, **kwargs) -> op`` as the spec op ``name``.

  The builder checks its arguments, raising ``ValueError``, and returns a picklable ``op(image,
  rng) -> image``, e.g. a ``functools.partial`` of a module-level function.
  """
  def decorator(builder):
    _OPS[name] = builder
    return builder
  return decorator


def parse_ops(spec: str) -> list[OpCall]:
  """Parses ``'op|op(args)|...'``; arguments are Python literals (numbers, tuples, strings...).

  Raises:
    ValueError: the spec is not of that form, naming the offending part.
  """
  if not isinstance(spec, str):
    raise ValueError(f"an augmentation spec is a string 'op|op(args)|...'; got {spec!r}")
  try:
    node = ast.parse(spec.strip(), mode="eval").body
  except SyntaxError as e:
    raise ValueError(f"augmentation spec {spec!r} is not of the form 'op|op(args)|...': "
                     f"{e.msg}") from None
  # 'a|b|c' parses as (a | b) | c: unfold the left-nested chain.
  terms = []
  while isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
    terms.append(node.right)
    node = node.left
  terms.append(node)
  return [_parse_term(spec.strip(), term) for term in reversed(terms)]


def _parse_term(spec: str, term: ast.expr) -> OpCall:
  text = ast.get_source_segment(spec, term)
  if isinstance(term, ast.Name):
    return OpCall(term.id, (), {}, text)
  if not (isinstance(term, ast.Call) and isinstance(term.func, ast.Name)):
    raise ValueError(f"augmentation op {text!r} is not of the form name or name(args)")
  try:
    args = tuple(ast.literal_eval(arg) for arg in term.args)
    kwargs = {keyword.arg: ast.literal_eval(keyword.value) for keyword in term.keywords
              if keyword.arg is not None}
  except (ValueError, TypeError):
    raise ValueError(f"augmentation op {text!r}: arguments must be Python literals") from None
  if len(kwargs) != len(term.keywords):
    raise ValueError(f"augmentation op {text!r}: '**' arguments are not supported")
  return OpCall(term.func.id, args, kwargs, text)


def build_augmentation(spec: str, *, mean: Optional[Sequence[float]] = None,
                       std: Optional[Sequence[float]] = None) -> Augmentation:
  """Builds the ``Augmentation`` that ``spec`` describes (the ops are in the module docstring).

  Args:
    spec: ops separated by '|', each ``name`` or ``name(args)``.
    mean: default of ``normalize``'s mean, e.g. ``config.data.mean``.
    std: default of ``normalize``'s std.

  Raises:
    ValueError: naming the op of the spec that is unknown, has bad arguments or is misplaced.
  """
  calls = parse_ops(spec)
  ops, output_size = [], None
  for position, call in enumerate(calls):
    where = f"augmentation op {call.text!r}"
    if call.name not in _OPS:
      raise ValueError(f"{where}: unknown op {call.name!r}; known ops: {sorted(_OPS)}")
    builder = _OPS[call.name]
    try:
      bound = inspect.signature(builder).bind(*call.args, **call.kwargs)
    except TypeError as e:
      raise ValueError(f"{where}: {e}; its arguments are "
                       f"{call.name}{inspect.signature(builder)}") from None
    if call.name == "normalize":
      if position != len(calls) - 1:
        raise ValueError(f"{where}: normalize must be the last op, as it makes float32 images")
      bound.arguments.setdefault("mean", mean)
      bound.arguments.setdefault("std", std)
    try:
      ops.append(builder(*bound.args, **bound.kwargs))
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None
    if call.name in _SIZING_OPS:
      output_size = bound.arguments["size"]
  return Augmentation(spec, tuple(ops), output_size, calls[-1].name == "normalize")


def _check(ok: bool, name: str, value: Any, expected: str) -> None:
  if not ok:
    raise ValueError(f"{name}={value!r} is invalid; expected {expected}")


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_probability(p: Any) -> None:
  _check(_is_number(p) and 0 <= p <= 1, "p", p, "a number in [0, 1]")


def _check_interval(name: str, value: Any, low: float, high: float) -> None:
  ok = (isinstance(value, (tuple, list)) and len(value) == 2 and all(map(_is_number, value))
        and low < value[0] <= value[1] <= high)
  _check(ok, name, value, f"(a, b) with {low} < a <= b <= {high}")


def _check_size(size: Any) -> None:
  _check(isinstance(size, int) and not isinstance(size, bool) and 0 < size <= MAX_SIZE, "size", size,
         f"an int in [1, {MAX_SIZE}]")


def _check_interpolation(interpolation: Any) -> None:
  _check(isinstance(interpolation, str) and interpolation in INTERPOLATIONS, "interpolation",
         interpolation, f"one of {tuple(INTERPOLATIONS)}")


def _without_rng(function: Callable[..., np.ndarray], image: np.ndarray,
                 rng: np.random.Generator, **kwargs) -> np.ndarray:
  del rng  # deterministic op
  return function(image, **kwargs)


@register_op("random_resized_crop")
def _random_resized_crop_op(size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
                            interpolation="bicubic"):
  _check_size(size)
  _check_interval("scale", scale, 0, 1)
  _check_interval("ratio", ratio, 0, math.inf)
  _check_interpolation(interpolation)
  return functools.partial(random_resized_crop, size=size, scale=tuple(scale), ratio=tuple(ratio),
                           interpolation=interpolation)


@register_op("center_crop")
def _center_crop_op(size, crop_fraction=0.875, interpolation="bicubic"):
  _check_size(size)
  _check(_is_number(crop_fraction) and 0 < crop_fraction <= 1, "crop_fraction", crop_fraction,
         "a number in (0, 1]")
  _check_interpolation(interpolation)
  return functools.partial(_without_rng, resize_shorter_and_center_crop, size=size,
                           crop_fraction=crop_fraction, interpolation=interpolation)


@register_op("hflip")
def _hflip_op(p=0.5):
  _check_probability(p)
  return functools.partial(horizontal_flip, p=p)


@register_op("color_jitter")
def _color_jitter_op(strength=1.0, *, p=0.8, brightness=None, contrast=None, saturation=None,
                     hue=None):
  _check(_is_number(strength) and strength >= 0, "strength", strength, "a number >= 0")
  _check_probability(p)
  strengths = dict(brightness=0.8 * strength, contrast=0.8 * strength,
                   saturation=0.8 * strength, hue=0.2 * strength)
  given = dict(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)
  strengths.update({key: value for key, value in given.items() if value is not None})
  for key, value in strengths.items():
    limit = 0.5 if key == "hue" else math.inf
    _check(_is_number(value) and 0 <= value <= limit, key, value,
           f"a number in [0, {limit}]" + (" (hue = 0.2 * strength)" if key == "hue" else ""))
  return functools.partial(color.color_jitter, p=p, **strengths)


@register_op("grayscale")
def _grayscale_op(p=0.2):
  _check_probability(p)
  return functools.partial(color.random_grayscale, p=p)


@register_op("blur")
def _blur_op(p=0.5, sigma=(0.1, 2.0), kernel_size=None):
  _check_probability(p)
  _check_interval("sigma", sigma, 0, math.inf)
  _check(kernel_size is None or (isinstance(kernel_size, int) and kernel_size > 0
                                 and kernel_size % 2 == 1),
         "kernel_size", kernel_size, "None (about 10% of the image) or an odd int > 0")
  return functools.partial(color.random_gaussian_blur, p=p, sigma=tuple(sigma),
                           kernel_size=kernel_size)


@register_op("solarize")
def _solarize_op(p=0.2, threshold=128):
  _check_probability(p)
  _check(isinstance(threshold, int) and 0 <= threshold <= 256, "threshold", threshold,
         "an int in [0, 256]")
  return functools.partial(color.random_solarize, p=p, threshold=threshold)


@register_op("normalize")
def _normalize_op(mean=None, std=None):
  for name, values in (("mean", mean), ("std", std)):
    _check(isinstance(values, (tuple, list)) and len(values) in (1, 3)
           and all(map(_is_number, values)), name, values,
           "1 or 3 numbers (in the spec, or config.data's through build_augmentation)")
  _check(len(mean) == len(std) and min(std) > 0, "std", std, f"{len(mean)} number(s) > 0")
  return functools.partial(_without_rng, normalize, mean=tuple(mean), std=tuple(std))

