"""Video sources: clips of consecutive frames, for methods that learn from time (video colourisation).

Two sources (``config.data.source``):

- ``'video_folder'``: ``data_dir/<split>`` (or ``data_dir`` itself for 'train', as image folders) holds
  videos at any depth: a folder whose files are frame images (sorted by name: the DAVIS and Kinetics-frames
  layouts) is one video, and so is every video file (``VIDEO_EXTENSIONS``), decoded by PyAV (``av``) or else
  imageio's plugins, whichever is installed (imported only when a file needs it).
- ``'synthetic_video'``: coloured sprites bouncing over a smooth colour texture (`synthetic_video`), with
  per-pixel labels; example ``i`` of a split depends only on (split, i).

Clips: ``config.data.clip_length`` frames ``T``, ``config.data.frame_stride`` frames apart, so a clip spans
``(T - 1) * stride + 1`` frames. Example ``i`` of a folder source is the ``i``-th clip of the list of every
video's non-overlapping clips (a video shorter than a clip gives none); of a synthetic source, a fresh video
of one clip. An example is ``{'frames': uint8 (T, H, W, C), 'label': -1}`` plus ``'labels'`` int32
``(T, H, W)`` (0 background, k sprite k) for synthetic videos. A frame or file that cannot be decoded gives
the project's bad example (``{'image': None, 'path', 'error', ...}``, `sslx.data.sources.is_bad`), naming
the file, so training skips and reports it as it does an undecodable image.

Training batches (`sslx.data.pipeline`): `ClipView` crops every frame of a clip with one random box (and
flips them together), so ``'frames'`` is float32 ``(B, T, S, S, C)`` normalised with ``config.data.mean`` /
``std`` and ``'labels'`` int32 ``(B, T, S, S)`` follows the same crop (nearest neighbour). Evaluation
loaders (monitors, pictures) read the first frame of each clip as an image (`FirstFrames`).
"""
from __future__ import annotations

import dataclasses
import os
import zlib
from typing import Any, Optional

import grain
import numpy as np

from sslx import config as config_lib
from sslx.data import folder
from sslx.data import transforms

VIDEO_SOURCES = ("video_folder", "synthetic_video")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif")
# Saturated, mutually distant sprite colours (RGB); the background texture stays inside [40, 215], so no
# background pixel ever has a sprite's colour.
SPRITE_COLORS = np.array([[255, 0, 0], [0, 200, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255],
                          [0, 255, 255], [255, 128, 0], [128, 0, 255]], np.uint8)
SHAPES = ("square", "disk", "diamond", "triangle")
_DECODER_HINT = "install PyAV (`pip install av`), which decodes most video files"


def is_video(data_config) -> bool:
  return data_config.source in VIDEO_SOURCES


def add_video_keys(data_config, *, clip_length: int, frame_stride: int = 1, num_sprites: int = 3) -> None:
  """Adds the video keys to ``config.data`` (the generic defaults know only images)."""
  data_config.clip_length = clip_length
  data_config.frame_stride = frame_stride
  data_config.num_sprites = num_sprites


def check_video_keys(data_config) -> None:
  """Raises a ValueError naming the first bad video key of ``config.data``."""
  for key in ("clip_length", "frame_stride"):
    if key not in data_config:
      raise ValueError(f"config.data.{key} is missing: config.data.source={data_config.source!r} reads clips "
                       "(add the keys with sslx.data.video.add_video_keys)")
  config_lib.check_int(data_config.clip_length, "data.clip_length", 2)
  config_lib.check_int(data_config.frame_stride, "data.frame_stride", 1)
  if data_config.get("views") is not None:
    raise ValueError(f"config.data.views={data_config.views!r}: a video source gives one clip per example")
  if data_config.get("augment_on", "host") != "host":
    raise ValueError(f"config.data.augment_on={data_config.augment_on!r}: clips are cropped in the data "
                     "workers ('host')")
  if data_config.source == "synthetic_video":
    config_lib.check_int(data_config.get("num_sprites"), "data.num_sprites", 1)
    if data_config.num_sprites > len(SPRITE_COLORS):
      raise ValueError(f"config.data.num_sprites={data_config.num_sprites} exceeds the {len(SPRITE_COLORS)} "
                       "distinct sprite colours")
    if data_config.channels != 3:
      raise ValueError(f"config.data.channels={data_config.channels}: synthetic videos are in colour (3)")


def clip_span(clip_length: int, frame_stride: int) -> int:
  """How many consecutive frames a clip covers."""
  return (clip_length - 1) * frame_stride + 1


