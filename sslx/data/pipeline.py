"""grain input pipelines: endless augmented training batches and padded evaluation batches.

Training is one index-addressable ``grain.MapDataset``::

  source -> seed -> shuffle -> repeat -> random_map(augment) -> [process_index::process_count]
         -> batch -> map(normalize)

``shuffle`` draws a fresh permutation per epoch and ``random_map`` seeds each example's generator
with (seed, position in the endless stream), position = epoch * num_examples + index in the epoch.
So batch ``k`` is a pure function of (config, seed, k), which gives:

- resuming: the loader's state is just the number of batches it has yielded;
- worker independence: ``num_workers`` changes speed, never content;
- host independence: process ``p`` takes the stream positions ``p, p + n, p + 2n, ...``, so the
  ``n`` local batches of step ``k`` together hold exactly the global batch ``k`` of a single
  process loader (same examples, same augmentations, rows interleaved). Processes read disjoint
  examples at every step; each needs random access to the whole split, as TFDS array_record gives.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator, Optional, Sequence

from absl import flags
import grain
import ml_collections
import numpy as np

from sslx.data import sources
from sslx.data import transforms

DEFAULT_EVAL_CROP_FRACTION = 0.875


def default_data_config(**overrides) -> ml_collections.ConfigDict:
  """Fashion-MNIST from the Debian IDX files at native 28x28 resolution.

  ``overrides`` replace top-level keys; a dict for ``augment`` updates only the keys it names.
  """
  config = ml_collections.ConfigDict(dict(
      source="idx",
      dataset="fashion_mnist",
      data_dir=None,
      split="train",
      eval_split="test",
      image_size=28,
      channels=1,
      mean=(0.2860,),
      std=(0.3530,),
      augment=dict(crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), interpolation="bicubic",
                   hflip=True),
      num_workers=0,
      prefetch=2,
  ))
  config.update(overrides)
  return config


@dataclasses.dataclass(frozen=True)
class _Augment(grain.transforms.RandomMap):
  """Random resized crop, then an optional horizontal flip."""
  size: int
  scale: tuple[float, float]
  ratio: tuple[float, float]
  interpolation: str
  hflip: bool

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    image = transforms.random_resized_crop(element["image"], rng, self.size, self.scale,
                                           self.ratio, self.interpolation)
    if self.hflip:
      image = transforms.horizontal_flip(image, rng)
    return {"image": image, "label": element["label"]}


@dataclasses.dataclass(frozen=True)
class _EvalView(grain.transforms.Map):
  """Resize and centre-crop; marks the example as real."""
  size: int
  crop_fraction: float
  interpolation: str

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    image = transforms.resize_shorter_and_center_crop(element["image"], self.size,
                                                      self.crop_fraction, self.interpolation)
    return {"image": image, "label": element["label"], "mask": True}


@dataclasses.dataclass(frozen=True)
class _Padding(grain.transforms.Map):
  """A blank example (label -1, mask False) that fills the last evaluation batch."""
  image_shape: tuple[int, int, int]

  def map(self, element: Any) -> dict[str, Any]:
    del element
    return {"image": np.zeros(self.image_shape, np.uint8), "label": -1, "mask": False}


@dataclasses.dataclass(frozen=True)
class _ToModelInput(grain.transforms.Map):
  """Batch-level: normalized float32 images and int32 labels (vectorised over the batch)."""
  mean: tuple[float, ...]
  std: tuple[float, ...]

  def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = dict(batch)
    out["image"] = transforms.normalize(batch["image"], self.mean, self.std)
    out["label"] = batch["label"].astype(np.int32)
    return out


def _iterate(batches: grain.MapDataset, num_workers: int, prefetch: int) -> grain.DatasetIterator:
  # One reader thread per process keeps a batch ready while the caller computes; more threads only
  # contend for the GIL, and parallelism comes from worker processes.
  dataset = batches.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():
      # grain reads an absl flag when starting workers, which fails in programs that never parse
      # flags (pytest, notebooks): google/grain#1355. Parsed flags are left alone.
      flags.FLAGS.mark_as_parsed()
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=prefetch))
  return iter(dataset)


class TrainLoader:
  """Endless iterator of training batches ``{'image': f32 (B, S, S, C), 'label': i32 (B,)}``.

  Attributes:
    num_examples: size of the training split (all processes together).
    image_shape: ``(S, S, C)`` of one image.
    local_batch_size: rows of each batch on this process.
  """

  def __init__(self, batches: grain.MapDataset, *, num_examples: int,
               image_shape: tuple[int, int, int], local_batch_size: int, num_workers: int,
               prefetch: int, identity: dict[str, Any]):
    self._batches = batches
    self._num_workers = num_workers
    self._prefetch = prefetch
    self._identity = identity
    self._next_batch = 0
    self._iterator: Optional[grain.DatasetIterator] = None
    self.num_examples = num_examples
    self.image_shape = image_shape
    self.local_batch_size = local_batch_size

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      # Starting lazily lets set_state() right after construction skip spawning workers twice.
      self._iterator = _iterate(self._batches[self._next_batch:], self._num_workers,
                                self._prefetch)
    batch = next(self._iterator)
    self._next_batch += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    """A JSON-serialisable position in the stream.

    ``{'next_batch': k, 'seed': ..., 'global_batch_size': ..., 'num_examples': ...}``; the last
    three identify the stream. ``next_batch`` counts global steps, so a state also restores on a
    different process count or number of workers.
    """
    return {"next_batch": self._next_batch, **self._identity}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from ``state``: the next batch is the one an uninterrupted loader would yield."""
    for key, value in self._identity.items():
      if state.get(key) != value:
        raise ValueError(f"loader state was saved with {key}={state.get(key)!r} but this loader "
                         f"has {key}={value!r}; it would not continue the same stream")
    self.close()
    self._next_batch = int(state["next_batch"])

  def close(self) -> None:
    """Stops worker processes (they restart on the next ``next()``)."""
    if self._iterator is not None:
      self._iterator.close()
      self._iterator = None


