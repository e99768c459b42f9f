"""Pure pieces of end-to-end fine-tuning: layer-wise learning-rate decay, mixup / cutmix with label smoothing.

Layer-wise decay (BEiT, Bao et al. 2022; MAE, He et al. 2022): with ``L`` transformer blocks, parameter
``p`` gets layer id ``0`` (patch_embed, cls_token, pos_embed), ``i + 1`` (block_i, or index ``i`` of stacked
``blocks``) or ``L + 1`` (norm, head and anything else), and learning rate ``lr * decay^(L + 1 - id)``.

Mixup (Zhang et al., 2018) / CutMix (Yun et al., 2019), batch-wise as in timm: one ``lambda`` per batch,
each example mixed with its mirror in the batch (``x[::-1]``):

  mixup:   x' = lambda x + (1 - lambda) x[::-1],           lambda ~ Beta(0.8, 0.8)
  cutmix:  x' = x outside a box, x[::-1] inside it,        lambda = 1 - box area / image area
  labels:  y' = lambda y_s + (1 - lambda) y_s[::-1],       y_s = (1 - s) y + s / C   (s = 0.1)
"""
from __future__ import annotations

import re
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sslx import trees
from sslx.models.vit import STACKED_BLOCKS

_EMBEDDING_NAMES = ("patch_embed", "cls_token", "pos_embed")
_BLOCK = re.compile(r"block_(\d+)")


def num_blocks(params: Any) -> int:
  """Number of transformer blocks: ``1 + max i`` over ``block_i`` names, or the leading size of stacked
  ``blocks`` leaves (`sslx.convert.scan_layout`)."""
  counts = [leaf.shape[0] if name == STACKED_BLOCKS else int(match.group(1)) + 1
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)
            for name in trees.path_names(path) if name == STACKED_BLOCKS or (match := _BLOCK.fullmatch(name))]
  if not counts:
    raise ValueError("No 'block_{i}' or stacked 'blocks' parameters found; is this a ViT parameter tree?")
  return max(counts)


def layer_id(names: list[str], num_layers: int, shape: tuple[int, ...] = ()) -> Union[int, np.ndarray]:
  """Layer id of the parameter at path ``names`` (the first matching name decides).

  A leaf of stacked ``blocks`` (``shape`` ``(L, ...)``) holds block ``i`` at index ``i``: its id is an int
  array of ``1 ... L`` along the leading axis, shaped to broadcast against the leaf.
  """
  for name in names:
    if name in _EMBEDDING_NAMES:
      return 0
    if name == STACKED_BLOCKS:
      return np.arange(1, shape[0] + 1).reshape((shape[0],) + (1,) * (len(shape) - 1))
    if match := _BLOCK.fullmatch(name):
      return int(match.group(1)) + 1
  return num_layers + 1


def layer_decay_multipliers(params: Any, decay: float, *, num_layers: Optional[int] = None) -> Any:
  """Tree like ``params`` holding ``decay^(L + 1 - layer_id)`` per leaf.

  A Python float per leaf, except for stacked ``blocks`` leaves: a float32 array of one multiplier per layer
  along the leading axis, so each stacked block gets the update its unrolled ``block_i`` would get.

  Args:
    params: unboxed encoder (+ head) parameters; wrapper keys such as ``'encoder'`` are fine, but the
      tree must not hold other ``block_{i}`` (e.g. an MAE decoder's) when ``num_layers`` is counted.
    decay: e.g. 0.65 (MAE ViT-B) or 0.75 (ViT-L/H).
    num_layers: ``L``; counted from the ``block_{i}`` names (or the stacked blocks) when ``None``.
  """
  num_layers = num_blocks(params) if num_layers is None else num_layers

  def multiplier(path, leaf):
    ids = layer_id(trees.path_names(path), num_layers, np.shape(leaf))
    if isinstance(ids, int):
      return decay ** (num_layers + 1 - ids)
    # The same float64 powers the unrolled leaves get, rounded to float32 once as theirs are.
    return np.power(float(decay), (num_layers + 1 - ids).astype(np.float64)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(multiplier, params)


def scale_by_layer_decay(multipliers: Any) -> optax.GradientTransformation:
  """Multiplies each update by its multiplier; chained after e.g. AdamW it scales that leaf's lr."""

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * m, updates, multipliers), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _cutmix_box_mask(rng: jax.Array, lam: jax.Array, height: int, width: int) -> jax.Array:
  """Boolean ``(H, W)`` box with sides ``int(sqrt(1 - lam) * side)`` around a uniform centre, clipped."""
  cut = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = (cut * height).astype(jnp.int32), (cut * width).astype(jnp.int32)
  key_y, key_x = jax.random.split(rng)
  cy, cx = jax.random.randint(key_y, (), 0, height), jax.random.randint(key_x, (), 0, width)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  return (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)


def mix_batch(rng: jax.Array, images: jax.Array, labels_onehot: jax.Array, *, mixup_alpha: float = 0.8,
              cutmix_alpha: float = 1.0, switch_prob: float = 0.5,
              label_smoothing: float = 0.1) -> tuple[jax.Array, jax.Array]:
  """Mixup or cutmix (cutmix with probability ``switch_prob``) plus label smoothing; jittable.

  An alpha of 0 disables that augmentation (both 0: labels are only smoothed).

  Args:
    rng: PRNG key.
    images: ``(B, H, W, C)``.
    labels_onehot: ``(B, num_classes)`` one-hot (or any rows summing to one).

  Returns:
    ``(mixed_images, soft_labels)``; every soft-label row sums to one. For cutmix, ``lambda`` is the exact
    fraction of the image left unpasted after the box is clipped to the image.
  """
  if mixup_alpha < 0 or cutmix_alpha < 0 or not 0 <= switch_prob <= 1 or not 0 <= label_smoothing <= 1:
    raise ValueError(f"Need alphas >= 0 and probabilities in [0, 1]; got mixup_alpha={mixup_alpha}, "
                     f"cutmix_alpha={cutmix_alpha}, switch_prob={switch_prob}, "
                     f"label_smoothing={label_smoothing}.")
  key_switch, key_mixup, key_cutmix, key_box = jax.random.split(rng, 4)
  images = jnp.asarray(images)
  partner = images[::-1]
  if mixup_alpha > 0:
    lam_mixup = jax.random.beta(key_mixup, mixup_alpha, mixup_alpha)
    mixed = (lam_mixup * images + (1.0 - lam_mixup) * partner).astype(images.dtype)
  else:
    lam_mixup, mixed = 1.0, images
  if cutmix_alpha > 0:
    lam_box = jax.random.beta(key_cutmix, cutmix_alpha, cutmix_alpha)
    box = _cutmix_box_mask(key_box, lam_box, images.shape[1], images.shape[2])
    # Clipping can shrink the box, so the label weight is recomputed from the pixels actually pasted.
    lam_cutmix = 1.0 - jnp.mean(box.astype(jnp.float32))
    cutmixed = jnp.where(box[None, :, :, None], partner, images)
  else:
    lam_cutmix, cutmixed = 1.0, images
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.bernoulli(key_switch, switch_prob)
  else:
    use_cutmix = cutmix_alpha > 0
  lam = jnp.where(use_cutmix, lam_cutmix, lam_mixup)
  labels = jnp.asarray(labels_onehot, jnp.float32)
  smoothed = (1.0 - label_smoothing) * labels + label_smoothing / labels.shape[-1]
  return jnp.where(use_cutmix, cutmixed, mixed), lam * smoothed + (1.0 - lam) * smoothed[::-1]