def _triangle_wave(position: np.ndarray, low: float, high: float) -> np.ndarray:
  """``position`` reflected into ``[low, high]``: a point moving at constant speed bounces off both ends."""
  length = high - low
  return low + length - np.abs(np.mod(position - low, 2 * length) - length)


def _shape_mask(shape: str, dy: np.ndarray, dx: np.ndarray, radius: float) -> np.ndarray:
  """Pixels within a sprite of half-extent ``radius``, from their offsets to its centre."""
  if shape == "square":
    return (np.abs(dy) <= radius) & (np.abs(dx) <= radius)
  if shape == "disk":
    return dy ** 2 + dx ** 2 <= radius ** 2
  if shape == "diamond":
    return np.abs(dy) + np.abs(dx) <= radius
  return (np.abs(dy) <= radius) & (np.abs(dx) <= (dy + radius) / 2)  # triangle, apex up


def smooth_texture(rng: np.random.Generator, size: int, cells: int = 4) -> np.ndarray:
  """A smooth colour noise image (size, size, 3) uint8 in [40, 215]: a coarse random grid, bilinear."""
  coarse = rng.integers(40, 216, (cells, cells, 3), dtype=np.uint8)
  return transforms.resize(coarse, size, size, "bilinear")


def synthetic_video(rng: np.random.Generator, num_frames: int, size: int, num_sprites: int):
  """Sprites moving at constant velocity and bouncing off the borders over a static smooth texture.

  Each sprite has a shape of `SHAPES`, a half-extent of size/8 to size/5 pixels, a distinct colour of
  `SPRITE_COLORS` and a speed of size/30 to size/12 pixels per frame. Sprites are drawn in order, so sprite
  ``k`` occludes sprites ``< k`` and the label map says which is visible.

  Returns:
    ``(frames, labels, colors)``: uint8 (T, size, size, 3), int32 (T, size, size) with 0 for background and
    ``k`` for sprite ``k``, and the uint8 (num_sprites, 3) colour of each sprite.
  """
  frames = np.repeat(smooth_texture(rng, size)[None], num_frames, axis=0)
  labels = np.zeros((num_frames, size, size), np.int32)
  colors = SPRITE_COLORS[rng.permutation(len(SPRITE_COLORS))[:num_sprites]]
  centres = np.arange(size) + 0.5
  time = np.arange(num_frames, dtype=np.float64)[:, None, None]
  for k in range(num_sprites):
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    radius = rng.uniform(size / 8, size / 5)
    start = rng.uniform(radius, size - radius, 2)
    angle, speed = rng.uniform(0, 2 * np.pi), rng.uniform(size / 30, size / 12)
    velocity = speed * np.array([np.sin(angle), np.cos(angle)])
    y = _triangle_wave(start[0] + velocity[0] * time, radius, size - radius)
    x = _triangle_wave(start[1] + velocity[1] * time, radius, size - radius)
    mask = _shape_mask(shape, centres[None, :, None] - y, centres[None, None, :] - x, radius)
    frames[mask] = colors[k]
    labels[mask] = k + 1
  return frames, labels, colors


class SyntheticVideoSource:
  """Example ``i``: a fresh `synthetic_video` of one clip's span, subsampled by the stride; depends on
  (seed, i) only."""

  def __init__(self, num_examples: int, *, clip_length: int, frame_stride: int, size: int, num_sprites: int,
               seed: int = 0):
    self._num_examples, self._seed = num_examples, seed
    self._clip_length, self._frame_stride = clip_length, frame_stride
    self._size, self._num_sprites = size, num_sprites

  def __len__(self) -> int:
    return self._num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < self._num_examples:
      raise IndexError(f"index {index} out of range for {self._num_examples} videos")
    rng = np.random.default_rng((self._seed, index))
    span = clip_span(self._clip_length, self._frame_stride)
    frames, labels, _ = synthetic_video(rng, span, self._size, self._num_sprites)
    keep = slice(None, None, self._frame_stride)
    return {"frames": frames[keep], "labels": labels[keep], "label": -1}


