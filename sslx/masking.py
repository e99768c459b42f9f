"""Pure, jit-friendly mask generators over a sequence of patches.

Every generator takes a ``jax.random`` key and static shapes and returns arrays whose shapes depend on
those static arguments only, so it runs under ``jax.jit`` and ``jax.vmap``. Masks are boolean ``(B, L)``
in row-major patch order over an ``(h, w)`` grid of model patches (``L = h * w``), True = masked, except
MAE's :func:`random_masking`, which returns kept indices, a float mask and the restore permutation.
Bad static arguments raise a ``ValueError`` naming the argument before anything is traced.

- :func:`random_masking` (MAE token dropping) and :func:`random_mask` (uniform, boolean);
- :func:`simmim_mask`: uniform over mask-patches coarser than the model's patches (SimMIM);
- :func:`blockwise_mask`: rectangular blocks (BEiT), from :func:`sample_block`, :func:`place_blocks`,
  :func:`top_up_mask`;
- :func:`grid_mask`: one visible patch per ``stride x stride`` cell (MAE's grid ablation);
- :func:`importance_mask`: the patches a score ranks highest or lowest (AttMask);
- :func:`progressive_mask_ratio`: a linear ratio schedule over the run.

`sslx.mask_policy` picks one of them from a run's ``config.method`` for MAE, SimMIM and BEiT.

Progressive masking without recompiling: the mask ratio may be a traced scalar. Methods that keep every
token and replace the masked ones by a mask token (SimMIM, BEiT) consume a fixed-size boolean mask whose
masked count changes in-graph (:func:`random_mask`, :func:`simmim_mask` select the patches whose noise
ranks below the count), so one compiled step serves every ratio. Methods that drop masked tokens (MAE)
need the number of visible tokens as a static shape; there a schedule must be quantised to a few shape
buckets, each compiled once, rather than recompiling for every ratio.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def uniform_noise(key: jax.Array, batch: int, num_patches: int) -> jax.Array:
  """Per-patch uniform noise in [0, 1) whose ranking drives :func:`random_masking`."""
  return jax.random.uniform(key, (batch, num_patches), jnp.float32)


def _len_keep(num_patches: int, mask_ratio: float) -> int:
  return int(num_patches * (1 - mask_ratio))


def num_kept(num_patches: int, mask_ratio: float) -> int:
  """Number of visible patches, ``int(L * (1 - mask_ratio))`` as in the reference MAE code.

  Raises:
    ValueError: the ratio is not in (0, 1), leaves no patch visible, or (below about 1e-16 L, where
      ``1 - mask_ratio`` rounds to 1) masks none, which would leave the loss nothing to average over.
  """
  if not 0.0 < mask_ratio < 1.0:
    raise ValueError(f"mask_ratio must lie strictly between 0 and 1, got {mask_ratio}.")
  len_keep = _len_keep(num_patches, mask_ratio)
  if len_keep < 1:
    raise ValueError(f"mask_ratio={mask_ratio} leaves no visible patch out of {num_patches}.")
  if len_keep >= num_patches:
    raise ValueError(f"mask_ratio={mask_ratio} masks none of the {num_patches} patches.")
  return len_keep


def max_mask_ratio(num_patches: int) -> float:
  """The largest ratio `num_kept` accepts for ``num_patches`` patches: ``1 - 1/L`` up to float rounding."""
  if num_patches < 2:
    raise ValueError(f"{num_patches} patch(es) cannot be split into visible and masked ones.")
  ratio = 1.0 - 1.0 / num_patches
  # The product rounds either way, so the exact float boundary is a few steps from 1 - 1/L.
  while _len_keep(num_patches, ratio) < 1:
    ratio = math.nextafter(ratio, 0.0)
  while _len_keep(num_patches, math.nextafter(ratio, 1.0)) >= 1:
    ratio = math.nextafter(ratio, 1.0)
  return ratio


def random_masking(noise: jax.Array, mask_ratio: float):
  """MAE random masking: per image, keeps the patches with the smallest noise.

  Args:
    noise: ``(B, L)`` noise, e.g. from :func:`uniform_noise`; its per-row argsort is the shuffle.
    mask_ratio: fraction of patches to remove, in (0, 1); a static Python float.

  Returns:
    ``ids_keep`` ``(B, len_keep)`` int32 indices of the visible patches (in shuffled order),
    ``mask`` ``(B, L)`` float32 in original patch order with 1 = masked (removed) and 0 = kept, and
    ``ids_restore`` ``(B, L)`` int32, the inverse permutation of the shuffle.
  """
  len_keep = num_kept(noise.shape[1], mask_ratio)
  ids_shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)
  ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
  ids_keep = ids_shuffle[:, :len_keep]
  # ids_restore[i] is patch i's rank in the shuffle; the first len_keep ranks are kept.
  mask = (ids_restore >= len_keep).astype(jnp.float32)
  return ids_keep, mask, ids_restore


# Relative slack taken off ``L * ratio`` before rounding: float32 carries ~1.2e-7 relative error in the
# product (25 * 0.6 lands just above 15), and no ratio a user means lies this close above an integer.
_COUNT_SLACK = 1e-5


def _grid_hw(grid) -> tuple[int, int]:
  """``grid`` as ``(h, w)``: an int means a square grid."""
  hw = (grid, grid) if isinstance(grid, numbers.Integral) else tuple(grid)
  if len(hw) != 2 or not all(isinstance(n, numbers.Integral) and n >= 1 for n in hw):
    raise ValueError(f"grid must be a positive int or a pair (h, w) of positive ints, got {grid!r}.")
  return int(hw[0]), int(hw[1])


def _check_positive(name: str, value) -> int:
  if not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}.")
  return int(value)


def _check_ratio(name: str, ratio) -> None:
  """Checks a static ratio lies in (0, 1); a traced one cannot be checked here and is left alone."""
  if isinstance(ratio, numbers.Real) and not 0.0 < ratio < 1.0:
    raise ValueError(f"{name} must lie strictly between 0 and 1, got {ratio}.")


def _count(num: int, ratio, minus: float = 0.0):
  """``ceil(num * ratio - minus)`` in float32 with the slack taken off ``num * ratio``, clipped to ``[0, num]``.

  numpy for a static ratio (so it can be checked before tracing), jnp for a traced one; same arithmetic.
  """
  xp = np if isinstance(ratio, numbers.Real) else jnp
  scaled = xp.float32(num) * xp.asarray(ratio, xp.float32) * xp.float32(1 - _COUNT_SLACK)
  return xp.clip(xp.ceil(scaled - xp.float32(minus)), 0, num)


def _ranks(values: jax.Array) -> jax.Array:
  """Each entry's rank along the last axis (0 = smallest); ties go to the lower index, so ranks are a permutation."""
  return jnp.argsort(jnp.argsort(values, axis=-1, stable=True), axis=-1, stable=True)


