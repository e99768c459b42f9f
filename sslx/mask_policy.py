"""The masking strategy of a masked-image method (MAE, SimMIM, BEiT), selected in ``config.method``.

``config.method.mask_strategy`` picks one generator of `sslx.masking` for any of the three methods where it
applies. The keys sit flat in ``config.method`` (`config_keys`), so the names SimMIM and BEiT read before
the selector existed keep their meaning; each method sets its own defaults, and only the keys its strategy
reads are checked:

- ``mask_strategy``: ``random | simmim | block | grid | importance``;
- ``mask_ratio``: the share ``r`` of the ``L = h w`` patches to mask, in (0, 1) (checked always, read by all
  strategies but ``grid``);
- ``mask_ratio_end``: None, or ``r`` moves linearly from ``mask_ratio`` to it over the run (``random`` and
  ``simmim`` only);
- ``mask_patch_size`` (``simmim``): side of a mask cell in pixels, a multiple of the patch size; None: one
  patch;
- ``min_block``, ``max_block``, ``block_aspect`` (``block``): the fewest patches a block proposes (None: BEiT's
  16 of 196, scaled to the grid), the most (None: as many as are left to mask), the aspect range;
- ``grid_stride`` (``grid``): side of the cells of which one patch each stays visible;
- ``importance_random_share``, ``importance_highest`` (``importance``): the share of the masked patches drawn
  at random instead of by score, and whether the most (True) or the least attended patches are masked.

Masked patches per image:

- ``random``: `masking.random_mask`, ``round(L r)`` uniformly at random (halves round down); when the method
  drops masked tokens (MAE), the reference's `masking.random_masking`, which keeps ``int(L (1 - r))``;
- ``simmim``: `masking.simmim_mask`, ``ceil(n r)`` of the ``n`` cells of ``c x c`` patches, every patch of them;
- ``block``: `masking.blockwise_mask`, ``M = floor(L r + 1/2)`` in rectangular blocks (BEiT);
- ``grid``: `masking.grid_mask`, all but one patch of every ``s x s`` cell (at an offset each image draws),
  ``L - L / s^2``;
- ``importance``: `masking.importance_mask`, the ``M = floor(L r + 1/2)`` patches ranked first by score.

Each count is a Python int (`MaskPolicy.num_masked`), except under a progressive ratio: ``random`` and
``simmim`` then count in-graph from the traced ratio of `masking.progressive_mask_ratio`, one compiled step
for every ratio. A method that needs a static count refuses ``mask_ratio_end`` by name: MAE drops the masked
tokens, so the number it keeps is an array shape (shape buckets, each compiled once, are not implemented);
BEiT's head gathers a static number of masked positions.

Importance scores (`attention_scores`): the class token's attention in the last block of the method's own
encoder (`sslx.models.attention_weights.cls_attention_maps`), averaged over heads, on the unmasked images in
evaluation mode, without gradient. That is one more forward pass of the encoder over every patch per step:
about a third more encoder compute for SimMIM and BEiT (a forward beside their forward and backward), more
for MAE, whose encoder otherwise sees the visible patches only. AttMask's EMA teacher is not implemented.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from ml_collections.config_dict import placeholder

from sslx import config as config_lib
from sslx import masking
from sslx.models import attention_weights
from sslx.models import vit

STRATEGIES = ("random", "simmim", "block", "grid", "importance")
PROGRESSIVE = ("random", "simmim")  # the generators whose count may be traced
# BEiT's min_block = 16 on ViT-B/16's 196 patches; other grids keep that share of the image.
_REFERENCE_MIN_BLOCK, _REFERENCE_PATCHES = 16, 196
_TOKEN_DROPPING = ("dropping the masked tokens needs a static number of visible tokens, an array shape (shape "
                   "buckets, each compiled once, are not implemented)")


def config_keys(strategy: str, **defaults) -> dict:
  """The masking keys of ``config.method`` (module docstring), with ``strategy`` and a method's ``defaults``."""
  keys = dict(
      mask_strategy=strategy,
      mask_ratio=0.75,
      mask_ratio_end=placeholder(float),  # None: constant; else linear from mask_ratio to this over the run
      mask_patch_size=placeholder(int),   # simmim: mask cell side in pixels; None: one model patch
      min_block=placeholder(int),         # block: fewest patches a block proposes; None: 16 of 196, scaled
      max_block=placeholder(int),         # block: most patches a block proposes; None: as many as are left
      block_aspect=(0.3, 1 / 0.3),        # block: range of the log-uniform aspect ratio
      grid_stride=2,                      # grid: one visible patch per stride x stride cell
      importance_random_share=0.0,        # importance: share of the masked patches drawn at random
      importance_highest=True,            # importance: mask the most (True) or the least attended patches
  )
  keys.update(defaults)
  return keys