def _decode_frames(path: str, indices: Optional[np.ndarray], channels: int) -> list[np.ndarray]:
  """The frames at ``indices`` (all of them for None) of a video file, as uint8 (H, W, channels)."""
  wanted = None if indices is None else set(int(i) for i in indices)
  last = None if indices is None else max(wanted)
  try:
    import av  # pylint: disable=g-import-not-at-top; optional, only for video files
  except ImportError:
    av = None
  if av is not None:
    with av.open(path) as container:
      frames = _take((frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)), wanted, last)
  else:
    try:
      import imageio.v3 as iio  # pylint: disable=g-import-not-at-top; optional, only for video files
    except ImportError:
      raise ImportError(f"cannot decode the video file {path}: neither PyAV nor imageio is installed; "
                        f"{_DECODER_HINT}") from None
    try:
      frames = _take(iio.imiter(path), wanted, last)
    except Exception as e:  # pylint: disable=broad-except; re-raised with what to install
      raise ValueError(f"imageio cannot decode {path} ({type(e).__name__}: {e}); if the file is sound, "
                       f"{_DECODER_HINT}") from e
  out = []
  for frame in frames:
    frame = np.asarray(frame)
    frame = frame[..., None] if frame.ndim == 2 else frame[..., :3]
    out.append(np.asarray(_to_channels(frame, channels), np.uint8))
  return out


def _take(stream, wanted: Optional[set], last: Optional[int]) -> list:
  frames = []
  for index, frame in enumerate(stream):
    if wanted is None or index in wanted:
      frames.append(frame)
    if last is not None and index >= last:
      break
  return frames


def _to_channels(frame: np.ndarray, channels: int) -> np.ndarray:
  if frame.shape[-1] == channels:
    return frame
  if channels == 3:
    return np.repeat(frame, 3, axis=-1)
  # Rec. 601 luma, as PIL's 'L' conversion, which frame folders use.
  return np.round(frame.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]


def _list_videos(root: str) -> tuple[list[str], list[str]]:
  """(folders whose files include frame images, video files) under ``root``, sorted; hidden names skipped."""
  frame_folders, files = [], []
  for directory, subdirectories, names in os.walk(root, followlinks=True):
    subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
    visible = [name for name in sorted(names) if not name.startswith(".")]
    if any(name.lower().endswith(folder.IMAGE_EXTENSIONS) for name in visible):
      frame_folders.append(directory)
    files += [os.path.join(directory, name) for name in visible if name.lower().endswith(VIDEO_EXTENSIONS)]
  return frame_folders, files


def _frame_names(directory: str) -> list[str]:
  return sorted(name for name in os.listdir(directory)
                if not name.startswith(".") and name.lower().endswith(folder.IMAGE_EXTENSIONS))


class VideoFolderSource:
  """The non-overlapping clips of every video under ``root`` (see the module docstring).

  Frame folders are counted by listing them; video files by decoding them once, here (a file that cannot be
  decoded then becomes one clip that reads as a bad example naming it).
  """

  def __init__(self, root: str, *, clip_length: int, frame_stride: int, channels: int = 3):
    if not os.path.isdir(root):
      raise FileNotFoundError(f"video folder {root} {'is not a folder' if os.path.exists(root) else 'does not exist'}")
    self.root, self._channels = root, channels
    self._clip_length, self._frame_stride = clip_length, frame_stride
    span = clip_span(clip_length, frame_stride)
    frame_folders, files = _list_videos(root)
    videos, counts, self._file_errors = [], [], {}
    for directory in frame_folders:
      videos.append(directory)
      counts.append(len(_frame_names(directory)))
    for path in files:
      videos.append(path)
      try:
        counts.append(len(_decode_frames(path, None, channels)))
      except ImportError:
        raise
      except Exception as e:  # pylint: disable=broad-except; reported as a bad example when read
        self._file_errors[path] = f"{type(e).__name__}: {e}"
        counts.append(span)
    if not videos:
      raise FileNotFoundError(f"video folder {root} holds no videos: no folder of frame images "
                              f"{folder.IMAGE_EXTENSIONS} and no video file {VIDEO_EXTENSIONS}")
    clips = [(v, start) for v, count in enumerate(counts) for start in range(0, count - span + 1, span)]
    if not clips:
      raise ValueError(f"no video under {root} has the {span} frames a clip spans (config.data.clip_length="
                       f"{clip_length}, frame_stride={frame_stride}); the longest has {max(counts)}")
    self._videos = np.array([os.fsencode(path) for path in videos])
    self._clips = np.array(clips, np.int64)

  def __len__(self) -> int:
    return len(self._clips)

  def __getitem__(self, index: int) -> dict[str, Any]:
    video, start = (int(value) for value in self._clips[index])
    path = os.fsdecode(self._videos[video])
    indices = start + self._frame_stride * np.arange(self._clip_length)
    if path in self._file_errors:
      return {"image": None, "label": -1, "path": path, "error": self._file_errors[path]}
    if os.path.isdir(path):
      names = _frame_names(path)
      frames = []
      for i in indices:
        frame_path = os.path.join(path, names[i])
        try:
          frames.append(folder.load_image(frame_path, self._channels))
        except Exception as e:  # pylint: disable=broad-except; one unreadable frame must not end a run
          return {"image": None, "label": -1, "path": frame_path, "error": f"{type(e).__name__}: {e}"}
    else:
      try:
        frames = _decode_frames(path, indices, self._channels)
      except Exception as e:  # pylint: disable=broad-except; one unreadable file must not end a run
        return {"image": None, "label": -1, "path": path, "error": f"{type(e).__name__}: {e}"}
    shapes = {frame.shape for frame in frames}
    if len(frames) != self._clip_length or len(shapes) != 1:
      return {"image": None, "label": -1, "path": path,
              "error": f"ValueError: expected {self._clip_length} frames of one size, read {sorted(shapes)}"}
    return {"frames": np.stack(frames), "label": -1}


