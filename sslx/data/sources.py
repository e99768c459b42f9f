"""Random-access image sources.

Every source has ``len(source)`` and ``source[i] -> {'image': uint8 (H, W, C), 'label': int}`` and
pickles cheaply: grain's worker processes are spawned, so each worker receives the source by pickle.
Sources that read files therefore pickle their paths, not their contents, and (re)open lazily.

A source that reads files one by one (``folder.ImageFolderSource``) returns, for a file it cannot
decode, a *bad example* ``{'image': None, 'label': ..., 'path': ..., 'error': ...}`` instead of
raising: one bad file among millions must not end a run. ``is_bad`` recognises it; for training,
``SkipBadExamples`` replaces it by a good neighbour and ``pop_bad_files`` collects the skipped paths
from the batches, so the report works across grain's worker processes (no shared state).

``make_source(data_config, split)`` picks one from ``config.data``; the video sources (clips of frames, not
images) are in ``video.py``.
"""
from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from typing import Any, Optional, Sequence, Union

import numpy as np

from sslx.data import folder
from sslx.data import video

DEFAULT_IDX_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
# Searched in order when config.data.data_dir is None; sslx.data.fetch downloads into the second.
FASHION_MNIST_DIRS = (DEFAULT_IDX_DIR, os.path.expanduser("~/.cache/sslx/fashion-mnist"))
KNOWN_SOURCES = ("idx", "tfds", "synthetic", "folder", *video.VIDEO_SOURCES)
IDX_DATASETS = ("fashion_mnist", "mnist")

_IDX_FILE_PREFIX = {"train": "train", "test": "t10k"}
_IDX_UBYTE = 0x08
_IDX_HINT = (
    "To get Fashion-MNIST run `apt-get install dataset-fashion-mnist` (it installs into "
    f"{DEFAULT_IDX_DIR}), or download the four files train-images-idx3-ubyte.gz, "
    "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz from the "
    "Fashion-MNIST site (github.com/zalandoresearch/fashion-mnist; for MNIST, the same four files "
    "from the MNIST site) into a folder and set --config.data.data_dir=/that/folder.")


def match_channels(image: np.ndarray, channels: Optional[int]) -> np.ndarray:
  """Returns ``image`` with ``channels`` channels; grayscale is repeated to make RGB."""
  have = image.shape[-1]
  if channels is None or have == channels:
    return image
  if have == 1:
    return np.repeat(image, channels, axis=-1)
  raise ValueError(f"cannot turn an image with {have} channels into {channels} channels")


def is_bad(example: dict[str, Any]) -> bool:
  """True for the example a source returns in place of a file it could not decode: its 'image' is None (a
  good video clip has 'frames' and no 'image')."""
  return "image" in example and example["image"] is None


class SkipBadExamples:
  """Wraps a source so that every example has an image: a bad one is replaced by a good neighbour.

  Example ``i`` is the first good example among ``i, i + 1, ...`` (wrapping around), with two extra
  string fields that batch like any other: ``'bad_path'`` and ``'bad_error'``, empty unless example
  ``i`` itself was bad. Each index is read once per epoch, so each bad file is reported exactly once
  per epoch whatever the shuffling; the substitute (usually the next file of the same class) keeps
  the batch full and its content a pure function of the index.
  """

  def __init__(self, source):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self._source[index]
    if not is_bad(example):
      return {**example, "bad_path": "", "bad_error": ""}
    num_examples = len(self._source)
    for step in range(1, num_examples):
      other = self._source[(index + step) % num_examples]
      if not is_bad(other):
        return {**other, "bad_path": example["path"], "bad_error": example["error"]}
    raise ValueError(f"no example of the source can be decoded; e.g. {example['path']}: "
                     f"{example['error']}")


def pop_bad_files(batch: dict[str, Any]) -> dict[str, str]:
  """Removes ``SkipBadExamples``' two fields from a batch; returns its bad files, ``{path: error}``.

  The result is empty for almost every batch.
  """
  paths, errors = batch.pop("bad_path"), batch.pop("bad_error")
  return {str(path): str(error) for path, error in zip(paths, errors, strict=True) if path}


class ArraySource:
  """In-memory images, (N, H, W) or (N, H, W, C) uint8, with optional integer labels.

  Without labels every example is labelled -1.
  """

  def __init__(self, images: np.ndarray, labels: Optional[Sequence[int]] = None):
    images = np.asarray(images)
    if images.ndim == 3:
      images = images[..., None]
    if images.ndim != 4 or images.dtype != np.uint8:
      raise ValueError(f"images must be uint8 (N, H, W[, C]); got {images.dtype} {images.shape}")
    if labels is None:
      labels = np.full((len(images),), -1, np.int64)
    labels = np.asarray(labels)
    if labels.shape != (len(images),):
      raise ValueError(f"labels must have shape ({len(images)},); got {labels.shape}")
    self._images = images
    self._labels = labels

  def __len__(self) -> int:
    return len(self._images)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self._images[index], "label": int(self._labels[index])}


