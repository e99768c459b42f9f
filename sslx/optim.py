"""The optimizer, its learning-rate and weight-decay schedules, built from ``config.optimizer`` rules.

One optimizer by name, then rules over parameter paths (``'/'``-joined key names such as
``encoder/block_0/attn/qkv/kernel``, matched with ``re.fullmatch``; the first matching rule wins):

  adamw:  p <- p - lr_t * s_p * (adam(g) + wd_t * w_p * p)                       (decoupled decay)
  sgd:    g' = g + wd_t * w_p * p;  v <- mu v + g';  p <- p - lr_t * s_p * (v, or g' + mu v if nesterov)
  lars:   g' = g + wd_t * w_p * p;  g'' = eta ||p|| / ||g'|| * g' (only where w_p > 0);
          v <- mu v + lr_t * g'';  p <- p - s_p * (v, or lr_t g'' + mu v if nesterov)      (optax.lars)

where ``w_p`` comes from ``wd_mults`` (unmatched: 0, no decay), ``s_p`` is the ``lr_mults`` multiplier
(unmatched: 1) times the layer-wise decay of the learning rate (``layer_decay``), ``lr_t`` is
`learning_rate_schedule` and ``wd_t`` is `weight_decay_schedule`. Around that: ``grad_clip_norm`` clips
the global norm of the trainable gradients first; ``frozen`` parameters are never updated and get no
optimizer state; ``freeze_epochs`` parameters get zero updates for their first epochs.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from flax.core import meta

from sslx import config as config_lib
from sslx import schedules
from sslx import trees
from sslx.evaluate import finetune_ops
from sslx.models import vit

Schedule = Callable[[Any], Any]  # step (int or traced) -> value

OPTIMIZERS = ("adamw", "lars", "sgd")
LR_SCALINGS = ("linear", "sqrt")
LR_DECAYS = ("cosine", "multistep")  # config.schedule.decay, after the warm-up

# Kernels decay, nothing else: biases, norm scales, tokens and position tables are exempt, as in the MAE /
# BEiT fine-tuning recipes and in the SimCLR / BYOL LARS recipes.
DEFAULT_WD_MULTS = ((".*/kernel$", 1.0),)
# The official MAE pretraining (timm's `add_weight_decay` with an empty skip list) exempts only biases and
# 1-D parameters, so the cls / mask tokens (and learned position tables) decay too; norm scales do not.
MAE_PRETRAIN_WD_MULTS = ((".*/bias$", 0.0), (".*(kernel|_token|pos_embed)$", 1.0))

# Used where a run's config predates a key, so old config.json files still load.
_DEFAULTS = dict(
    name="adamw", base_lr=1.5e-4, lr_batch_base=256, lr_scaling="linear", b1=0.9, b2=0.95, momentum=0.9,
    nesterov=False, lars_trust_coefficient=0.001, weight_decay=0.05, weight_decay_end=None,
    wd_mults=DEFAULT_WD_MULTS, lr_mults=(), frozen=(), freeze_epochs=(), grad_clip_norm=None,
    layer_decay=None)

# key: (test, what the value must be); the value is already known to be a real number.
_NUMBER_RANGES = {
    "base_lr": (lambda v: v >= 0, "must be >= 0"),
    "lr_batch_base": (lambda v: v > 0, "must be > 0"),
    "b1": (lambda v: 0 <= v < 1, "must lie in [0, 1)"),
    "b2": (lambda v: 0 <= v < 1, "must lie in [0, 1)"),
    "momentum": (lambda v: 0 <= v < 1, "must lie in [0, 1)"),
    "lars_trust_coefficient": (lambda v: v > 0, "must be > 0"),
    "weight_decay": (lambda v: v >= 0, "must be >= 0"),
    "weight_decay_end": (lambda v: v >= 0, "must be >= 0 (or None: constant weight decay)"),
    "grad_clip_norm": (lambda v: v > 0, "must be > 0 (or None: no clipping)"),
}
_OPTIONAL = ("weight_decay_end", "grad_clip_norm")


def _option(config, key: str) -> Any:
  return config.optimizer.get(key, _DEFAULTS[key])


# ---------------------------------------------------------------------------------------------------------
# Rules over parameter paths.

def _is_box(node) -> bool:
  return isinstance(node, meta.AxisMetadata)


def map_paths(fn: Callable[[str], Any], tree: Any) -> Any:
  """Tree like ``tree`` holding ``fn(path)`` at each leaf, ``path`` being the ``'/'``-joined key names.

  A flax box (``nn.Partitioned``) counts as one leaf, so boxed and unboxed params give the same paths:
  the training loop initialises the optimizer on boxed params and updates it with unboxed ones.
  """
  return jax.tree_util.tree_map_with_path(lambda path, _: fn(trees.path_name(path)), tree, is_leaf=_is_box)


def rule_value(rules, path: str, default: Any) -> Any:
  """The value of the first ``(regex, value)`` rule whose regex fully matches ``path``, else ``default``."""
  return next((value for pattern, value in rules if re.fullmatch(pattern, path)), default)


def weight_decay_multipliers(params: Any, rules=DEFAULT_WD_MULTS) -> Any:
  """Per-leaf weight-decay multiplier ``w_p``: the first matching rule's, 0 where none matches."""
  return map_paths(lambda path: float(rule_value(rules, path, 0.0)), params)


