"""Optimizer and learning-rate schedule built from ``config.optimizer`` and ``config.schedule``."""
from __future__ import annotations

from typing import Any, Callable

import jax
import optax

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


def build_optimizer(config, schedule) -> optax.GradientTransformation:
  opt = config.optimizer
  adamw = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay, mask=weight_decay_mask)
  if opt.grad_clip_norm is not None:
    return optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), adamw)
  return adamw