@dataclasses.dataclass(frozen=True)
class MaskPolicy:
  """A checked masking choice on one patch grid (`from_config`); `mask_fn` draws its masks.

  ``num_masked`` is the masked count of every image, None under a progressive ratio; ``cell`` is a SimMIM
  mask cell's side in model patches; the other fields are the keys of the module docstring. A field only one
  strategy reads is None under the others.
  """
  strategy: str
  grid: tuple[int, int]
  ratio: float
  ratio_end: Optional[float]
  num_masked: Optional[int]
  drops_tokens: bool = False
  cell: Optional[int] = None
  min_block: Optional[int] = None
  max_block: Optional[int] = None
  aspect: Optional[tuple[float, float]] = None
  stride: Optional[int] = None
  random_share: Optional[float] = None
  highest: Optional[bool] = None

  @property
  def num_patches(self) -> int:
    return self.grid[0] * self.grid[1]


def check_mask_token_encoder(config, method: str) -> None:
  """A method that replaces masked patches by the encoder's mask token (SimMIM, BEiT) needs a ViT built with
  one; the error names the model key and ``method``."""
  if config.model.get("name", "vit") != "vit":
    raise ValueError(f"config.method.name='{config.method.name}' needs a token encoder: config.model.name="
                     f"{config.model.name!r} is not 'vit'")
  if config.model.get("mask_token") is not True:
    raise ValueError(f"config.model.mask_token={config.model.get('mask_token')!r}: {method} replaces masked "
                     "patches by the encoder's mask token; set it to True")


def from_config(config, defaults, *, drops_tokens: bool = False,
                static_count: Optional[str] = None) -> MaskPolicy:
  """Checks the masking keys of ``config.method`` and returns the policy on the run's patch grid.

  Args:
    config: a run config: ``config.method`` (a key it lacks takes its value in ``defaults``),
      ``config.data.image_size`` and ``config.model.variant`` (already checked by the encoder).
    defaults: the method's ``config.method`` defaults.
    drops_tokens: the method drops the masked tokens (MAE): every count must be static, and ``random`` is
      `masking.random_masking`.
    static_count: why the method needs a static count, or None when a progressive ratio is welcome.

  Raises:
    ValueError: naming the first bad key, before anything is traced.
  """
  get = lambda key: config.method.get(key, defaults[key])
  strategy = get("mask_strategy")
  if strategy not in STRATEGIES:
    raise ValueError(f"config.method.mask_strategy={strategy!r} is not one of {STRATEGIES}")
  size, variant = config.data.image_size, config.model.variant
  patch = vit.parse_variant(variant)["patch_size"]
  side = size // patch
  where = (f"({side}x{side}: config.data.image_size={size} / the patch size {patch} of config.model.variant="
           f"{variant!r})")
  if side * side < 2:
    raise ValueError(f"config.data.image_size={size} makes {side * side} patch {where}; masking needs 2 or more")
  ratio, ratio_end = get("mask_ratio"), get("mask_ratio_end")
  config_lib.check_number(ratio, "method.mask_ratio", lambda v: 0.0 < v < 1.0, "strictly between 0 and 1")
  if ratio_end is not None:
    reason = _TOKEN_DROPPING if drops_tokens else static_count
    if reason:
      raise ValueError(f"config.method.mask_ratio_end={ratio_end!r}: {reason}; set it to None")
    if strategy not in PROGRESSIVE:
      raise ValueError(f"config.method.mask_ratio_end={ratio_end!r}: config.method.mask_strategy={strategy!r} "
                       f"masks a static count; a progressive ratio needs one of {PROGRESSIVE}")
    config_lib.check_number(ratio_end, "method.mask_ratio_end", lambda v: 0.0 < v < 1.0,
                            "strictly between 0 and 1")
    ratio_end = float(ratio_end)
  policy = MaskPolicy(strategy, (side, side), float(ratio), ratio_end, None, drops_tokens)
  return _RESOLVE[strategy](policy, get, config, where)


def _ratios(policy: MaskPolicy):
  """``(key, ratio)`` of each end of the ratio's range: the counts between them lie between theirs."""
  ends = [("mask_ratio", policy.ratio)]
  return ends if policy.ratio_end is None else [*ends, ("mask_ratio_end", policy.ratio_end)]


def _check_count(policy: MaskPolicy, key: str, ratio: float, count: int, where: str) -> int:
  if not 1 <= count < policy.num_patches:
    raise ValueError(f"config.method.{key}={ratio} masks {count} of the {policy.num_patches} patches {where}; "
                     "at least one must be masked and one visible")
  return count