def weight_decay_mask(params: Any, rules=DEFAULT_WD_MULTS) -> Any:
  """True where weight decay applies (``w_p > 0``); LARS adapts the trust ratio of these leaves only."""
  return map_paths(lambda path: rule_value(rules, path, 0.0) > 0, params)


def _frozen_labels(patterns, params: Any) -> Any:
  return map_paths(lambda path: "frozen" if any(re.fullmatch(p, path) for p in patterns) else "train", params)


# ---------------------------------------------------------------------------------------------------------
# Schedules.

def learning_rate_schedule(config, *, steps_per_epoch: int, total_steps: int) -> Schedule:
  """Linear warm-up from 0 over ``warmup_epochs``, then half-cosine down to ``min_lr`` at ``total_steps``.

  ``lr_t = peak * t / W`` for ``t < W``, else ``min_lr + (peak - min_lr) (1 + cos(pi (t - W) / (T - W))) / 2``
  with ``peak = base_lr * batch_size / lr_batch_base`` (the linear scaling rule, as in MAE), or with
  ``lr_scaling='sqrt'`` ``peak = base_lr * sqrt(batch_size / lr_batch_base)`` (SimCLR's alternative for small
  batches and long runs: 0.075 sqrt(batch) with ``lr_batch_base=1``).

  ``config.schedule.decay='multistep'`` (a key only configs that use it define) replaces the half-cosine by
  steps: ``lr_t = peak * gamma^n(t)`` for ``t >= W``, ``n(t)`` the number of ``milestone_epochs`` reached
  (`schedules.multistep_decay`; SimMIM: x0.1 at epoch 700 of 800); ``min_lr`` is then unused.
  """
  ratio = config.batch_size / _option(config, "lr_batch_base")
  peak = _option(config, "base_lr") * (math.sqrt(ratio) if _option(config, "lr_scaling") == "sqrt" else ratio)
  warmup = max(min(int(round(config.schedule.warmup_epochs * steps_per_epoch)), total_steps - 1), 0)
  min_lr = config.schedule.min_lr
  if config.schedule.get("decay", "cosine") == "multistep":
    # Milestones past the run never apply; dropped, they cannot overflow the int32 step they are compared with.
    milestones = [round(epochs * steps_per_epoch) for epochs in config.schedule.milestone_epochs
                  if epochs * steps_per_epoch <= total_steps]
    decay = lambda step: schedules.multistep_decay(step, milestones, peak, config.schedule.gamma)
  else:
    decay = lambda step: schedules.cosine_decay(step - warmup, total_steps - warmup, peak, min_lr)

  def schedule(step):
    return jnp.where(step < warmup, schedules.linear_warmup(step, warmup, 0.0, peak), decay(step))

  return schedule


def weight_decay_schedule(config, *, total_steps: int) -> Schedule:
  """``wd_t``: ``weight_decay`` throughout, or a half-cosine from it to ``weight_decay_end`` at ``T``.

  ``wd_t = wd_end + (wd - wd_end) (1 + cos(pi t / T)) / 2`` (DINO: 0.04 -> 0.4).
  """
  start, end = _option(config, "weight_decay"), _option(config, "weight_decay_end")
  if end is None:
    return lambda step: jnp.full((), start, jnp.float32)
  return lambda step: schedules.cosine_decay(step, total_steps, start, end)