def _select_by_rank(key: jax.Array, batch: int, n: int, count: jax.Array) -> jax.Array:
  """``(batch, n)`` bool with exactly ``count`` True per row, uniformly at random; ``count`` may be traced."""
  return _ranks(uniform_noise(key, batch, n)) < count


def simmim_mask_count(num_cells: int, mask_ratio: float) -> int:
  """How many of ``num_cells`` cells :func:`simmim_mask` masks per image at a static ``mask_ratio``."""
  return int(_count(num_cells, mask_ratio))


def random_mask_count(num_patches: int, mask_ratio: float) -> int:
  """How many patches :func:`random_mask` masks per image at a static ``mask_ratio``."""
  return int(_count(num_patches, mask_ratio, minus=0.5))


def simmim_mask(key: jax.Array, batch: int, grid, mask_patch: int, mask_ratio) -> jax.Array:
  """SimMIM random masking with mask-patches larger than the model's patches (Xie et al., 2022).

  Follows ``MaskGenerator`` in microsoft/SimMIM ``data/data_simmim.py``: the ``(h, w)`` grid of model patches
  is tiled by ``n = (h / mask_patch) * (w / mask_patch)`` cells of ``mask_patch x mask_patch`` model patches
  (32 px mask-patches over 16 px model patches: ``mask_patch=2``); exactly ``ceil(n * mask_ratio)`` cells
  per image are masked, chosen uniformly at random, and every model patch of a masked cell is masked.

  The count is computed in-graph and the cells are those whose random noise ranks below it, so
  ``mask_ratio`` may be a traced scalar (a progressive schedule) without changing any shape or
  recompiling. ``n * mask_ratio`` loses a relative 1e-5 before the ceiling so that float rounding cannot
  add a cell (``ceil(10 * 0.6)`` is 6, not 7).

  Args:
    key: a ``jax.random`` key.
    batch: number of masks.
    grid: ``(h, w)`` model patches, or an int for a square grid; each side divisible by ``mask_patch``.
    mask_patch: side of a mask cell in model patches.
    mask_ratio: fraction of cells to mask: a Python float in (0, 1), or a traced scalar (its count is
      clipped to ``[0, n]``).

  Returns:
    ``(batch, h * w)`` bool, True = masked, in row-major patch order.
  """
  h, w = _grid_hw(grid)
  mask_patch = _check_positive("mask_patch", mask_patch)
  if h % mask_patch or w % mask_patch:
    raise ValueError(f"grid {(h, w)} is not divisible by mask_patch={mask_patch}.")
  _check_ratio("mask_ratio", mask_ratio)
  cells_h, cells_w = h // mask_patch, w // mask_patch
  num_cells = cells_h * cells_w
  count = _count(num_cells, mask_ratio)
  cells = _select_by_rank(key, batch, num_cells, count).reshape(batch, cells_h, 1, cells_w, 1)
  patches = jnp.broadcast_to(cells, (batch, cells_h, mask_patch, cells_w, mask_patch))
  return patches.reshape(batch, h * w)


