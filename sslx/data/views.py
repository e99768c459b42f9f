"""What a batch holds, and the per-example grain transforms that make it.

Training batches (``pipeline.TrainLoader``), ``B`` rows per process::

  without views (config.data.views None):
    'image'   float32 (B, S, S, C)      S = config.data.image_size
    'label'   int32 (B,)                -1 for unlabeled data
  with config.data.views = (spec_0, ..., spec_{V-1}):
    'view_i'  float32 (B, S_i, S_i, C)  for i < V; S_i is the crop size of spec_i
    'label'   int32 (B,)

Evaluation batches (``pipeline.EvalLoader``) hold 'image' and 'label' plus ``'mask'`` bool (B,),
False for padding rows and for files that could not be decoded.

A view is an augmentation spec (``transforms.build_augmentation`` lists the ops). A method asks for
one spec per view, e.g. SimCLR: two ``'random_resized_crop(224, scale=(0.08, 1))|hflip|...'``; DINO:
two global ``'random_resized_crop(224, scale=(0.4, 1))|...'`` then N local
``'random_resized_crop(96, scale=(0.05, 0.4))|...'``. Views omit 'image': a method reads the
views it asked for by position, and one array never goes by two names. The first view's size must
be ``image_size`` (the model's input size); later ones may be smaller, as DINO's local crops are.

Randomness: an example's generator comes from grain (seed, stream position). Without views it
augments 'image' directly; with views it seeds one generator per view from (a number drawn from
it, view index), so views are independent: view i is unchanged when another view's spec changes.

Without views, ``config.data.augmentation`` (a spec whose crop size is ``image_size``) makes
'image'; None means a random resized crop and optional flip from ``config.data.augment``. Images of
a spec that does not end in ``normalize`` are normalized per batch with ``config.data.mean`` and
``std``, one vectorised pass instead of one per image.

With ``config.data.augment_on='device'`` the workers run only each spec's leading crops and flips
(``device_augment.split_spec``) and the views stay uint8 (B, S_i, S_i, C); the jitted step finishes
them with ``device_augment.build_device_augmentation``, which gives the float32 views above.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import grain
import numpy as np

from sslx.data import sources
from sslx.data import transforms

# A small odd-shaped image on which every configured augmentation runs once during validation, so
# that a spec which fails on the data's channels (e.g. a 3-value normalize on grayscale) fails
# before the run starts rather than in a worker process.
_PROBE_SHAPE = (20, 27)


def default_spec(data_config) -> str:
  """The spec that ``config.data.augment`` describes: random resized crop, then optional hflip."""
  aug = data_config.augment
  spec = (f"random_resized_crop({data_config.image_size}, "
          f"scale={tuple(map(float, aug.crop_scale))!r}, "
          f"ratio={tuple(map(float, aug.crop_ratio))!r}, interpolation={aug.interpolation!r})")
  return spec + "|hflip" if aug.hflip else spec


def view_specs(data_config) -> dict[str, tuple[str, str]]:
  """``{batch key: (config key, spec)}`` of the training views, e.g. ``{'view_0': ('views[0]', ...)}``.

  Raises:
    ValueError: both ``config.data.augmentation`` and ``views`` are set, or ``views`` is not a
      non-empty list of strings.
  """
  augmentation = data_config.get("augmentation")
  specs = data_config.get("views")
  if specs is None:
    return {"image": ("augmentation", default_spec(data_config) if augmentation is None
                      else augmentation)}
  if augmentation is not None:
    raise ValueError("config.data.augmentation and config.data.views are both set; with views "
                     "each view's spec is its whole augmentation, so set only config.data.views")
  if (not isinstance(specs, (tuple, list)) or not specs
      or not all(isinstance(spec, str) for spec in specs)):
    raise ValueError(f"config.data.views={specs!r} is invalid; expected None or a non-empty "
                     "list of augmentation spec strings, one per view")
  return {f"view_{i}": (f"views[{i}]", spec) for i, spec in enumerate(specs)}


def build_views(data_config,
                host_part: Optional[Callable[[str], str]] = None) -> dict[str, transforms.Augmentation]:
  """The batch key and augmentation of every training view, checked (see the module docstring).

  Args:
    data_config: ``config.data``.
    host_part: maps a view's spec to the part that runs here, in the data workers
      (``device_augment.host_part`` with ``config.data.augment_on='device'``); None: all of it.

  Raises:
    ValueError: naming ``config.data.augmentation`` or ``config.data.views[i]`` when a spec does
      not parse, has no crop (its images would differ in size), has the wrong size, or fails on an
      image with ``config.data.channels`` channels; or when both keys are set.
  """
  built = {}
  for batch_key, (config_key, spec) in view_specs(data_config).items():
    built[batch_key] = _build_checked(data_config, config_key, spec,
                                      batch_key in ("image", "view_0"), host_part)
  return built


def _build_checked(data_config, config_key: str, spec: str, is_model_size: bool,
                   host_part: Optional[Callable[[str], str]]) -> transforms.Augmentation:
  where = f"config.data.{config_key}={spec!r}"
  try:
    augmentation = transforms.build_augmentation(host_part(spec) if host_part else spec,
                                                 mean=tuple(data_config.mean),
                                                 std=tuple(data_config.std))
  except ValueError as e:
    raise ValueError(f"{where} is invalid: {e}") from None
  size = augmentation.output_size
  if size is None:
    raise ValueError(f"{where} has no crop op (random_resized_crop or center_crop), so its images "
                     "would differ in size and could not be batched")
  if is_model_size and size != data_config.image_size:
    raise ValueError(f"{where} makes {size}x{size} images but config.data.image_size="
                     f"{data_config.image_size}; the first (or only) view must be the model's "
                     "input size")
  channels = data_config.channels
  probe = np.random.default_rng(0).integers(0, 256, (*_PROBE_SHAPE, channels), dtype=np.uint8)
  try:
    out = augmentation(probe, np.random.default_rng(0))
  except Exception as e:  # pylint: disable=broad-except; re-raised naming the config key
    raise ValueError(f"{where} fails on a {channels}-channel image "
                     f"(config.data.channels={channels}): {type(e).__name__}: {e}") from None
  if out.shape != (size, size, channels):
    raise ValueError(f"{where} turns a {channels}-channel image into shape {out.shape}, not "
                     f"{(size, size, channels)}")
  return augmentation


def view_shapes(augmentations: dict[str, transforms.Augmentation],
                channels: int) -> dict[str, tuple[int, int, int]]:
  """``{batch key: (S, S, C)}`` of one example's images."""
  return {key: (aug.output_size, aug.output_size, channels)
          for key, aug in augmentations.items()}