# ---------------------------------------------------------------------------------------------------------
# Gradient transformations that optax lacks.

class CountState(NamedTuple):
  """The number of updates done so far (what the schedules read)."""
  count: jax.Array


def _init_count(params) -> CountState:
  del params
  return CountState(count=jnp.zeros([], jnp.int32))


def add_weight_decay(schedule: Schedule, rules) -> optax.GradientTransformation:
  """``u <- u + wd_t * w_p * p`` with ``w_p`` from ``rules`` (unmatched: 0) and ``wd_t = schedule(t)``."""
  def update(updates, state, params=None):
    if params is None:
      raise ValueError("add_weight_decay needs the params: tx.update(grads, state, params)")
    decay = schedule(state.count)
    add = lambda u, p, multiplier: u if multiplier == 0 else u + (decay * multiplier) * p
    updates = jax.tree.map(add, updates, params, weight_decay_multipliers(updates, rules))
    return updates, CountState(optax.safe_increment(state.count))

  return optax.GradientTransformation(_init_count, update)


def scale_by_rules(rules) -> optax.GradientTransformation:
  """``u <- s_p u`` with ``s_p`` from ``rules`` (unmatched: 1); chained last, a per-group learning rate."""
  def update(updates, state, params=None):
    del params
    multipliers = map_paths(lambda path: rule_value(rules, path, 1.0), updates)
    return jax.tree.map(lambda u, multiplier: u * multiplier, updates, multipliers), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def zero_until(rules) -> optax.GradientTransformation:
  """``u <- 0`` while ``t < n_p``, ``n_p`` (a number of steps) from ``rules`` (unmatched: 0, never zeroed).

  Only the update is zeroed; the transformations before it keep seeing the gradients, so an Adam or
  momentum state is warm, not fresh, when the parameter starts moving.
  """
  def update(updates, state, params=None):
    del params
    gate = lambda u, steps: u if steps <= 0 else jnp.where(state.count < steps, jnp.zeros_like(u), u)
    updates = jax.tree.map(gate, updates, map_paths(lambda path: rule_value(rules, path, 0), updates))
    return updates, CountState(optax.safe_increment(state.count))

  return optax.GradientTransformation(_init_count, update)


def scale_by_trust_ratio_per_layer(trust_coefficient: float) -> optax.GradientTransformation:
  """``optax.scale_by_trust_ratio`` (``u <- eta ||p|| / ||u|| * u`` per leaf), one layer at a time in stacked
  ``blocks`` leaves: each stacked block gets the trust ratio its unrolled ``block_i`` would get."""
  inner = optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient)

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("the trust ratio needs the params: tx.update(grads, state, params)")
    per_leaf = lambda u, p: inner.update(u, state, p)[0]
    stacked = map_paths(lambda path: vit.STACKED_BLOCKS in path.split("/"), updates)
    scale = lambda u, p, is_stacked: jax.vmap(per_leaf)(u, p) if is_stacked else per_leaf(u, p)
    return jax.tree.map(scale, updates, params, stacked), state

  return optax.GradientTransformation(inner.init, update)


def scale_by_layer_decay(decay: float) -> optax.GradientTransformation:
  """Multiplies each leaf's update by ``decay^(L + 1 - layer)`` (`finetune_ops.layer_decay_multipliers`).

  Chained after AdamW this scales that leaf's whole step, decoupled weight decay included, which is what a
  per-group learning rate ``lr * decay^(L + 1 - layer)`` does in torch's AdamW (the MAE / BEiT recipe).
  The multipliers depend only on the tree's names, so they are worked out while tracing and cost nothing.
  The tree must hold one ViT's ``block_{i}`` (or stacked ``blocks``) only (an encoder plus a head, not an MAE
  decoder); stacked blocks get one multiplier per layer along their leading axis.
  """
  def update(updates, state, params=None):
    multipliers = finetune_ops.layer_decay_multipliers(updates, decay)
    return finetune_ops.scale_by_layer_decay(multipliers).update(updates, state, params)

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


# ---------------------------------------------------------------------------------------------------------
# Validation.

def validate_layer_decay(layer_decay: Optional[float]) -> None:
  if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
    raise ValueError(f"config.optimizer.layer_decay={layer_decay} must lie in (0, 1] (or be None: off)")