def random_mask(key: jax.Array, batch: int, num_patches: int, mask_ratio) -> jax.Array:
  """Uniform random boolean mask with exactly ``round(num_patches * mask_ratio)`` masked patches per image.

  ``round`` goes to the nearest integer with halves rounding down (``ceil(x - 1/2)``), computed in float32
  after the same 1e-5 relative slack as :func:`simmim_mask`, so a float product landing a hair either
  side of a half still gives the same count. The patches are those whose uniform noise ranks below the count, so ``mask_ratio``
  may be traced (a progressive schedule): the count changes in-graph, the shape never does.

  Args:
    key: a ``jax.random`` key.
    batch: number of masks.
    num_patches: ``L``.
    mask_ratio: a Python float in (0, 1) masking at least one patch, or a traced scalar (count clipped to
      ``[0, L]``).

  Returns:
    ``(batch, num_patches)`` bool, True = masked.
  """
  num_patches = _check_positive("num_patches", num_patches)
  _check_ratio("mask_ratio", mask_ratio)
  count = _count(num_patches, mask_ratio, minus=0.5)
  if isinstance(mask_ratio, numbers.Real) and count < 1:
    raise ValueError(f"mask_ratio={mask_ratio} masks none of the {num_patches} patches.")
  return _select_by_rank(key, batch, num_patches, count)


def progressive_mask_ratio(step, total_steps: int, start, end) -> jax.Array:
  """Mask ratio moving linearly from ``start`` at step 0 to ``end`` at ``total_steps``, constant outside.

  ``step`` may be traced (the train step inside ``jax.jit``); the float32 result feeds :func:`random_mask`
  or :func:`simmim_mask` directly, without recompiling (see the module docstring).

  Raises:
    ValueError: ``total_steps`` is not a positive int, or a static ``start``/``end`` is outside (0, 1).
  """
  total_steps = _check_positive("total_steps", total_steps)
  _check_ratio("start", start)
  _check_ratio("end", end)
  progress = jnp.clip(jnp.asarray(step, jnp.float32) / total_steps, 0.0, 1.0)
  start = jnp.asarray(start, jnp.float32)
  return start + (jnp.asarray(end, jnp.float32) - start) * progress