class EvalLoader:
  """Re-iterable, fixed-order evaluation batches with a boolean ``'mask'`` of real examples.

  Every process yields ``len(loader)`` batches of ``batch_size``; the last ones are padded.

  Attributes:
    num_examples: size of the split (all processes together).
    image_shape: ``(S, S, C)`` of one image.
  """

  def __init__(self, batches: grain.MapDataset, *, num_examples: int,
               image_shape: tuple[int, int, int], num_workers: int, prefetch: int):
    self._batches = batches
    self._num_workers = num_workers
    self._prefetch = prefetch
    self.num_examples = num_examples
    self.image_shape = image_shape

  def __len__(self) -> int:
    return len(self._batches)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return _iterate(self._batches, self._num_workers, self._prefetch)


def make_train_loader(data_config, *, global_batch_size: int, seed: int, process_index: int = 0,
                      process_count: int = 1) -> TrainLoader:
  """Builds this process's endless, shuffled, augmented training stream (see module docstring)."""
  _check_values(data_config)
  _check_processes(process_index, process_count)
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be positive and divisible by "
                     f"process_count={process_count}")
  if not _is_int(seed) or seed < 0:
    raise ValueError(f"seed must be a non-negative int; got {seed!r}")
  source = sources.make_source(data_config, data_config.split)
  size = data_config.image_size
  aug = data_config.augment
  local_batch_size = global_batch_size // process_count
  dataset = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
  dataset = dataset.random_map(_Augment(size, tuple(aug.crop_scale), tuple(aug.crop_ratio),
                                        aug.interpolation, bool(aug.hflip)))
  dataset = dataset[process_index::process_count].batch(local_batch_size, drop_remainder=True)
  dataset = dataset.map(_ToModelInput(tuple(data_config.mean), tuple(data_config.std)))
  identity = dict(seed=seed, global_batch_size=global_batch_size, num_examples=len(source))
  return TrainLoader(dataset, num_examples=len(source),
                     image_shape=(size, size, data_config.channels),
                     local_batch_size=local_batch_size, num_workers=data_config.num_workers,
                     prefetch=data_config.prefetch, identity=identity)