def _check_layer_decay_has_blocks(config) -> None:
  """Layer-wise decay numbers the layers by a ViT's blocks; another encoder (a ResNet) has none, and the
  optimizer would only fail once the training step is traced."""
  layer_decay, model = _option(config, "layer_decay"), config.get("model", {}).get("name", "vit")
  if layer_decay is not None and model != "vit":
    raise ValueError(f"config.optimizer.layer_decay={layer_decay} needs a ViT's blocks; config.model.name="
                     f"{model!r} has none (set it to None)")


def _validate_pattern(key: str, pattern) -> None:
  if not isinstance(pattern, str):
    raise ValueError(f"config.optimizer.{key}: {pattern!r} is not a regular expression string")
  try:
    re.compile(pattern)
  except re.error as error:
    message = f"config.optimizer.{key}: {pattern!r} is not a valid regular expression ({error})"
    raise ValueError(message) from None


def _validate_sequence(key: str, value) -> None:
  if isinstance(value, str) or not isinstance(value, (list, tuple)):
    raise ValueError(f"config.optimizer.{key}={value!r} must be a sequence (tuple or list), e.g. ()")


def _validate_rules(key: str, rules) -> None:
  """``rules`` must be a sequence of ``(regex, number >= 0)`` pairs."""
  _validate_sequence(key, rules)
  for rule in rules:
    is_pair = isinstance(rule, (list, tuple)) and len(rule) == 2
    if not (is_pair and config_lib.is_number(rule[1]) and rule[1] >= 0):
      raise ValueError(f"config.optimizer.{key}: {rule!r} is not a (regex, number >= 0) pair")
    _validate_pattern(key, rule[0])


def _check_rules_fit_stacked_blocks(config) -> None:
  """A rule naming ``block_{i}`` would silently match nothing in stacked blocks (``config.model.scan_blocks``).

  Stacked blocks share one leaf per parameter, so per-block rules are not expressible there: layer-wise
  decay (``layer_decay``) is, and the trust ratio is taken per layer.
  """
  if not config.get("model", {}).get("scan_blocks", False):
    return
  patterns = [(key, rule[0]) for key in ("wd_mults", "lr_mults", "freeze_epochs") for rule in _option(config, key)]
  patterns += [("frozen", pattern) for pattern in _option(config, "frozen")]
  for key, pattern in patterns:
    if "block_" in pattern:
      raise ValueError(f"config.optimizer.{key}: {pattern!r} names unrolled blocks, which "
                       "config.model.scan_blocks=True stacks into one 'blocks' subtree; set it to False")


def validate_optimizer_config(config) -> None:
  """Raises a ValueError naming the key for any bad ``config.optimizer`` / ``config.schedule`` value.

  Cheap (no parameters needed), so the loop calls it before compiling anything.
  """
  name = _option(config, "name")
  if name not in OPTIMIZERS:
    raise ValueError(f"config.optimizer.name={name!r} is not one of {OPTIMIZERS}")
  for key, (test, what) in _NUMBER_RANGES.items():
    value = _option(config, key)
    if value is None and key in _OPTIONAL:
      continue
    if not config_lib.is_number(value) or not test(value):
      raise ValueError(f"config.optimizer.{key}={value!r} {what}")
  scaling = _option(config, "lr_scaling")
  if scaling not in LR_SCALINGS:
    raise ValueError(f"config.optimizer.lr_scaling={scaling!r} is not one of {LR_SCALINGS}")
  if not isinstance(_option(config, "nesterov"), bool):
    raise ValueError(f"config.optimizer.nesterov={_option(config, 'nesterov')!r} must be True or False")
  for key in ("wd_mults", "lr_mults", "freeze_epochs"):
    _validate_rules(key, _option(config, key))
  _validate_sequence("frozen", _option(config, "frozen"))
  for pattern in _option(config, "frozen"):
    _validate_pattern("frozen", pattern)
  validate_layer_decay(_option(config, "layer_decay"))
  _check_layer_decay_has_blocks(config)
  _check_rules_fit_stacked_blocks(config)
  for key in ("warmup_epochs", "min_lr"):
    value = config.schedule.get(key)
    if not config_lib.is_number(value) or value < 0:
      raise ValueError(f"config.schedule.{key}={value!r} must be a number >= 0")
  _validate_decay(config.schedule)


