"""Optimizer and learning-rate schedule built from ``config.optimizer`` and ``config.schedule``."""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import optax

from sslx.evaluate import finetune_ops

# Parameters whose names contain one of these are embeddings/tokens, which the MAE recipe does not decay.
_NO_DECAY_NAME_PARTS = ("token", "pos_embed")


def _path_names(path) -> list[str]:
  return [str(getattr(key, "key", getattr(key, "name", ""))) for key in path]


def weight_decay_mask(params: Any) -> Any:
  """True where weight decay applies: matrices and kernels, never biases, norms, tokens or position tables."""
  def decays(path, leaf) -> bool:
    names = _path_names(path)
    if leaf.ndim <= 1 or names[-1] == "bias":  # a fused qkv bias is 3-D but still a bias
      return False
    return not any(part in name for name in names for part in _NO_DECAY_NAME_PARTS)
  return jax.tree_util.tree_map_with_path(decays, params)


def learning_rate_schedule(config, *, steps_per_epoch: int, total_steps: int) -> Callable[[Any], Any]:
  """Linear warm-up from 0 over ``warmup_epochs``, then half-cosine down to ``min_lr`` at ``total_steps``.

  Peak learning rate = ``base_lr * batch_size / lr_batch_base`` (the linear scaling rule).
  """
  peak = config.optimizer.base_lr * config.batch_size / config.optimizer.lr_batch_base
  warmup_steps = min(int(round(config.schedule.warmup_epochs * steps_per_epoch)), total_steps - 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=max(warmup_steps, 0), decay_steps=total_steps,
      end_value=config.schedule.min_lr)


def validate_layer_decay(layer_decay: Optional[float]) -> None:
  if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
    raise ValueError(f"config.optimizer.layer_decay={layer_decay} must lie in (0, 1] (or be None: off)")


def scale_by_layer_decay(decay: float) -> optax.GradientTransformation:
  """Multiplies the update of every leaf by ``decay^(L + 1 - layer)`` (`finetune_ops.layer_decay_multipliers`).

  Chained after AdamW this scales that leaf's whole step, decoupled weight decay included, which is what a
  per-group learning rate ``lr * decay^(L + 1 - layer)`` does in torch's AdamW (the MAE / BEiT recipe).
  The multipliers depend only on the tree's names, so they are worked out while tracing and cost nothing.
  The tree must hold one ViT's ``block_{i}`` only (an encoder plus a head, not an MAE decoder).
  """
  def update(updates, state, params=None):
    multipliers = finetune_ops.layer_decay_multipliers(updates, decay)
    return finetune_ops.scale_by_layer_decay(multipliers).update(updates, state, params)

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def build_optimizer(config, schedule) -> optax.GradientTransformation:
  """AdamW with the weight-decay mask; optional global-norm clipping before it and layer-wise lr decay after."""
  opt = config.optimizer
  # Older runs' config.json files predate layer decay, and their checkpoints hold a bare AdamW state.
  layer_decay = opt.get("layer_decay")
  validate_layer_decay(layer_decay)
  adamw = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay, mask=weight_decay_mask)
  parts = [adamw]
  if opt.grad_clip_norm is not None:
    parts.insert(0, optax.clip_by_global_norm(opt.grad_clip_norm))
  if layer_decay is not None:
    parts.append(scale_by_layer_decay(layer_decay))
  return parts[0] if len(parts) == 1 else optax.chain(*parts)
