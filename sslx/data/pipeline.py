"""grain input pipelines: endless augmented training batches and padded evaluation batches.

Training is one index-addressable ``grain.MapDataset``::

  SkipBadExamples(source) -> seed -> shuffle -> repeat -> random_map(views)
         -> batch(global batch / process_count) -> [process_index::process_count] -> map(normalize)

``views.py`` says what a batch holds (one 'image', or the views a method asks for) and how the
augmentations come from the config. A video source (``video.py``) gives clips instead: ``random_map``
crops each clip's frames alike and batches hold ``'frames'`` (B, T, S, S, C) (and ``'labels'`` where the
source has per-pixel labels); evaluation batches hold each clip's first frame as ``'image'``. With ``config.data.augment_on='device'`` ``random_map`` runs
only each view's leading crops and flips and ``map`` normalizes nothing: batches hold uint8 views,
which ``device_augment.build_device_augmentation`` finishes inside the jitted step. With
``config.data.token_ids_file`` each example also brings its row of that file, and batches hold the ids of
their views as ``'token_ids'`` (``sslx/token_ids.py``: BEiT's precomputed targets).

``shuffle`` draws a fresh permutation per epoch and ``random_map`` seeds each example's generator
with (seed, position in the endless stream), position = epoch * num_examples + index in the epoch.
So batch ``k`` is a pure function of (config, seed, k), which gives:

- resuming: the loader's state is just the number of batches it has yielded;
- worker independence: ``num_workers`` changes speed, never content;
- host independence: of the ``G`` stream positions of global batch ``k``, process ``p`` of ``n``
  takes the block ``k * G + p * G / n, ...`` up to the next process's, so the ``n`` local batches of
  step ``k``, stacked in process order, are exactly the global batch ``k`` of a single process loader
  (same examples, same augmentations, same rows). Rows keep their places because methods draw random
  numbers per row of the global batch (MAE's masks, device augmentation), so a run gives the same
  steps on any number of processes. ``jax.make_array_from_process_local_data`` stacks the local
  batches in process order when the mesh lists each process's devices together, as ``jax.make_mesh``
  does on CPU and GPU; on other meshes the rows are only permuted. Processes read disjoint
  examples at every step; each needs random access to the whole split, as TFDS array_record gives.

A file that cannot be decoded never stops a run. In training it is replaced by the next good
example of the source (``sources.SkipBadExamples``), so batches stay full and batch ``k`` stays a
pure function of ``k``; the loader logs a warning listing each such file at the end of every epoch
in which it was read, and keeps the running total in ``TrainLoader.bad_files``. In evaluation it is
not replaced but masked out (``mask`` False, label -1), and listed when the pass ends.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Optional, Sequence

from absl import flags
from absl import logging
import grain
import ml_collections
import numpy as np

from sslx import config as config_lib
from sslx import token_ids
from sslx.data import device_augment
from sslx.data import sources
from sslx.data import transforms
from sslx.data import video
from sslx.data import views

DEFAULT_EVAL_CROP_FRACTION = 0.875
# More grain worker processes than any host has cores would only fight over them (and each one forks).
MAX_WORKERS = 1024


def default_data_config(**overrides) -> ml_collections.ConfigDict:
  """``config.data`` of a default run (Fashion-MNIST IDX files at 28x28), some top-level keys replaced.

  A dict for ``augment`` updates only the keys it names; ``augmentation`` and ``views`` are described in
  ``views.py``.
  """
  config = config_lib.base_config().data
  config.update(overrides)
  return config


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
  """Endless iterator of training batches (keys in ``views.py``: 'image' or 'view_i', 'label'; or a video
  source's 'frames', see ``video.py``).

  Attributes:
    num_examples: size of the training split (all processes together).
    image_shape: ``(S, S, C)``, the model's input: ``config.data.image_size`` and channels.
    view_shapes: ``{batch key: (S_i, S_i, C)}`` of the batch's image arrays (one row); for clips
      ``{'frames': (T, S, S, C)}``.
    local_batch_size: rows of each batch on this process.
    bad_files: ``{path: error}`` of every undecodable file this loader has read so far. With
      several processes each one lists (and logs) those among its own rows.
  """

  def __init__(self, batches: grain.MapDataset, *, num_examples: int,
               image_shape: tuple[int, int, int], view_shapes: dict[str, tuple[int, ...]],
               local_batch_size: int, process_index: int, process_count: int, num_workers: int,
               prefetch: int, identity: dict[str, Any]):
    self._batches = batches
    self._process_index = process_index
    self._process_count = process_count
    self._num_workers = num_workers
    self._prefetch = prefetch
    self._identity = identity
    self._next_batch = 0
    self._iterator: Optional[grain.DatasetIterator] = None
    # Epoch -> bad files read in it, listed once the epoch is over; the batch that ends an epoch
    # usually starts the next, so a batch's files may belong to two epochs.
    self._unreported: dict[int, dict[str, str]] = {}
    self._first_batch = 0
    self.num_examples = num_examples
    self.image_shape = image_shape
    self.view_shapes = view_shapes
    self.local_batch_size = local_batch_size
    self.bad_files: dict[str, str] = {}

  @property
  def num_bad_files(self) -> int:
    """How many distinct undecodable files this loader has read so far."""
    return len(self.bad_files)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      # Starting lazily lets set_state() right after construction skip spawning workers twice.
      self._iterator = _iterate(self._batches[self._next_batch:], self._num_workers,
                                self._prefetch)
    batch = next(self._iterator)
    # String arrays cannot become JAX arrays: the bad-file fields leave the batch here.
    self._collect_bad_files(self._next_batch, batch.pop("bad_path"), batch.pop("bad_error"))
    self._next_batch += 1
    return batch

  def _collect_bad_files(self, index: int, paths: np.ndarray, errors: np.ndarray) -> None:
    """Files the bad files of batch ``index`` under their epochs; reports the epochs it ends."""
    global_batch_size = self._identity["global_batch_size"]
    for row in np.flatnonzero(paths != ""):
      # Row j of this process's batch k is position k * G + p * L + j of the global stream.
      position = index * global_batch_size + self._process_index * self.local_batch_size + row
      path, error = str(paths[row]), str(errors[row])
      self._unreported.setdefault(position // self.num_examples, {})[path] = error
      self.bad_files[path] = error
    # Every position before (index + 1) * G has now been read, by this process or another.
    finished = (index + 1) * global_batch_size // self.num_examples
    for epoch in sorted(e for e in self._unreported if e < finished):
      self._report(epoch, self._unreported.pop(epoch))

  def _report(self, epoch: int, files: dict[str, str]) -> None:
    first_position = self._first_batch * self._identity["global_batch_size"]
    note = (f" (from batch {self._first_batch} on, where this loader resumed)"
            if epoch * self.num_examples < first_position else "")
    listing = "\n".join(f"  {path}: {error}" for path, error in sorted(files.items()))
    logging.warning("Epoch %d of the training data: skipped %d undecodable file(s)%s, each "
                    "replaced by the next good example:\n%s", epoch + 1, len(files), note, listing)

  def get_state(self) -> dict[str, Any]:
    """A JSON-serialisable position in the stream.

    ``{'next_batch': k, 'seed': ..., 'global_batch_size': ..., 'num_examples': ...}``; the last
    three identify the stream. ``next_batch`` counts global steps, so a state also restores on a
    different process count or number of workers. Bad files are not part of it, as one process
    saves the state for all and each knows only its own: after a resume, the report of the epoch
    in progress lists the files read since, and says so.
    """
    return {"next_batch": self._next_batch, **self._identity}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from ``state``: the next batch is the one an uninterrupted loader would yield."""
    for key, value in self._identity.items():
      if state.get(key) != value:
        raise ValueError(f"loader state was saved with {key}={state.get(key)!r} but this loader "
                         f"has {key}={value!r}; it would not continue the same stream")
    self.close()
    self._next_batch = self._first_batch = int(state["next_batch"])
    self._unreported = {}

  def close(self) -> None:
    """Stops worker processes (they restart on the next ``next()``)."""
    if self._iterator is not None:
      self._iterator.close()
      self._iterator = None


class EvalLoader:
  """Re-iterable, fixed-order evaluation batches with a boolean ``'mask'`` of real examples.

  Every process yields ``len(loader)`` batches of ``batch_size``; the last ones are padded, and
  undecodable files are masked-out rows too.

  Attributes:
    num_examples: size of the split (all processes together).
    image_shape: ``(S, S, C)`` of one image.
    bad_files: ``{path: error}`` of the undecodable files of the last complete pass.
  """

  def __init__(self, batches: grain.MapDataset, *, num_examples: int,
               image_shape: tuple[int, int, int], num_workers: int, prefetch: int):
    self._batches = batches
    self._num_workers = num_workers
    self._prefetch = prefetch
    self.num_examples = num_examples
    self.image_shape = image_shape
    self.bad_files: dict[str, str] = {}

  def __len__(self) -> int:
    return len(self._batches)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    iterator = _iterate(self._batches, self._num_workers, self._prefetch)
    bad_files = {}
    try:
      for batch in iterator:
        bad_files.update(sources.pop_bad_files(batch))
        yield batch
    finally:
      iterator.close()
    self.bad_files = bad_files
    if bad_files:
      listing = "\n".join(f"  {path}: {error}" for path, error in sorted(bad_files.items()))
      logging.warning("Evaluation: %d undecodable file(s) left out (masked):\n%s",
                      len(bad_files), listing)


def make_train_loader(data_config, *, global_batch_size: int, seed: int, process_index: int = 0,
                      process_count: int = 1) -> TrainLoader:
  """Builds this process's endless, shuffled, augmented training stream (see module docstring)."""
  _check_values(data_config)
  _check_processes(process_index, process_count)
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be positive and divisible by "
                     f"process_count={process_count}")
  if not config_lib.is_int(seed) or seed < 0:
    raise ValueError(f"seed must be a non-negative int; got {seed!r}")
  augmentations = _build_train_views(data_config)
  source = sources.make_source(data_config, data_config.split)
  with_token_ids = data_config.get("token_ids_file") is not None
  if with_token_ids:
    # Inside SkipBadExamples, so that an undecodable example's substitute brings its own ids.
    source = token_ids.WithTokenIds(source, data_config.token_ids_file, data_config.split)
  source = sources.SkipBadExamples(source)
  size = data_config.image_size
  local_batch_size = global_batch_size // process_count
  dataset = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
  if video.is_video(data_config):
    dataset = dataset.random_map(video.clip_view(data_config))
    keys_to_normalize, shapes = ("frames",), {"frames": video.clip_shape(data_config)}
  else:
    if with_token_ids:
      dataset = dataset.random_map(token_ids.ViewWithTokenIds.of(augmentations["image"]))
    else:
      dataset = dataset.random_map(views.TrainViews(tuple(augmentations.items()),
                                                    split_rng=data_config.get("views") is not None))
    on_device = data_config.get("augment_on", "host") == "device"
    keys_to_normalize = () if on_device else views.keys_to_normalize(augmentations)
    shapes = views.view_shapes(augmentations, data_config.channels)
  # Slicing whole local batches (not examples) keeps each process's rows a contiguous block of the global batch.
  dataset = dataset.batch(local_batch_size, drop_remainder=True)[process_index::process_count]
  dataset = dataset.map(views.ToModelInput(tuple(data_config.mean), tuple(data_config.std),
                                           keys_to_normalize))
  identity = dict(seed=seed, global_batch_size=global_batch_size, num_examples=len(source))
  return TrainLoader(dataset, num_examples=len(source),
                     image_shape=(size, size, data_config.channels), view_shapes=shapes,
                     local_batch_size=local_batch_size, process_index=process_index,
                     process_count=process_count, num_workers=data_config.num_workers,
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
  if video.is_video(data_config):
    source = video.FirstFrames(source)
  size = data_config.image_size
  image_shape = (size, size, data_config.channels)
  shard = grain.MapDataset.source(source)[process_index::process_count]
  # Every process pads to the largest shard's batch count so collective ops stay in step.
  num_batches = math.ceil(math.ceil(len(source) / process_count) / batch_size)
  crop_fraction = data_config.get("eval_crop_fraction", DEFAULT_EVAL_CROP_FRACTION)
  parts = [shard.map(views.EvalView(image_shape, crop_fraction, data_config.augment.interpolation))]
  num_padding = num_batches * batch_size - len(shard)
  if num_padding:
    parts.append(grain.MapDataset.range(num_padding).map(views.Padding(image_shape)))
  dataset = grain.MapDataset.concatenate(parts).batch(batch_size)
  dataset = dataset.map(views.ToModelInput(tuple(data_config.mean), tuple(data_config.std),
                                           ("image",)))
  return EvalLoader(dataset, num_examples=len(source), image_shape=image_shape,
                    num_workers=data_config.num_workers, prefetch=data_config.prefetch)


def make_viz_batch(data_config, num_images: int) -> dict[str, np.ndarray]:
  """The first ``num_images`` images (and labels) the pictures show, the same at every step.

  They come from the evaluation split, or from the training split when ``config.data.eval_split`` is None;
  either way with the evaluation transform (no augmentation), so successive pictures compare alike.
  """
  split = data_config.split if data_config.eval_split is None else data_config.eval_split
  batch = next(iter(make_eval_loader(data_config, split=split, batch_size=num_images)))
  return {"image": batch["image"], "label": batch["label"]}


def validate_data_config(data_config) -> None:
  """Fails fast, naming the offending ``config.data`` key or missing path, before training starts.

  Raises:
    ValueError: a key is missing or has a bad value (augmentation specs included: each is built
      and run once on a small image).
    FileNotFoundError: the data for ``split`` or ``eval_split`` is not where the config says.
  """
  validate_data_values(data_config)
  check_splits_exist(data_config)


def validate_data_values(data_config) -> None:
  """The part of `validate_data_config` that never touches the data: every key's value, every spec."""
  _check_values(data_config)
  _build_train_views(data_config)
  device_augment.build_device_augmentation(data_config)


def check_splits_exist(data_config) -> None:
  """Opens the source of ``split`` and of ``eval_split`` (unless None) once, so that missing data fails now;
  ``config.data.token_ids_file`` must then hold a row per example of ``split``.

  Raises:
    ValueError: naming ``config.data.split`` / ``eval_split`` when the source refuses the split, or
      ``token_ids_file`` when it is no such file.
    FileNotFoundError: the data is not where the config says.
  """
  for key in ("split", "eval_split"):
    if data_config[key] is None:
      continue
    try:
      source = sources.make_source(data_config, data_config[key])
    except ValueError as error:
      if "config." in str(error):
        raise
      raise ValueError(f"config.data.{key}={data_config[key]!r}: {error}") from None
    if key == "split" and data_config.get("token_ids_file") is not None:
      token_ids.check_count(data_config.token_ids_file, len(source), data_config.split)


def _build_train_views(data_config) -> dict[str, transforms.Augmentation]:
  """The augmentation each view runs in the data workers: all of it, or its host part."""
  if data_config.get("augment_on", "host") == "device":
    return views.build_views(data_config, host_part=device_augment.host_part)
  return views.build_views(data_config)


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
  _require(_is_name(c.dataset), "dataset", c.dataset, "a non-empty string")
  _require(c.data_dir is None or isinstance(c.data_dir, str), "data_dir", c.data_dir,
           "None (the source's default place) or a path")
  _require(_is_name(c.split), "split", c.split, "a non-empty string, e.g. 'train'")
  _require(c.eval_split is None or _is_name(c.eval_split), "eval_split", c.eval_split,
           "a non-empty string, or None (no held-out split)")
  _require(_is_size(c.image_size), "image_size", c.image_size,
           f"an int in [1, {transforms.MAX_SIZE}]")
  _require(config_lib.is_int(c.channels) and c.channels in (1, 3), "channels", c.channels, "1 or 3")
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
  _require(config_lib.is_int(c.num_workers) and 0 <= c.num_workers <= MAX_WORKERS, "num_workers",
           c.num_workers, f"an int in [0, {MAX_WORKERS}] (0 reads in this process)")
  _require(config_lib.is_int(c.prefetch) and 1 <= c.prefetch < config_lib.INT32_LIMIT, "prefetch", c.prefetch,
           "an int >= 1")
  _require(c.get("augment_on", "host") in device_augment.AUGMENT_ON, "augment_on",
           c.get("augment_on"), f"one of {device_augment.AUGMENT_ON}: where the ops after each "
           "view's crops and flips run (data workers or the jitted step)")
  crop_fraction = c.get("eval_crop_fraction", DEFAULT_EVAL_CROP_FRACTION)
  _require(config_lib.is_number(crop_fraction) and 0 < crop_fraction <= 1, "eval_crop_fraction",
           crop_fraction, "a number in (0, 1]")
  if c.source == "idx":
    _require(c.dataset in sources.IDX_DATASETS, "dataset", c.dataset,
             f"one of {sources.IDX_DATASETS} when config.data.source='idx'")
  if video.is_video(c):
    video.check_video_keys(c)
  token_ids.check_data_config(c)
  if c.source in ("synthetic", "synthetic_video"):
    num_examples = c.get("synthetic_num_examples", 1)
    _require(config_lib.is_int(num_examples) and 1 <= num_examples < config_lib.INT32_LIMIT,
             "synthetic_num_examples", num_examples, "an int >= 1")
    size = c.get("synthetic_image_size")
    _require(size is None or _is_size(size), "synthetic_image_size", size,
             f"None (config.data.image_size) or an int in [1, {transforms.MAX_SIZE}]")


def _check_processes(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
  if not ok:
    raise ValueError(f"config.data.{key}={value!r} is invalid; expected {expected}")


def _is_name(value: Any) -> bool:
  return isinstance(value, str) and bool(value.strip())


def _is_size(value: Any) -> bool:
  return config_lib.is_int(value) and 1 <= value <= transforms.MAX_SIZE


def _is_numbers(values: Any, length: int, check=lambda v: True) -> bool:
  """True for a sequence of ``length`` finite real numbers that all pass ``check``."""
  return (isinstance(values, Sequence) and len(values) == length
          and all(config_lib.is_number(v) and check(v) for v in values))