def _validate_decay(schedule) -> None:
  """``config.schedule.decay``: 'cosine' (the default, also when absent) or 'multistep' with its keys."""
  decay = schedule.get("decay", "cosine")
  if decay not in LR_DECAYS:
    raise ValueError(f"config.schedule.decay={decay!r} is not one of {LR_DECAYS}")
  if decay != "multistep":
    return
  milestones = schedule.get("milestone_epochs")
  if isinstance(milestones, str) or not isinstance(milestones, (list, tuple)) or not all(
      config_lib.is_number(m) for m in milestones):
    raise ValueError(f"config.schedule.milestone_epochs={milestones!r} must be a sequence of epochs")
  # SimMIM's scheduler asserts the same: a decay step inside the warm-up would be overwritten by the ramp.
  if list(milestones) != sorted(milestones) or any(m < schedule.warmup_epochs for m in milestones):
    raise ValueError(f"config.schedule.milestone_epochs={tuple(milestones)!r} must be increasing and >= "
                     f"config.schedule.warmup_epochs={schedule.warmup_epochs}")
  config_lib.check_number(schedule.get("gamma"), "schedule.gamma", lambda v: v > 0, "> 0")


# ---------------------------------------------------------------------------------------------------------
# The optimizer.

def _base_optimizer(config, lr: Schedule, wd: Schedule) -> optax.GradientTransformation:
  """The named optimizer with its weight decay and learning rate, before any per-leaf lr multiplier."""
  name, rules = _option(config, "name"), _option(config, "wd_mults")
  decay = add_weight_decay(wd, rules)
  if name == "adamw":
    return optax.chain(optax.scale_by_adam(b1=_option(config, "b1"), b2=_option(config, "b2")), decay,
                       optax.scale_by_learning_rate(lr))
  momentum = optax.trace(decay=_option(config, "momentum"), nesterov=_option(config, "nesterov"))
  if name == "sgd":
    return optax.chain(decay, momentum, optax.scale_by_learning_rate(lr))
  # Biases and norm parameters (no decay) keep their plain gradient, as in SimCLR / BYOL.
  trust_ratio = optax.masked(
      scale_by_trust_ratio_per_layer(_option(config, "lars_trust_coefficient")),
      functools.partial(weight_decay_mask, rules=rules))
  return optax.chain(decay, trust_ratio, optax.scale_by_learning_rate(lr), momentum)


def build_optimizer(config, *, steps_per_epoch: int,
                    total_steps: int) -> tuple[optax.GradientTransformation, dict[str, Schedule]]:
  """The optimizer and its schedules ``{'lr': step -> lr_t, 'weight_decay': step -> wd_t}`` (for logging).

  ``tx.init`` accepts boxed (``nn.Partitioned``) or plain params; ``tx.update`` needs the params.
  """
  validate_optimizer_config(config)
  lr = learning_rate_schedule(config, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  wd = weight_decay_schedule(config, total_steps=total_steps)
  trainable = _base_optimizer(config, lr, wd)
  if _option(config, "grad_clip_norm") is not None:
    # Inside the frozen partition: frozen parameters are constants, whose gradients must not shrink the
    # others' (torch's clip_grad_norm_ skips parameters that do not require grad).
    trainable = optax.chain(optax.clip_by_global_norm(_option(config, "grad_clip_norm")), trainable)
  parts = [trainable]
  if _option(config, "frozen"):
    parts = [optax.partition({"train": trainable, "frozen": optax.set_to_zero()},
                             functools.partial(_frozen_labels, tuple(_option(config, "frozen"))))]
  # Outside the partition, so layer decay counts the blocks of the whole tree, frozen ones included.
  if _option(config, "lr_mults"):
    parts.append(scale_by_rules(_option(config, "lr_mults")))
  if _option(config, "layer_decay") is not None:
    parts.append(scale_by_layer_decay(_option(config, "layer_decay")))
  if _option(config, "freeze_epochs"):
    steps = [(pattern, epochs * steps_per_epoch) for pattern, epochs in _option(config, "freeze_epochs")]
    parts.append(zero_until(steps))
  return optax.chain(*parts), {"lr": lr, "weight_decay": wd}