def open_split(data_config, split: str):
  """The clip source of ``config.data`` for ``split`` (a ``VIDEO_SOURCES`` source)."""
  c = data_config
  if c.source == "synthetic_video":
    size = c.get("synthetic_image_size") or c.image_size
    # Seeded by the split's name, as synthetic images: the splits are different videos.
    seed = zlib.crc32(split.encode())
    return SyntheticVideoSource(c.get("synthetic_num_examples", 10_000), clip_length=c.clip_length,
                                frame_stride=c.frame_stride, size=size, num_sprites=c.num_sprites, seed=seed)
  if not c.data_dir:
    raise FileNotFoundError("config.data.source='video_folder' needs config.data.data_dir: the folder of "
                            "videos, or of one sub-folder per split")
  root = os.path.join(c.data_dir, split)
  if not os.path.isdir(root):
    if split != "train":
      raise FileNotFoundError(f"split {split!r} of video folder {c.data_dir} not found: {root} is not a folder")
    root = c.data_dir
  return VideoFolderSource(root, clip_length=c.clip_length, frame_stride=c.frame_stride, channels=c.channels)


def _nearest_indices(start: int, length: int, size: int) -> np.ndarray:
  """Source rows of ``size`` output rows resampling ``length`` rows from ``start`` (pixel centres)."""
  return start + np.minimum(((np.arange(size) + 0.5) * length / size).astype(np.int64), length - 1)


@dataclasses.dataclass(frozen=True)
class ClipView(grain.transforms.RandomMap):
  """One random resized crop (and flip) for every frame of a clip; labels follow by nearest neighbour."""
  size: int
  scale: tuple[float, float]
  ratio: tuple[float, float]
  interpolation: str
  hflip: bool

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    frames = element["frames"]
    top, left, h, w = transforms.sample_crop_box(frames.shape[1], frames.shape[2], rng, self.scale, self.ratio)
    flip = self.hflip and rng.random() < 0.5
    out = dict(element)
    crops = [transforms.resize(frame[top:top + h, left:left + w], self.size, self.size, self.interpolation)
             for frame in frames]
    out["frames"] = np.stack(crops)[:, :, ::-1] if flip else np.stack(crops)
    if "labels" in element:
      rows, cols = _nearest_indices(top, h, self.size), _nearest_indices(left, w, self.size)
      labels = element["labels"][:, rows][:, :, cols]
      out["labels"] = np.ascontiguousarray(labels[:, :, ::-1] if flip else labels, np.int32)
    out["frames"] = np.ascontiguousarray(out["frames"])
    return out


def clip_view(data_config) -> ClipView:
  augment = data_config.augment
  return ClipView(int(data_config.image_size), tuple(augment.crop_scale), tuple(augment.crop_ratio),
                  augment.interpolation, bool(augment.hflip))


def clip_shape(data_config) -> tuple[int, int, int, int]:
  """``(T, S, S, C)`` of one training clip."""
  size = data_config.image_size
  return (data_config.clip_length, size, size, data_config.channels)


class FirstFrames:
  """A clip source read as images: each clip's first frame (label -1); bad clips stay bad."""

  def __init__(self, clips):
    self._clips = clips

  def __len__(self) -> int:
    return len(self._clips)

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self._clips[index]
    if example.get("image", 0) is None:
      return example
    return {"image": example["frames"][0], "label": -1}