def make_eval_loader(data_config, *, split: str, batch_size: int, process_index: int = 0,
                     process_count: int = 1) -> EvalLoader:
  """Builds this process's share of ``split`` for evaluation: no augmentation, fixed order.

  Args:
    data_config: ``config.data``.
    split: the split to read, e.g. ``config.data.eval_split``.
    batch_size: examples per batch on THIS process.
    process_index: this process, in ``[0, process_count)``; it takes examples
      ``process_index, process_index + process_count, ...``.
    process_count: number of processes.
  """
  _check_values(data_config)
  _check_processes(process_index, process_count)
  if batch_size <= 0:
    raise ValueError(f"batch_size={batch_size} must be positive")
  source = sources.make_source(data_config, split)
  size = data_config.image_size
  image_shape = (size, size, data_config.channels)
  shard = grain.MapDataset.source(source)[process_index::process_count]
  # Every process pads to the largest shard's batch count so collective ops stay in step.
  num_batches = math.ceil(math.ceil(len(source) / process_count) / batch_size)
  crop_fraction = data_config.get("eval_crop_fraction", DEFAULT_EVAL_CROP_FRACTION)
  parts = [shard.map(_EvalView(size, crop_fraction, data_config.augment.interpolation))]
  num_padding = num_batches * batch_size - len(shard)
  if num_padding:
    parts.append(grain.MapDataset.range(num_padding).map(_Padding(image_shape)))
  dataset = grain.MapDataset.concatenate(parts).batch(batch_size)
  dataset = dataset.map(_ToModelInput(tuple(data_config.mean), tuple(data_config.std)))
  return EvalLoader(dataset, num_examples=len(source), image_shape=image_shape,
                    num_workers=data_config.num_workers, prefetch=data_config.prefetch)


def validate_data_config(data_config) -> None:
  """Fails fast, naming the offending ``config.data`` key or missing path, before training starts.

  Raises:
    ValueError: a key is missing or has a bad value.
    FileNotFoundError: the data for ``split`` or ``eval_split`` is not where the config says.
  """
  _check_values(data_config)
  for key in ("split", "eval_split"):
    if data_config[key] is not None:
      sources.make_source(data_config, data_config[key])


_REQUIRED_KEYS = ("source", "dataset", "data_dir", "split", "eval_split", "image_size", "channels",
                  "mean", "std", "augment", "num_workers", "prefetch")
_AUGMENT_KEYS = ("crop_scale", "crop_ratio", "interpolation", "hflip")


def _check_values(c) -> None:
  """Checks every key's presence and value without touching the data."""
  for key in _REQUIRED_KEYS:
    if key not in c:
      raise ValueError(f"config.data.{key} is missing")
  for key in _AUGMENT_KEYS:
    if key not in c.augment:
      raise ValueError(f"config.data.augment.{key} is missing")
  _require(c.source in sources.KNOWN_SOURCES, "source", c.source,
           f"one of {sources.KNOWN_SOURCES}")
  _require(_is_int(c.image_size) and c.image_size > 0, "image_size", c.image_size, "an int > 0")
  _require(c.channels in (1, 3), "channels", c.channels, "1 or 3")
  _require(_is_numbers(c.mean, c.channels, lambda v: 0 <= v <= 1), "mean", c.mean,
           f"{c.channels} value(s) in [0, 1] (pixels are scaled to [0, 1] first)")
  _require(_is_numbers(c.std, c.channels, lambda v: v > 0), "std", c.std,
           f"{c.channels} value(s) > 0")
  scale, ratio = c.augment.crop_scale, c.augment.crop_ratio
  _require(_is_numbers(scale, 2) and 0 < scale[0] <= scale[1] <= 1, "augment.crop_scale", scale,
           "(a, b) with 0 < a <= b <= 1")
  _require(_is_numbers(ratio, 2) and 0 < ratio[0] <= ratio[1], "augment.crop_ratio", ratio,
           "(a, b) with 0 < a <= b")
  _require(c.augment.interpolation in transforms.INTERPOLATIONS, "augment.interpolation",
           c.augment.interpolation, f"one of {tuple(transforms.INTERPOLATIONS)}")
  _require(isinstance(c.augment.hflip, bool), "augment.hflip", c.augment.hflip, "a bool")
  _require(_is_int(c.num_workers) and c.num_workers >= 0, "num_workers", c.num_workers,
           "an int >= 0 (0 reads in this process)")
  _require(_is_int(c.prefetch) and c.prefetch >= 1, "prefetch", c.prefetch, "an int >= 1")
  crop_fraction = c.get("eval_crop_fraction", DEFAULT_EVAL_CROP_FRACTION)
  _require(0 < crop_fraction <= 1, "eval_crop_fraction", crop_fraction, "in (0, 1]")
  if c.source == "idx":
    _require(c.dataset in sources.IDX_DATASETS, "dataset", c.dataset,
             f"one of {sources.IDX_DATASETS} when config.data.source='idx'")


def _check_processes(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
  if not ok:
    raise ValueError(f"config.data.{key}={value!r} is invalid; expected {expected}")


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_numbers(values: Any, length: int, check=lambda v: True) -> bool:
  """True for a sequence of ``length`` real numbers that all pass ``check``."""
  return (isinstance(values, Sequence) and len(values) == length
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and check(v)
                  for v in values))