class SyntheticSource:
  """Deterministic uniform-noise images for benchmarks: example i depends only on (seed, i)."""

  def __init__(self, num_examples: int, image_shape: Sequence[int], *, num_classes: int = 1000,
               seed: int = 0):
    if num_examples <= 0 or len(image_shape) != 3 or min(image_shape) <= 0:
      raise ValueError(f"need num_examples > 0 and image_shape (H, W, C); got {num_examples}, "
                       f"{tuple(image_shape)}")
    self._num_examples = num_examples
    self._image_shape = tuple(image_shape)
    self._num_classes = num_classes
    self._seed = seed

  def __len__(self) -> int:
    return self._num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < self._num_examples:
      raise IndexError(f"index {index} out of range for {self._num_examples} examples")
    rng = np.random.default_rng((self._seed, index))
    image = rng.integers(0, 256, self._image_shape, dtype=np.uint8)
    return {"image": image, "label": int(rng.integers(self._num_classes))}


def _open_binary(path: str):
  return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _check_idx_header(path: str, header: bytes, ndim: int) -> tuple[int, ...]:
  """Validates an IDX magic number (0x0000 08 <ndim>) and returns the dimensions."""
  expected = bytes((0, 0, _IDX_UBYTE, ndim))
  if header[:4] != expected:
    raise ValueError(f"{path} is not an IDX file of unsigned bytes with {ndim} dimension(s): its "
                     f"magic number is 0x{header[:4].hex()}, expected 0x{expected.hex()}. The file "
                     "is corrupt or not what its name says; download it again.")
  if len(header) < 4 + 4 * ndim:
    raise ValueError(f"{path} is truncated: its IDX header ends early.")
  return struct.unpack(f">{ndim}I", header[4:4 + 4 * ndim])


def _read_idx_dims(path: str, ndim: int) -> tuple[int, ...]:
  with _open_binary(path) as f:
    return _check_idx_header(path, f.read(4 + 4 * ndim), ndim)


def _read_idx(path: str, ndim: int) -> np.ndarray:
  with _open_binary(path) as f:
    data = f.read()
  dims = _check_idx_header(path, data, ndim)
  values = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if values.size != math.prod(dims):
    raise ValueError(f"{path} holds {values.size} values but its header says {dims}; the file is "
                     "truncated or corrupt, download it again.")
  return values.reshape(dims)


class IdxSource:
  """MNIST / Fashion-MNIST in the IDX format, gzipped or raw.

  Reads ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` from ``data_dir``, or from the first
  of several directories that holds both files of the split. The headers are checked when the source
  is made, so a missing or corrupt file fails before training; the pixels are read on first access
  (in each worker process).
  """

  def __init__(self, data_dir: Union[str, Sequence[str]] = FASHION_MNIST_DIRS,
               split: str = "train", *, channels: int = 1):
    if split not in _IDX_FILE_PREFIX:
      raise ValueError(f"IDX split {split!r} is unknown; choose one of {tuple(_IDX_FILE_PREFIX)}")
    self._channels = channels
    directories = (data_dir,) if isinstance(data_dir, str) else tuple(data_dir)
    self._images_path, self._labels_path = _find_idx_files(directories, split)
    num_images, height, width = _read_idx_dims(self._images_path, 3)
    (num_labels,) = _read_idx_dims(self._labels_path, 1)
    if num_images != num_labels:
      raise ValueError(f"{self._images_path} has {num_images} images but {self._labels_path} has "
                       f"{num_labels} labels")
    self._num_examples = num_images
    self.image_shape = (height, width, channels)
    self._images = None
    self._labels = None

  def __getstate__(self):
    return {**self.__dict__, "_images": None, "_labels": None}

  def __len__(self) -> int:
    return self._num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    if self._images is None:
      self._images = _read_idx(self._images_path, 3)
      self._labels = _read_idx(self._labels_path, 1)
    image = match_channels(self._images[index][..., None], self._channels)
    return {"image": image, "label": int(self._labels[index])}


def _find_idx_files(directories: Sequence[str], split: str) -> tuple[str, str]:
  """Paths of (images, labels) in the first directory holding both, each .gz or raw."""
  prefix = _IDX_FILE_PREFIX[split]
  stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
  looked, problems = [], []
  for directory in directories:
    if not os.path.isdir(directory):
      problems.append(f"the directory {directory} does not exist")
    found = []
    for stem in stems:
      candidates = [os.path.join(directory, stem + ".gz"), os.path.join(directory, stem)]
      looked += candidates
      existing = [path for path in candidates if os.path.isfile(path)]
      if existing:
        found.append(existing[0])
      elif os.path.isdir(directory):
        problems.append(f"{directory} holds neither {stem}.gz nor {stem}")
    if len(found) == 2:
      return found[0], found[1]
  paths = "\n".join(f"  {path}" for path in looked)
  raise FileNotFoundError(f"IDX files for split {split!r} not found ({'; '.join(problems)}). "
                          f"Looked for:\n{paths}\n{_IDX_HINT}")