def _rounded_count(policy: MaskPolicy) -> int:
  """``M = floor(L r + 1/2)``, BEiT's count."""
  return int(math.floor(policy.num_patches * policy.ratio + 0.5))


def _resolve_random(policy, get, config, where) -> MaskPolicy:
  del get, config
  num_patches = policy.num_patches
  if not policy.drops_tokens:
    counts = [_check_count(policy, key, ratio, masking.random_mask_count(num_patches, ratio), where)
              for key, ratio in _ratios(policy)]
    return dataclasses.replace(policy, num_masked=None if policy.ratio_end is not None else counts[0])
  try:
    return dataclasses.replace(policy, num_masked=num_patches - masking.num_kept(num_patches, policy.ratio))
  except ValueError:
    largest = masking.max_mask_ratio(num_patches)
    if policy.ratio > largest:
      raise ValueError(f"config.method.mask_ratio={policy.ratio} leaves no visible patch of the {num_patches} "
                       f"patches {where}; the largest ratio allowed is {largest!r} (1 - 1/{num_patches})"
                       ) from None
    raise ValueError(f"config.method.mask_ratio={policy.ratio} masks none of the {num_patches} patches {where}"
                     ) from None


def _resolve_simmim(policy, get, config, where) -> MaskPolicy:
  size, variant = config.data.image_size, config.model.variant
  patch = vit.parse_variant(variant)["patch_size"]
  cell = get("mask_patch_size")
  config_lib.check_int(cell, "method.mask_patch_size", none_means="one model patch")
  cell = patch if cell is None else cell
  if cell % patch:
    raise ValueError(f"config.method.mask_patch_size={cell} is not a multiple of the patch size {patch} of "
                     f"config.model.variant={variant!r}")
  if size % cell:
    raise ValueError(f"config.method.mask_patch_size={cell} does not divide config.data.image_size={size}")
  num_cells, side = (size // cell) ** 2, cell // patch
  counts = []
  for key, ratio in _ratios(policy):
    # ceil(n r) <= n - 1 cells: one stays visible.
    if num_cells < 2 or ratio > 1.0 - 1.0 / num_cells:
      raise ValueError(f"config.method.{key}={ratio} masks all {num_cells} mask cells (config.data.image_size / "
                       "config.method.mask_patch_size per side); it must leave one visible")
    # A ratio whose float32 product underflows masks no cell.
    count = masking.simmim_mask_count(num_cells, ratio) * side * side
    counts.append(_check_count(policy, key, ratio, count, where))
  return dataclasses.replace(policy, cell=side, num_masked=None if policy.ratio_end is not None else counts[0])


def _resolve_block(policy, get, config, where) -> MaskPolicy:
  del config
  num_masked = _check_count(policy, "mask_ratio", policy.ratio, _rounded_count(policy), where)
  min_block, max_block = get("min_block"), get("max_block")
  config_lib.check_int(min_block, "method.min_block", none_means="16 of 196 patches, scaled to the grid")
  config_lib.check_int(max_block, "method.max_block", none_means="no bound")
  if min_block is None:
    scaled = round(_REFERENCE_MIN_BLOCK * policy.num_patches / _REFERENCE_PATCHES)
    min_block = min(max(1, scaled), num_masked)
  if min_block > num_masked:
    raise ValueError(f"config.method.min_block={min_block} exceeds the {num_masked} patches "
                     f"config.method.mask_ratio={policy.ratio} masks on the {policy.grid[0]}x{policy.grid[1]} "
                     "grid")
  if max_block is not None and max_block < min_block:
    raise ValueError(f"config.method.max_block={max_block} is below the minimum block of {min_block} patches "
                     "(config.method.min_block)")
  aspect = get("block_aspect")
  if not (isinstance(aspect, (tuple, list)) and len(aspect) == 2 and all(map(config_lib.is_number, aspect))
          and 0 < aspect[0] <= aspect[1]):
    raise ValueError(f"config.method.block_aspect={aspect!r} must be a pair (low, high) of numbers with "
                     "0 < low <= high")
  return dataclasses.replace(policy, num_masked=num_masked, min_block=min_block, max_block=max_block,
                             aspect=(float(aspect[0]), float(aspect[1])))


def _resolve_grid(policy, get, config, where) -> MaskPolicy:
  del config
  stride = get("grid_stride")
  config_lib.check_int(stride, "method.grid_stride", 2)
  if policy.grid[0] % stride or policy.grid[1] % stride:
    raise ValueError(f"config.method.grid_stride={stride} does not divide the patch grid {where}")
  return dataclasses.replace(policy, stride=stride, num_masked=policy.num_patches - policy.num_patches // stride**2)


def _resolve_importance(policy, get, config, where) -> MaskPolicy:
  del config
  num_masked = _check_count(policy, "mask_ratio", policy.ratio, _rounded_count(policy), where)
  share, highest = get("importance_random_share"), get("importance_highest")
  config_lib.check_number(share, "method.importance_random_share", lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
  config_lib.check_bool(highest, "method.importance_highest")
  return dataclasses.replace(policy, num_masked=num_masked, random_share=float(share), highest=highest)


_RESOLVE = dict(random=_resolve_random, simmim=_resolve_simmim, block=_resolve_block, grid=_resolve_grid,
                importance=_resolve_importance)


def mask_fn(policy: MaskPolicy, total_steps: Optional[int] = None) -> Callable[..., jax.Array]:
  """``draw(key, batch, step=None, scores=None) -> (batch, L)`` bool, True = masked: ``policy``'s masks.

  Pure and jittable. ``step`` (the updates done so far, may be traced) sets a progressive ratio, which moves
  over ``total_steps``; ``scores`` ``(batch, L)`` rank the patches for ``importance`` (`attention_scores`).
  Every image has exactly ``policy.num_masked`` masked patches where that is not None. Under token dropping
  ``random`` is `masking.random_masking`'s mask (MAE itself draws it inside its model, from the same rule).
  """
  p = policy

  def ratio(step):
    if p.ratio_end is None:
      return p.ratio
    return masking.progressive_mask_ratio(step, total_steps, p.ratio, p.ratio_end)

  def draw(key, batch, step=None, scores=None):
    if p.strategy == "random":
      if p.drops_tokens:
        return masking.random_masking(masking.uniform_noise(key, batch, p.num_patches), p.ratio)[1] > 0
      return masking.random_mask(key, batch, p.num_patches, ratio(step))
    if p.strategy == "simmim":
      return masking.simmim_mask(key, batch, p.grid, p.cell, ratio(step))
    if p.strategy == "block":
      return masking.blockwise_mask(key, batch, p.grid, p.num_masked, min_block=p.min_block,
                                    max_block=p.max_block, aspect=p.aspect)
    if p.strategy == "grid":
      return masking.grid_mask(key, batch, p.grid, p.stride)
    if scores is None:
      raise ValueError("mask_strategy='importance' ranks the patches by scores; none were passed")
    return masking.importance_mask(key, scores, p.num_masked, random_share=p.random_share, highest=p.highest)

  return draw


def attention_scores(encoder, encoder_variables, images: jax.Array) -> jax.Array:
  """``(B, L)`` float32: the class token's last-block attention to each patch in ``encoder`` (a ViT in
  evaluation mode on the unmasked ``images``), averaged over heads; no gradient flows through it."""
  maps = attention_weights.cls_attention_maps(encoder, encoder_variables, images)
  return jax.lax.stop_gradient(jnp.mean(maps, axis=1).reshape(maps.shape[0], -1))


def method_masks(policy: MaskPolicy, encoder, encoder_variables, total_steps: Optional[int] = None):
  """``masks(key, variables, method_state, images, step=None) -> (B, L)`` bool for a method whose encoder is
  ``encoder`` at ``encoder_variables(variables, method_state)`` (`sslx.methods.Method.encoder_variables`):
  `mask_fn`'s masks, with that encoder's `attention_scores` for ``importance``."""
  draw = mask_fn(policy, total_steps)

  def masks(key, variables, method_state, images, step=None):
    scores = None
    if policy.strategy == "importance":
      scores = attention_scores(encoder, encoder_variables(variables, method_state), images)
    return draw(key, images.shape[0], step, scores)

  return masks


def token_dropping(mask: jax.Array, num_masked: int):
  """MAE's ``(ids_keep, mask, ids_restore)`` (as `masking.random_masking` returns them) for a boolean ``(B, L)``
  mask with exactly ``num_masked`` True per row.

  A stable argsort of the mask is the shuffle: the visible patches first, in patch order, then the masked
  ones; ``ids_restore``, its inverse, is each patch's place in that order, which is how the MAE decoder puts
  the encoded visible tokens and its mask tokens back in patch order. A row with another count would keep
  masked patches or drop visible ones, hence the exact counts of `MaskPolicy.num_masked`.
  """
  ids_shuffle = jnp.argsort(mask, axis=1, stable=True).astype(jnp.int32)
  ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
  return ids_shuffle[:, :mask.shape[1] - num_masked], mask.astype(jnp.float32), ids_restore


def placeholder_mask(policy: MaskPolicy, batch: int) -> jax.Array:
  """``(batch, L)`` bool with the first ``policy.num_masked`` patches masked: a mask of the policy's count to
  initialise parameters with (their values depend on shapes only), before an encoder exists to score with."""
  return jnp.broadcast_to(jnp.arange(policy.num_patches) < policy.num_masked, (batch, policy.num_patches))
