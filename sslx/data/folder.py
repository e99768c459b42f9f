"""Image folders: one sub-folder per class, or a flat folder of unlabeled images.

Layouts (``root`` is the folder of one split)::

  root/cat/001.jpg, root/cat/more/002.png, root/dog/003.webp   labelled: cat = 0, dog = 1
  root/001.jpg, root/002.png                                    unlabeled: every label is -1

Class names are the sub-folders of ``root`` in sorted order, empty ones included (so that labels
agree with a split that has images there); images are found at any depth inside a class folder. Files and folders whose names start with '.' are ignored (macOS ``._*`` forks,
``.ipynb_checkpoints``), as are files whose extension is not in ``IMAGE_EXTENSIONS``.

Decoding happens on access, so a file that cannot be decoded is found only when it is read.
``source[i]`` then returns a marker instead of raising: ``{'image': None, 'label': ..., 'path': ...,
'error': ...}`` (see ``sources.is_bad``), which lets a long run skip the file and report it.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# PIL keeps 16-bit grayscale PNGs as 32-bit ('I') or 16-bit ('I;16...') integers; its conversion
# to 8 bits clips instead of scaling, which would turn most of such an image white.
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L")


def load_image(path: str, channels: int = 3) -> np.ndarray:
  """Decodes an image file into uint8 (H, W, channels); ``channels`` is 1 (luma) or 3 (RGB).

  Grayscale, palette, CMYK and 16-bit images are converted; an alpha channel is dropped (the
  colours under transparent pixels are kept, as PIL's and torchvision's loaders do).

  Raises:
    Exception: whatever PIL raises for a file it cannot decode (e.g. ``OSError`` for a truncated
      file, ``PIL.UnidentifiedImageError`` for one that is not an image).
  """
  with Image.open(path) as image:
    if image.mode in _SIXTEEN_BIT_MODES:
      pixels = np.clip(np.asarray(image), 0, 65535) >> 8
      image = Image.fromarray(pixels.astype(np.uint8))
    array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
  return array.reshape(array.shape[0], array.shape[1], channels)


def find_classes(root: str) -> tuple[str, ...]:
  """The class names under ``root``: its sub-folders (hidden ones excluded), sorted."""
  with os.scandir(root) as entries:
    return tuple(sorted(entry.name for entry in entries
                        if entry.is_dir() and not entry.name.startswith(".")))


class ImageFolderSource:
  """The images under ``root``, labelled by class folder or unlabeled (see the module docstring).

  The file list is made once, here, and sorted, so example ``i`` is the same file in every process;
  it is held as one bytes array, which pickles fast to grain's worker processes.

  Attributes:
    root: the folder read.
    classes: class names, index = label; empty for a flat folder.
  """

  def __init__(self, root: str, *, channels: int = 3, classes: Optional[Sequence[str]] = None,
               extensions: Sequence[str] = IMAGE_EXTENSIONS):
    """Scans ``root``.

    Args:
      root: a folder of class sub-folders, or of images.
      channels: 3 (RGB) or 1 (luma).
      classes: label names to use instead of ``root``'s sub-folders, e.g. the training split's so
        that a validation split lacking a class keeps the same labels. Every class folder of
        ``root`` must be among them.
      extensions: file extensions read, matched case-insensitively.

    Raises:
      FileNotFoundError: ``root`` is missing, not a folder, or holds no images.
      ValueError: ``channels`` is not 1 or 3; ``root`` holds both images and class folders of
        images; or a class folder is not in ``classes``.
    """
    if channels not in (1, 3):
      raise ValueError(f"channels must be 1 or 3; got {channels!r}")
    if not os.path.isdir(root):
      what = "is not a folder" if os.path.exists(root) else "does not exist"
      raise FileNotFoundError(f"image folder {root} {what}")
    self.root = root
    self._channels = channels
    extensions = tuple(e.lower() for e in extensions)
    loose, others = _list_images(root, extensions, recursive=False)
    folders = find_classes(root)
    per_class = [_list_images(os.path.join(root, name), extensions) for name in folders]
    others += sum(count for _, count in per_class)
    in_classes = [name for name, (files, _) in zip(folders, per_class, strict=True) if files]
    if loose and in_classes:
      raise ValueError(
          f"image folder {root} holds both images ({loose[0]}, ...) and class folders of images "
          f"({', '.join(in_classes[:3])}, ...); move the images into a class folder or point at a "
          "folder of one kind")
    if not loose and not in_classes:
      raise FileNotFoundError(
          f"image folder {root} holds no images with an extension in {extensions} (it holds "
          f"{others} other file(s)); images may also lie in class sub-folders")
    if loose:
      self.classes = ()
      paths, labels = loose, [-1] * len(loose)
    else:
      self.classes = tuple(classes) if classes is not None else folders
      unknown = sorted(set(in_classes) - set(self.classes))
      if unknown:
        raise ValueError(f"class folder(s) {unknown} of {root} are not among the classes "
                         f"{list(self.classes)}")
      paths, labels = [], []
      for name, (files, _) in zip(folders, per_class, strict=True):
        paths += [os.path.join(name, file) for file in files]
        labels += [self.classes.index(name)] * len(files)
    # os.fsencode keeps file names that are not valid UTF-8 round-trippable.
    self._paths = np.array([os.fsencode(path) for path in paths])
    self._labels = np.array(labels, np.int32)

  def __len__(self) -> int:
    return len(self._paths)

  def path(self, index: int) -> str:
    """The file of example ``index``."""
    return os.path.join(self.root, os.fsdecode(self._paths[index]))

  def __getitem__(self, index: int) -> dict[str, Any]:
    path = self.path(index)
    label = int(self._labels[index])
    try:
      image = load_image(path, self._channels)
    except Exception as e:  # pylint: disable=broad-except; one unreadable file must not end a run
      return {"image": None, "label": label, "path": path, "error": f"{type(e).__name__}: {e}"}
    return {"image": image, "label": label}


def _list_images(top: str, extensions: tuple[str, ...],
                 recursive: bool = True) -> tuple[list[str], int]:
  """Sorted image paths relative to ``top``, and the number of other (non-hidden) files."""
  images, others = [], 0
  for directory, subdirectories, files in os.walk(top, followlinks=True):
    # Pruning in place is how os.walk is told not to descend; sorting fixes the visiting order.
    subdirectories[:] = sorted(d for d in subdirectories if recursive and not d.startswith("."))
    relative = os.path.relpath(directory, top)
    for file in sorted(files):
      if file.startswith("."):
        continue
      if file.lower().endswith(extensions):
        images.append(file if relative == "." else os.path.join(relative, file))
      else:
        others += 1
  return images, others


def open_split(data_dir: Optional[str], split: str, *, channels: int = 3) -> ImageFolderSource:
  """The source for ``split`` of the image folder ``data_dir`` (``config.data.source='folder'``).

  ``data_dir/<split>`` is read if it is a folder (``data_dir/train``, ``data_dir/val``, ...);
  otherwise the split ``'train'`` is ``data_dir`` itself, and any other split is an error. A split
  other than 'train' takes its label names from ``data_dir/train`` when that is a folder of class
  folders, so that labels agree between training and evaluation.

  Raises:
    FileNotFoundError: ``data_dir`` is unset or missing, the split has no folder, or it is empty.
    ValueError: as ``ImageFolderSource`` (e.g. a class folder that 'train' lacks).
  """
  if not data_dir:
    raise FileNotFoundError("config.data.source='folder' needs config.data.data_dir: the folder "
                            "that holds the images, or one sub-folder per split")
  if not os.path.isdir(data_dir):
    what = "is not a folder" if os.path.exists(data_dir) else "does not exist"
    raise FileNotFoundError(f"image folder {data_dir} (config.data.data_dir) {what}")
  root = os.path.join(data_dir, split)
  if not os.path.isdir(root):
    if split != "train":
      raise FileNotFoundError(
          f"split {split!r} of image folder {data_dir} not found: {root} is not a folder (the "
          f"sub-folders are {list(find_classes(data_dir))}). Only 'train' may be {data_dir} "
          "itself; set config.data.eval_split to an existing split, or to None")
    root = data_dir
  classes = None
  train = os.path.join(data_dir, "train")
  if split != "train" and os.path.isdir(train):
    classes = find_classes(train) or None
  return ImageFolderSource(root, channels=channels, classes=classes)