def grid_mask(key: jax.Array | None, batch: int, grid, stride: int = 2) -> jax.Array:
  """Regular grid-wise masking, the ablation of He et al. (MAE, 2022, Fig. 6): one patch per cell is visible.

  The grid is tiled by ``stride x stride`` cells and exactly one patch of each stays visible, the one at
  offset ``(dy, dx)`` inside its cell, so ``1 - 1 / stride**2`` of the patches are masked (stride 2: 75%).
  Without a key the offset is ``(0, 0)`` for every image; with a key each image draws its own offset
  uniformly from ``[0, stride)**2``.

  Args:
    key: a ``jax.random`` key, or None for the fixed lattice.
    batch: number of masks.
    grid: ``(h, w)`` or an int; each side divisible by ``stride``.
    stride: cell side, at least 2.

  Returns:
    ``(batch, h * w)`` bool, True = masked.
  """
  h, w = _grid_hw(grid)
  if not isinstance(stride, numbers.Integral) or stride < 2:
    raise ValueError(f"stride must be an int of at least 2, got {stride!r}.")
  if h % stride or w % stride:
    raise ValueError(f"grid {(h, w)} is not divisible by stride={stride}.")
  if key is None:
    offsets = jnp.zeros((batch, 2), jnp.int32)
  else:
    offsets = jax.random.randint(key, (batch, 2), 0, stride)
  rows = jnp.arange(h)[None, :, None]
  cols = jnp.arange(w)[None, None, :]
  visible = ((rows % stride == offsets[:, 0, None, None]) & (cols % stride == offsets[:, 1, None, None]))
  return ~visible.reshape(batch, h * w)


def importance_mask(key: jax.Array, scores: jax.Array, num_masked: int, *, random_share: float = 0.0,
                    highest: bool = True) -> jax.Array:
  """Importance-guided masking, after AttMask (Kakogeorgiou et al., "What to Hide from Your Students", 2022).

  Per image, the ``round((1 - random_share) * num_masked)`` patches ranked highest by ``scores`` (lowest
  with ``highest=False``) are masked; the remaining ``num_masked`` minus that are drawn uniformly at random
  among the other patches. Equal scores rank by patch index (the lower index counts as the more extreme),
  so the score-driven part is deterministic and every image has exactly ``num_masked`` masked patches.

  Args:
    key: a ``jax.random`` key for the random share.
    scores: ``(B, L)`` per-patch importance, e.g. the class-token attention of an EMA teacher (not
      differentiated through).
    num_masked: patches masked per image, in ``[1, L]``.
    random_share: fraction of ``num_masked`` drawn at random instead of by score, in ``[0, 1]``.
    highest: mask the most (True) or the least (False) important patches.

  Returns:
    ``(B, L)`` bool, True = masked.
  """
  if scores.ndim != 2:
    raise ValueError(f"scores must be (batch, num_patches), got shape {scores.shape}.")
  batch, num_patches = scores.shape
  if not isinstance(num_masked, numbers.Integral) or not 1 <= num_masked <= num_patches:
    raise ValueError(f"num_masked must be an int in [1, {num_patches}], got {num_masked!r}.")
  if not 0.0 <= random_share <= 1.0:
    raise ValueError(f"random_share must lie in [0, 1], got {random_share}.")
  num_by_score = round((1 - random_share) * num_masked)
  scores = jax.lax.stop_gradient(scores)
  by_score = _ranks(-scores if highest else scores) < num_by_score
  # Noise lies in [0, 1), so the score-picked patches (-1) rank first and the lowest noise fills the rest.
  priority = jnp.where(by_score, -1.0, uniform_noise(key, batch, num_patches))
  return _ranks(priority) < num_masked


class Block(NamedTuple):
  """One block proposal of :func:`sample_block`: its placement and the draws it was rounded from."""
  top: jax.Array
  left: jax.Array
  height: jax.Array
  width: jax.Array
  area: jax.Array
  aspect: jax.Array


def _check_aspect(aspect) -> tuple[float, float]:
  low, high = aspect
  if not 0 < low <= high:
    raise ValueError(f"aspect must be a range (low, high) with 0 < low <= high, got {aspect!r}.")
  return float(low), float(high)