class TfdsSource:
  """A prepared TFDS dataset in the ``array_record`` format, read through ``tfds.data_source``.

  Needs no TensorFlow: images decode with PIL. ``channels=3`` turns grayscale into RGB; ``None``
  keeps the stored channels. Nothing is ever downloaded: an unprepared dataset is an error.
  """

  def __init__(self, name: str, split: str, data_dir: Optional[str] = None, *,
               channels: Optional[int] = None):
    self._name = name
    self._split = split
    self._data_dir = data_dir
    self._channels = channels
    self._source = _open_tfds(name, split, data_dir)
    features = self._source.dataset_info.features
    if "image" not in features:
      raise ValueError(f"TFDS dataset {name!r} has no 'image' feature (it has {list(features)})")
    stored = features["image"].shape[-1]
    if channels is not None and stored not in (1, channels):
      raise ValueError(f"TFDS dataset {name!r} stores {stored}-channel images; "
                       f"config.data.channels={channels} cannot be made from them")
    self._has_label = "label" in features
    self._num_examples = len(self._source)

  def __getstate__(self):
    return {**self.__dict__, "_source": None}

  def __len__(self) -> int:
    return self._num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    if self._source is None:
      self._source = _open_tfds(self._name, self._split, self._data_dir)
    example = self._source[index]
    image = np.asarray(example["image"])
    label = int(example["label"]) if self._has_label else -1
    return {"image": match_channels(image, self._channels), "label": label}


def _open_tfds(name: str, split: str, data_dir: Optional[str]):
  """Opens a TFDS data source, turning TFDS's failures into errors that say what to do."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top; slow, only for 'tfds'

  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # pylint: disable=broad-except; re-raised with a diagnosis below
    raise _explain_tfds_failure(tfds, name, split, data_dir, e) from e


def _explain_tfds_failure(tfds, name: str, split: str, data_dir: Optional[str],
                          error: Exception) -> Exception:
  where = data_dir or f"default: {tfds.core.constants.DATA_DIR} or $TFDS_DATA_DIR"
  what = f"TFDS dataset {name!r} (split {split!r}, data_dir {where})"
  if isinstance(error, tfds.core.registered.DatasetNotFoundError):
    return ValueError(f"{what}: no such dataset is registered or prepared; check "
                      "config.data.dataset and config.data.data_dir.")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception:  # pylint: disable=broad-except; fall through to the original message
    builder = None
  if builder is not None and not builder.is_prepared():
    return FileNotFoundError(
        f"{what} is not prepared: nothing at {builder.data_dir}. Prepare it once in the "
        f"array_record format, e.g. `tfds build {name} --file_format=array_record "
        "--data_dir=DIR` (needs TensorFlow in that environment), then set "
        "--config.data.data_dir=DIR.")
  if builder is not None and split.split("[")[0] not in builder.info.splits:
    return ValueError(f"{what}: unknown split; this dataset has splits {list(builder.info.splits)} "
                      "(config.data.split / config.data.eval_split).")
  if isinstance(error, (NotImplementedError, RuntimeError)):
    return ValueError(f"{what} cannot be read by random access; re-prepare it with "
                      f"--file_format=array_record. TFDS said: {error}")
  return ValueError(f"{what} could not be opened: {error}")


def make_source(data_config, split: str):
  """Builds the source that ``data_config`` (``config.data``) names, for ``split``.

  ``source='folder'`` reads ``data_dir/<split>`` if it exists, else ``data_dir`` itself for the
  split 'train' (see ``folder.open_split``); ``dataset`` is then only a name.
  """
  source = data_config.source
  dataset = data_config.dataset
  channels = data_config.channels
  if source == "idx":
    if dataset not in IDX_DATASETS:
      raise ValueError(f"config.data.dataset={dataset!r} is not an IDX dataset; with "
                       f"config.data.source='idx' choose one of {IDX_DATASETS}")
    data_dir = data_config.data_dir
    if data_dir is None:
      if dataset != "fashion_mnist":
        raise FileNotFoundError(f"config.data.dataset={dataset!r} has no default location; set "
                                f"--config.data.data_dir. {_IDX_HINT}")
      data_dir = FASHION_MNIST_DIRS
    return IdxSource(data_dir, split, channels=channels)
  if source == "tfds":
    return TfdsSource(dataset, split, data_dir=data_config.data_dir, channels=channels)
  if source == "synthetic":
    size = data_config.get("synthetic_image_size") or data_config.image_size
    num_examples = data_config.get("synthetic_num_examples", 10_000)
    # Different splits of a synthetic dataset should not be the same images.
    return SyntheticSource(num_examples, (size, size, channels), seed=zlib.crc32(split.encode()))
  if source == "folder":
    return folder.open_split(data_config.data_dir, split, channels=channels)
  if source in video.VIDEO_SOURCES:
    return video.open_split(data_config, split)
  raise ValueError(f"config.data.source={source!r} is unknown; choose one of {KNOWN_SOURCES}")