@dataclasses.dataclass(frozen=True)
class TrainViews(grain.transforms.RandomMap):
  """Replaces 'image' by the augmented views; other fields (label, bad-file fields) pass through.

  Attributes:
    views: ``(batch key, augmentation)`` pairs.
    split_rng: give each view its own generator (with views); else the example's one is used.
  """
  views: tuple[tuple[str, transforms.Augmentation], ...]
  split_rng: bool

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    out = {key: value for key, value in element.items() if key != "image"}
    if self.split_rng:
      seed = int(rng.integers(2**63))
      rngs = [np.random.default_rng((seed, i)) for i in range(len(self.views))]
    else:
      rngs = [rng]
    for (key, augmentation), view_rng in zip(self.views, rngs, strict=True):
      out[key] = augmentation(element["image"], view_rng)
    return out


@dataclasses.dataclass(frozen=True)
class EvalView(grain.transforms.Map):
  """Resize and centre-crop a real example; an undecodable one becomes a masked-out blank row."""
  image_shape: tuple[int, int, int]
  crop_fraction: float
  interpolation: str

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    if sources.is_bad(element):
      return _blank(self.image_shape, element["path"], element["error"])
    image = transforms.resize_shorter_and_center_crop(element["image"], self.image_shape[0],
                                                      self.crop_fraction, self.interpolation)
    return {"image": image, "label": element["label"], "mask": True, "bad_path": "",
            "bad_error": ""}


@dataclasses.dataclass(frozen=True)
class Padding(grain.transforms.Map):
  """A blank example (label -1, mask False) that fills the last evaluation batch."""
  image_shape: tuple[int, int, int]

  def map(self, element: Any) -> dict[str, Any]:
    del element
    return _blank(self.image_shape)


def _blank(image_shape: tuple[int, int, int], bad_path: str = "",
           bad_error: str = "") -> dict[str, Any]:
  # The bad-file fields are on every evaluation row, empty or not, so that rows batch together.
  return {"image": np.zeros(image_shape, np.uint8), "label": -1, "mask": False,
          "bad_path": bad_path, "bad_error": bad_error}


@dataclasses.dataclass(frozen=True)
class ToModelInput(grain.transforms.Map):
  """Batch-level: normalizes the uint8 image arrays named in ``keys``; int32 labels."""
  mean: tuple[float, ...]
  std: tuple[float, ...]
  keys: tuple[str, ...]

  def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = dict(batch)
    for key in self.keys:
      out[key] = transforms.normalize(batch[key], self.mean, self.std)
    out["label"] = batch["label"].astype(np.int32)
    return out


def keys_to_normalize(augmentations: dict[str, transforms.Augmentation]) -> tuple[str, ...]:
  """The batch keys whose spec leaves uint8 images, to be normalized per batch."""
  return tuple(key for key, aug in augmentations.items() if not aug.normalizes)