def sample_block(key: jax.Array, grid, min_area, max_area, aspect=(0.3, 1 / 0.3)) -> Block:
  """One attempt of BEiT's block proposal (``MaskingGenerator._mask`` in microsoft/unilm, Bao et al., 2022).

  Draws a target ``area`` uniform between ``min_area`` and ``max_area`` (either may be the larger, as with
  Python's ``random.uniform``) and an ``aspect`` log-uniform in ``aspect = (low, high)``; the block is
  ``height = round(sqrt(area * aspect))`` by ``width = round(sqrt(area / aspect))`` (halves to even, as
  Python's ``round``), with ``top`` uniform in ``[0, h - height]`` and ``left`` in ``[0, w - width]``.
  The block fits only if ``height < h`` and ``width < w`` (strictly, as the reference); for one that does
  not, ``top``/``left`` are 0 and meaningless. ``max_area`` may be traced.
  """
  h, w = _grid_hw(grid)
  log_low, log_high = (math.log(a) for a in _check_aspect(aspect))
  area_key, aspect_key, top_key, left_key = jax.random.split(key, 4)
  area = min_area + (max_area - min_area) * jax.random.uniform(area_key)
  ratio = jnp.exp(jax.random.uniform(aspect_key, minval=log_low, maxval=log_high))
  height = jnp.round(jnp.sqrt(area * ratio)).astype(jnp.int32)
  width = jnp.round(jnp.sqrt(area / ratio)).astype(jnp.int32)
  return Block(_uniform_offset(top_key, h - height), _uniform_offset(left_key, w - width), height, width,
               area, ratio)


def _uniform_offset(key: jax.Array, last: jax.Array) -> jax.Array:
  """Uniform int in ``[0, last]`` (0 when ``last < 0``)."""
  draw = jnp.floor(jax.random.uniform(key) * (last + 1)).astype(jnp.int32)
  # u * n can round up to n in float32.
  return jnp.clip(draw, 0, jnp.maximum(last, 0))


def _block_region(block: Block, h: int, w: int) -> jax.Array:
  rows = jnp.arange(h)[:, None]
  cols = jnp.arange(w)[None, :]
  return ((rows >= block.top) & (rows < block.top + block.height)
          & (cols >= block.left) & (cols < block.left + block.width))


def _check_block_args(grid, num_masked, min_block, max_block, aspect, max_attempts):
  h, w = _grid_hw(grid)
  if not isinstance(num_masked, numbers.Integral) or not 1 <= num_masked <= h * w:
    raise ValueError(f"num_masked must be an int in [1, {h * w}], got {num_masked!r}.")
  min_block = _check_positive("min_block", min_block)
  if min_block > num_masked:
    raise ValueError(f"min_block={min_block} exceeds num_masked={num_masked}.")
  max_block = num_masked if max_block is None else _check_positive("max_block", max_block)
  if max_block < min_block:
    raise ValueError(f"max_block={max_block} is below min_block={min_block}.")
  return h, w, min_block, max_block, _check_aspect(aspect), _check_positive("max_attempts", max_attempts)


def place_blocks(key: jax.Array, grid, num_masked: int, *, min_block: int = 16, max_block: int | None = None,
                 aspect=(0.3, 1 / 0.3), max_attempts: int = 10) -> jax.Array:
  """BEiT's block-wise masking of one image, as ``MaskingGenerator.__call__`` (microsoft/unilm ``beit``).

  While fewer than ``num_masked`` patches are masked, places one more block: up to ``max_attempts``
  proposals of :func:`sample_block` with areas between ``min_block`` and ``min(remaining, max_block)``;
  the first that fits the grid and adds between 1 and ``min(remaining, max_block)`` newly masked patches
  (overlapping earlier blocks is allowed) is masked. It stops when the count is reached or a block fails
  all its attempts, so it may end short of ``num_masked`` (never above); :func:`blockwise_mask` tops up.
  Each placed block adds a patch, so at most ``num_masked`` blocks run through the ``lax.while_loop``.

  Returns:
    ``(h * w,)`` bool, True = masked.
  """
  h, w, min_block, max_block, aspect, max_attempts = _check_block_args(
      grid, num_masked, min_block, max_block, aspect, max_attempts)

  def attempt(state):
    mask, key, tries, _, max_new = state
    key, block_key = jax.random.split(key)
    block = sample_block(block_key, (h, w), min_block, max_new, aspect)
    region = _block_region(block, h, w)
    new = jnp.sum(region & ~mask)
    accepted = (block.height < h) & (block.width < w) & (new > 0) & (new <= max_new)
    return jnp.where(accepted, mask | region, mask), key, tries + 1, jnp.where(accepted, new, 0), max_new

  def place_one(state):
    mask, key, count, _ = state
    max_new = jnp.minimum(num_masked - count, max_block)
    mask, key, _, added, _ = jax.lax.while_loop(
        lambda s: (s[3] == 0) & (s[2] < max_attempts), attempt, (mask, key, 0, jnp.int32(0), max_new))
    return mask, key, count + added, added == 0

  initial = (jnp.zeros((h, w), bool), key, jnp.int32(0), jnp.bool_(False))
  mask, *_ = jax.lax.while_loop(lambda s: (s[2] < num_masked) & ~s[3], place_one, initial)
  return mask.reshape(h * w)


