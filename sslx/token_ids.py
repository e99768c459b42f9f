r"""Precomputed visual-token ids for BEiT: the file, how the data pipeline delivers it, and the command that
writes it from an sslx tokenizer run.

The file is a ``.npy`` of integer ids, one row per example of the training split (``config.data.split``) in
the source's index order:

- ``(N, h, w)``: the ids of each example's whole-image view (below) on the encoder's ``h x w`` patch grid;
- ``(N, 2, h, w)``: those, then the ids of the same view mirrored left-right.

Any tokenizer may write it (DALL-E's, BEiT v2's, ...); ``python -m sslx.token_ids`` writes it from an sslx
tokenizer run (`sslx.methods.tokenizer`). ``config.data.token_ids_file`` names it; the training loader then
memory-maps it (``np.load(mmap_mode='r')``: an ImageNet-size file is never read into memory) and every batch
holds ``batch['token_ids']`` int32 ``(B, h, w)``, the ids of each row's example, aligned with its image. A
BEiT run reads them with ``config.method.token_ids_key='token_ids'`` and ``config.method.vocab_size=K``
(`sslx.methods.beit` checks the grid and that every id lies in ``[0, K)`` before anything compiles).

Views. Ids are computed once per example, so they describe one fixed view: a random crop would put them over
other patches than the ones they describe. The training augmentation (``config.data.augmentation``) must
therefore start with ``center_crop(S, ...)`` (``S = config.data.image_size``; with ``crop_fraction=1.0`` and
a square source, the whole image), the view the ids are of. After it:

- ``hflip`` mirrors the image and picks the mirrored ids: row 1 of an ``(N, 2, h, w)`` file, exact; or the
  ``(N, h, w)`` grid mirrored, where each id stays over the patch it describes but equals the id of the
  mirrored patch only for a tokenizer that is itself mirror-symmetric (a learned one rarely is);
- pixel-wise ops (``color_jitter``, ``grayscale``, ``blur``, ``solarize``, ``normalize``) change no geometry:
  the targets stay the ids of the image before them.

Anything else (the default random resized crop, a second crop, several ``config.data.views``, video) is
refused with a ValueError naming the key, before anything is built; so is, with
``config.data.augment_on='device'``, an ``hflip`` after a pixel-wise op (the step would flip, not the
loader). ``configs/beit_fashion_mnist.py:token_ids=PATH`` sets the file, the batch key and
``center_crop(28, crop_fraction=1.0)|hflip`` at once.

Undecodable files (`sslx.data.sources.SkipBadExamples`) are replaced by a neighbour together with its ids: the
ids ride on the source, inside that wrapper.

Writing from a tokenizer run (one process; ``--config`` is the BEiT config the ids are for, whose split,
whole-image view and patch grid it reads; the view is mirrored too when that config flips)::

  python -m sslx.token_ids --tokenizer_run=runs/tokenizer \
      --config=configs/beit_fashion_mnist.py:token_ids=runs/ids.npy --out=runs/ids.npy
  python -m sslx.main --config=configs/beit_fashion_mnist.py:token_ids=runs/ids.npy \
      --config.method.vocab_size=512 --workdir=runs/beit_ids

The ids are those `sslx.methods.beit` computes in its step from the same run (``tokenizer=RUN_DIR``):
`sslx.methods.beit.target_fn` on the view normalised with ``config.data.mean`` / ``std``.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import os
import sys
from typing import Any

import grain
import numpy as np

from sslx.data import sources
from sslx.data import transforms
from sslx.data import video

BATCH_KEY = "token_ids"
CONFIG_KEY = "config.data.token_ids_file"
_PIXEL_OPS = ("color_jitter", "grayscale", "blur", "solarize", "normalize")
_COLUMNS = np.array([[[0], [1]]], np.uint8)  # (1, 2, 1): a flip op's draw shows as the columns' order
_SCAN_ROWS = 1 << 16  # examples per chunk when scanning the ids' range


def whole_image_view(size: int) -> str:
  """The augmentation spec of the whole ``size`` px image, flipped at random."""
  return f"center_crop({size}, crop_fraction=1.0)|hflip"


def use_token_ids_file(config, path: str) -> None:
  """Points a BEiT config at the ids in ``path``: ``config.data.token_ids_file``, `whole_image_view` as
  ``config.data.augmentation`` and ``config.method.token_ids_key`` (``vocab_size`` is left to set)."""
  config.data.token_ids_file = path
  config.data.augmentation = whole_image_view(config.data.image_size)
  config.method.token_ids_key = BATCH_KEY


# ---------------------------------------------------------------------------------------------------------
# Checks: of the config (no file access), then of the file.

def check_data_config(data_config) -> None:
  """Raises a ValueError naming the key unless the training view keeps the ids aligned (module docstring)."""
  path = data_config.get("token_ids_file")
  if path is None:
    return
  if not isinstance(path, str) or not path.strip():
    raise ValueError(f"{CONFIG_KEY}={path!r} must be None or the path of a .npy of token ids")
  check_view(data_config, f"{CONFIG_KEY}={path!r}")


def check_view(data_config, where: str) -> None:
  """The part of `check_data_config` that the writer checks too: the training view (``where`` names the
  ids)."""
  if video.is_video(data_config):
    raise ValueError(f"{where}: config.data.source={data_config.source!r} gives clips; token ids are per "
                     "image")
  if data_config.get("views") is not None:
    raise ValueError(f"{where}: token ids go with one view, 'image', but config.data.views is set; use "
                     "config.data.augmentation")
  spec = data_config.get("augmentation")
  calls = transforms.parse_ops(spec) if spec is not None else []
  if not calls or calls[0].name != "center_crop":
    shown = spec if spec is not None else "None (a random resized crop from config.data.augment)"
    raise ValueError(f"{where}: config.data.augmentation={shown!r} must start with the fixed view the ids "
                     f"are of, center_crop, e.g. {whole_image_view(data_config.image_size)!r}: ids of a "
                     "fixed view do not describe the patches of a random crop")
  on_device = data_config.get("augment_on", "host") == "device"
  for position, call in enumerate(calls[1:], 1):
    if call.name not in ("hflip", *_PIXEL_OPS):
      raise ValueError(f"{where}: config.data.augmentation={spec!r} has {call.text!r} after its center_crop; "
                       f"with token ids only hflip and pixel-wise ops {_PIXEL_OPS} may follow it, as they "
                       "move no patch (or move the ids with it)")
    if on_device and call.name == "hflip" and any(c.name != "hflip" for c in calls[1:position]):
      raise ValueError(f"{where}: config.data.augmentation={spec!r} flips after a pixel-wise op, so "
                       "config.data.augment_on='device' flips in the step, where the ids cannot follow; put "
                       "hflip right after center_crop")


def open_ids(path: str) -> np.ndarray:
  """The ids in ``path``, memory-mapped and checked: integers, ``(N, h, w)`` or ``(N, 2, h, w)``.

  Raises:
    FileNotFoundError: no file there.
    ValueError: naming the file, for anything but such an array.
  """
  where = f"{CONFIG_KEY}={path!r}"
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{where}: no such file (write one with `python -m sslx.token_ids`)")
  try:
    ids = np.load(path, mmap_mode="r", allow_pickle=False)
  except (ValueError, OSError, EOFError) as error:
    raise ValueError(f"{where} is not a readable .npy array: {error}") from None
  if not isinstance(ids, np.ndarray):
    raise ValueError(f"{where} is an archive of several arrays; save one array with np.save")
  if not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"{where} holds {ids.dtype} values; token ids must be integers")
  mirrored = ids.ndim == 4 and ids.shape[1] == 2
  if not (ids.ndim == 3 or mirrored) or 0 in ids.shape:
    raise ValueError(f"{where} has shape {ids.shape}; expected (N, h, w) ids, or (N, 2, h, w) with the "
                     "mirrored view's ids second")
  return ids


def grid_of(path: str) -> tuple[int, int]:
  """``(h, w)`` of the ids in ``path``."""
  return tuple(open_ids(path).shape[-2:])


def check_count(path: str, num_examples: int, split: str) -> None:
  """The file must hold one row per example of the split."""
  shape = open_ids(path).shape
  if shape[0] != num_examples:
    raise ValueError(f"{CONFIG_KEY}={path!r} has shape {shape}, {shape[0]} rows, but the training split "
                     f"config.data.split={split!r} has {num_examples} examples: the file must hold the ids "
                     "of every example, in the source's order")


def id_range(path: str) -> tuple[int, int]:
  """``(smallest, largest)`` id in ``path``, read in chunks (remembered while the file is unchanged)."""
  status = os.stat(path)
  return _scan_range(os.path.abspath(path), status.st_size, status.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _scan_range(path: str, size: int, mtime_ns: int) -> tuple[int, int]:
  del size, mtime_ns  # the cache key: a rewritten file is scanned again
  ids = open_ids(path)
  low, high = None, None
  for start in range(0, ids.shape[0], _SCAN_ROWS):
    chunk = np.asarray(ids[start:start + _SCAN_ROWS])
    low = int(chunk.min()) if low is None else min(low, int(chunk.min()))
    high = int(chunk.max()) if high is None else max(high, int(chunk.max()))
  return low, high


# ---------------------------------------------------------------------------------------------------------
# In the pipeline.

class WithTokenIds:
  """A source whose examples also hold ``'token_ids'``: row ``i`` of the file for example ``i``.

  Pickles the path, not the array; each worker process memory-maps the file on first access.
  """

  def __init__(self, source, path: str, split: str):
    check_count(path, len(source), split)
    self._source = source
    self._path = path
    self._ids = None

  def __getstate__(self):
    return {**self.__dict__, "_ids": None}

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    if self._ids is None:
      self._ids = open_ids(self._path)
    return {**self._source[index], BATCH_KEY: np.array(self._ids[index])}


@dataclasses.dataclass(frozen=True)
class ViewWithTokenIds(grain.transforms.RandomMap):
  """The training view of 'image' (as `sslx.data.views.TrainViews` makes it without views: the same ops
  drawing from the same generator, so the same pixels) and the int32 ``(h, w)`` ids of that view.

  Attributes:
    augmentation: the view (`check_data_config` has checked its spec).
    flips: per op of ``augmentation``, whether it is an ``hflip``.
  """
  augmentation: transforms.Augmentation
  flips: tuple[bool, ...]

  @classmethod
  def of(cls, augmentation: transforms.Augmentation) -> "ViewWithTokenIds":
    names = tuple(call.name == "hflip" for call in transforms.parse_ops(augmentation.spec))
    return cls(augmentation, names)

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    image, flipped = element["image"], False
    for op, is_flip in zip(self.augmentation.ops, self.flips, strict=True):
      if is_flip:
        # The op itself, on a copy of the generator in its current state, says whether it mirrors this image.
        flipped ^= bool(op(_COLUMNS, copy.deepcopy(rng))[0, 0, 0])
      image = op(image, rng)
    ids = element[BATCH_KEY]
    if ids.ndim == 3:
      ids = ids[int(flipped)]
    elif flipped:
      ids = ids[:, ::-1]
    return {**element, "image": image, BATCH_KEY: np.ascontiguousarray(ids, np.int32)}


# ---------------------------------------------------------------------------------------------------------
# Writing the file from an sslx tokenizer run.

@dataclasses.dataclass(frozen=True)
class _FixedView(grain.transforms.Map):
  """An example's fixed view (the spec's center_crop), normalised as the training batches are; a file that
  cannot be decoded becomes a blank image and its path."""
  crop: transforms.Augmentation
  mean: tuple[float, ...]
  std: tuple[float, ...]
  shape: tuple[int, int, int]

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    if sources.is_bad(element):
      return {"image": np.zeros(self.shape, np.float32), "bad_path": element["path"]}
    image = self.crop(element["image"], np.random.default_rng(0))  # center_crop draws nothing
    return {"image": transforms.normalize(image, self.mean, self.std), "bad_path": ""}


def tokenizer_config(config, tokenizer_run: str, out: str):
  """A copy of the BEiT config ``config`` that tokenizes with ``tokenizer_run`` in its step, checked as a run
  of it would be (`sslx.checks.validate_run_config`): its patch grid, channels and split; and the view of
  ``config`` must suit token ids (`check_view`).

  Raises:
    sslx.checks.ConfigError: naming the key.
  """
  from sslx import checks  # pylint: disable=g-import-not-at-top; the data workers need none of the writer's
  from sslx.methods import beit  # pylint: disable=g-import-not-at-top

  if config.method.get("name") != "beit":
    raise checks.ConfigError(f"config.method.name={config.method.get('name')!r}: token ids are BEiT's "
                             "targets; pass a BEiT config (e.g. configs/beit_fashion_mnist.py)")
  try:
    check_view(config.data, f"--out={out!r}")
  except ValueError as error:
    raise checks.ConfigError(str(error)) from None
  config = copy.deepcopy(config)
  config.unlock()
  # The BEiT run that computes its ids in the step: its own token source and vocabulary are the tokenizer's.
  config.data.token_ids_file = None
  config.method.update(dict(token_ids_key=None, vocab_size=None))
  try:
    beit.use_tokenizer_run(config, tokenizer_run)
  except FileNotFoundError as error:
    raise FileNotFoundError(f"--tokenizer_run={tokenizer_run!r}: {error}") from None
  except ValueError as error:
    raise checks.ConfigError(f"--tokenizer_run={tokenizer_run!r}: {error}") from None
  checks.validate_run_config(config)
  return config


def write(config, tokenizer_run: str, out: str, *, batch_size: int = 256, log=print) -> tuple[int, ...]:
  """Writes to ``out`` the ids that ``tokenizer_run`` gives the training split of the BEiT config ``config``
  (module docstring), through a temporary file, so that ``out`` is whole or absent. Returns its shape."""
  import jax  # pylint: disable=g-import-not-at-top
  from sslx import init_from  # pylint: disable=g-import-not-at-top
  from sslx import parallel  # pylint: disable=g-import-not-at-top
  from sslx.methods import beit  # pylint: disable=g-import-not-at-top

  config = tokenizer_config(config, tokenizer_run, out)
  data, tokenizer = config.data, config.method.tokenizer
  calls = transforms.parse_ops(data.augmentation)
  mirrored = any(call.name == "hflip" for call in calls)
  size, channels = data.image_size, data.channels
  view = _FixedView(transforms.build_augmentation(calls[0].text), tuple(data.mean), tuple(data.std),
                    (size, size, channels))
  source = sources.make_source(data, data.split)
  grid = tokenizer.data.image_size // tokenizer.method.downsample
  vocab_size = tokenizer.method.vocab_size
  shape = (len(source), *((2,) if mirrored else ()), grid, grid)

  reader = init_from.RunReader(tokenizer_run, parallel.create_mesh(1))
  state = reader.state()
  reader.close()
  variables = {"params": {"encoder": state["params"]["encoder"]}, **state["model_state"]}
  _, tokenize = beit.target_fn(config)
  ids_of = jax.jit(lambda tokenizer_variables, images: tokenize({"tokenizer": tokenizer_variables},
                                                                {"image": images}))

  batches = grain.MapDataset.source(source).map(view).batch(batch_size).to_iter_dataset()
  if data.num_workers > 0:
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.num_workers))
  partial = out + ".partial"
  array = np.lib.format.open_memmap(partial, mode="w+", dtype=np.int16 if vocab_size <= 2**15 else np.int32,
                                    shape=shape)
  start, bad_files = 0, []
  for batch in batches:
    images, rows = batch["image"], len(batch["image"])
    # One compiled shape: the last batch is padded.
    images = np.pad(images, ((0, batch_size - rows), (0, 0), (0, 0), (0, 0)))
    ids = [np.asarray(ids_of(variables, images))]
    if mirrored:
      ids.append(np.asarray(ids_of(variables, images[:, :, ::-1])))
    array[start:start + rows] = np.stack(ids, 1)[:rows].reshape(rows, *shape[1:])
    bad_files += [str(path) for path in batch["bad_path"] if path]
    start += rows
  array.flush()
  del array
  os.replace(partial, out)
  if bad_files:
    log(f"{len(bad_files)} undecodable file(s): their rows hold the ids of a blank image, which training "
        f"never reads (sslx.data.sources.SkipBadExamples replaces such an example, ids and all): {bad_files}")
  log(f"Wrote {out}: {shape} ids of the tokenizer run {tokenizer_run} for the {len(source)} examples of "
      f"config.data.split={data.split!r}{' (then of their mirror images)' if mirrored else ''}. Train with "
      f"{CONFIG_KEY}={out} and --config.method.vocab_size={vocab_size}")
  return shape


def _main(argv) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from sslx import checks  # pylint: disable=g-import-not-at-top
  from sslx import token_ids  # pylint: disable=g-import-not-at-top; grain pickles classes by importable names

  del argv
  values = flags.FLAGS
  try:
    token_ids.write(values.config, values.tokenizer_run, values.out, batch_size=values.batch_size)
  except (checks.ConfigError, FileNotFoundError) as error:
    print(f"error: {error}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from sslx import cli  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file("config", None, "The BEiT config the ids are for: configs/<file>.py[:arg].",
                                  lock_config=True)
  flags.DEFINE_string("tokenizer_run", None, "--workdir of an sslx tokenizer run (sslx.methods.tokenizer).")
  flags.DEFINE_string("out", None, "The .npy file to write.")
  flags.DEFINE_integer("batch_size", 256, "Images tokenized per call.", lower_bound=1)
  flags.mark_flags_as_required(["config", "tokenizer_run", "out"])
  cli.run(_main)