def _next_to(masks: jax.Array) -> jax.Array:
  """``(B, h, w)`` bool: True where a 4-neighbour is True."""
  padded = jnp.pad(masks, ((0, 0), (1, 1), (1, 1)))
  return padded[:, :-2, 1:-1] | padded[:, 2:, 1:-1] | padded[:, 1:-1, :-2] | padded[:, 1:-1, 2:]


def blockwise_mask(key: jax.Array, batch: int, grid, num_masked: int, *, min_block: int = 16,
                   max_block: int | None = None, aspect=(0.3, 1 / 0.3), max_attempts: int = 10) -> jax.Array:
  """BEiT block-wise masking (Bao et al., 2022) with exactly ``num_masked`` masked patches per image.

  Each image gets its own key and runs :func:`place_blocks` (vmapped), the reference algorithm. Where
  it ends short of ``num_masked`` (on 14x14 with 75, a third of the images, mostly by 1 to 3 patches),
  :func:`top_up_mask` adds the remainder, preferring patches next to a block, so that the count, and
  with it the loss weighting, is the same for every image. BEiT's defaults: 75 of 196 patches, ``min_block=16``.

  Returns:
    ``(batch, h * w)`` bool, True = masked, in row-major patch order.
  """
  h, w, min_block, max_block, aspect, max_attempts = _check_block_args(
      grid, num_masked, min_block, max_block, aspect, max_attempts)
  block_key, top_up_key = jax.random.split(key)
  place = functools.partial(place_blocks, grid=(h, w), num_masked=num_masked, min_block=min_block,
                            max_block=max_block, aspect=aspect, max_attempts=max_attempts)
  return top_up_mask(top_up_key, jax.vmap(place)(jax.random.split(block_key, batch)), (h, w), num_masked)


def top_up_mask(key: jax.Array, masks: jax.Array, grid, num_masked: int) -> jax.Array:
  """Adds masked patches to ``(B, h * w)`` masks holding at most ``num_masked`` until each holds exactly that.

  Unmasked patches with a masked 4-neighbour (in the mask as given) are added first, in random order,
  then other unmasked patches at random, so a short block-wise mask grows at its edges.
  """
  h, w = _grid_hw(grid)
  if masks.shape[1:] != (h * w,):
    raise ValueError(f"masks must be (batch, {h * w}) for grid {(h, w)}, got shape {masks.shape}.")
  if not isinstance(num_masked, numbers.Integral) or not 1 <= num_masked <= h * w:
    raise ValueError(f"num_masked must be an int in [1, {h * w}], got {num_masked!r}.")
  batch = masks.shape[0]
  missing = num_masked - jnp.sum(masks, axis=1, keepdims=True)
  adjacent = _next_to(masks.reshape(batch, h, w)).reshape(batch, h * w)
  # Noise is in [0, 1): adjacent patches rank first, then the others; masked ones (2) never get picked.
  priority = jnp.where(masks, 2.0, jnp.where(adjacent, 0.0, 1.0) + uniform_noise(key, batch, h * w))
  return masks | (_ranks(priority) < missing)
