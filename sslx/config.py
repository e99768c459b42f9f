"""The config keys every sslx run understands, their defaults, and their validation.

Run configs in ``configs/`` start from `base_config()`, add an encoder and a method section and override
values; the dict is locked, so a
typo in a config file or in a ``--config.key=value`` override is an error naming the key instead of a
silently ignored setting.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import ml_collections
from ml_collections.config_dict import placeholder


def _data_defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      source="idx",                 # 'idx' | 'tfds' | 'synthetic' | 'folder'
      dataset="fashion_mnist",      # TFDS name for source='tfds' (e.g. 'imagenet2012')
      data_dir=placeholder(str),  # None = the source's default place
      split="train",
      # None: no held-out split (a flat folder of unlabelled images): no kNN, no held-out scores, and the
      # pictures show training images; a FieldReference so that a config file or --config.data.eval_split=None
      # can clear it.
      eval_split=ml_collections.FieldReference("test", field_type=str),
      image_size=28,
      channels=1,
      mean=(0.2860,),
      std=(0.3530,),
      augment=dict(crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), interpolation="bicubic", hflip=True),
      # Training augmentation as a spec (sslx/data/transforms.py), e.g.
      # "random_resized_crop(224, scale=(0.08, 1))|hflip|color_jitter(0.5)|grayscale"; None: `augment`.
      augmentation=placeholder(str),
      # One spec per view for multi-view methods; batches then hold view_0, view_1, ... instead of
      # image (sslx/data/views.py). None: one view, from `augmentation`.
      views=placeholder(tuple),
      eval_crop_fraction=0.875,     # evaluation: resize to image_size / fraction, centre-crop image_size
      synthetic_num_examples=10_000,
      synthetic_image_size=placeholder(int),  # None: image_size
      num_workers=0,                # grain worker processes; 0 = decode in the main process
      prefetch=2,
      # Where the ops after the last crop/flip of each view run: 'host' (grain workers, numpy) or
      # 'device' (batched JAX inside the jitted step). Measured choice: docs/benchmarks.md.
      augment_on="host",
      # BEiT's precomputed visual-token ids: a .npy (N, h, w) of the training split, in the source's order; the
      # batches then hold them as 'token_ids' (sslx/token_ids.py). None: no ids.
      token_ids_file=placeholder(str),
  ))


def base_config() -> ml_collections.ConfigDict:
  """The generic keys of every run, with their defaults.

  A run config adds its encoder's section (``config.model = sslx.models.default_config('vit')``) and its
  method's (``config.method = sslx.methods.default_config('mae')``): encoder- and method-specific keys live
  with them, not here.
  """
  config = ml_collections.ConfigDict()
  config.task = "pretrain"
  config.seed = 0
  config.batch_size = 4096          # global, over all devices and processes
  config.num_epochs = 800
  config.total_steps = placeholder(int)  # overrides num_epochs when set
  # Initial values from other runs, used only when this run's workdir has no checkpoint yet: a run's
  # workdir (its encoder initialises this run's encoder), or (run_dir, source subtree, target subtree)
  # triples; see sslx/init_from.py.
  config.init_from = placeholder(object)

  config.model = ml_collections.ConfigDict()
  config.method = ml_collections.ConfigDict()
  config.data = _data_defaults()

  config.optimizer = ml_collections.ConfigDict(dict(
      name="adamw",                 # 'adamw' | 'lars' | 'sgd'
      base_lr=1.5e-4,               # lr = base_lr * batch_size / lr_batch_base
      lr_batch_base=256,
      lr_scaling="linear",          # 'linear' (as above) | 'sqrt': base_lr * sqrt(batch_size / lr_batch_base)
      b1=0.9,                       # adamw
      b2=0.95,
      momentum=0.9,                 # sgd, lars
      nesterov=False,
      lars_trust_coefficient=0.001,
      weight_decay=0.05,
      weight_decay_end=placeholder(float),  # None: constant; else half-cosine to this at the last step
      # (regex over 'encoder/block_0/mlp/fc1/kernel'-style paths, multiplier); the first match wins and an
      # unmatched parameter is not decayed. Default: kernels decay, nothing else.
      wd_mults=((".*/kernel$", 1.0),),
      lr_mults=(),                  # (regex, multiplier); unmatched: 1
      frozen=(),                    # regexes of parameters never updated (and given no optimizer state)
      freeze_epochs=(),             # (regex, epochs): no update while step < epochs * steps_per_epoch
      grad_clip_norm=placeholder(float),
      layer_decay=placeholder(float),  # lr of ViT block i scaled by decay^(L+1-i) (fine-tuning); None: off
  ))
  # decay: 'cosine' to min_lr, or 'multistep' (x gamma at each of milestone_epochs; SimMIM): optim.py.
  config.schedule = ml_collections.ConfigDict(dict(warmup_epochs=40.0, min_lr=0.0, decay="cosine",
                                                   milestone_epochs=(), gamma=0.1))
  config.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=1000, max_to_keep=3, async_save=True,
      best_metric=placeholder(str),  # e.g. 'eval/top1': also keep the best-scoring state in <workdir>/best
      # Wall-clock budget: after this many minutes the run saves and exits (status 0), for schedulers with
      # time limits; the same command resumes. None: no limit.
      max_minutes=placeholder(float),
      # How often several processes agree whether to stop (SIGTERM, SIGINT, max_minutes); each check is a
      # collective that waits for the step in flight. One process checks every step at no cost.
      stop_check_every_steps=10,
  ))
  config.parallel = ml_collections.ConfigDict(dict(fsdp=1))
  config.eval = ml_collections.ConfigDict(dict(
      after_pretrain=False,         # print kNN / linear-probe accuracy of the result beside a random init
      batch_size=500,
      max_train_examples=placeholder(int),  # kNN bank / probe training set: the first N (None: all)
      knn_ks=(20, 200),
      knn_temperature=0.07,
      probe="logistic",             # 'logistic': exact, standardised, L2 chosen on held-out; 'lars': MAE's
      probe_l2=placeholder(float),  # logistic: None chooses the L2 weight on a held-out training slice
      probe_epochs=90,
      probe_batch_size=16384,
      probe_base_lr=0.1,
      probe_warmup_epochs=10.0,
      every_epochs=placeholder(float),  # held-out evaluation (Method.evaluate) during training; None: off
  ))
  # Online monitors of the representation while pretraining; see sslx/monitors.py.
  config.monitor = ml_collections.ConfigDict(dict(
      online_probe=True,            # a linear classifier on stop-gradient features, trained every step
      probe_batch_size=256,         # rows of each global batch it trains on (features cost a forward pass)
      probe_lr=1e-3,
      # Held-out probe accuracy, kNN and diagnostics (also at step 0); None: at each checkpoint; 0: never.
      every_steps=placeholder(int),
      knn_train_examples=5000,      # kNN bank: the first N training images (eval transform)
      knn_test_examples=1000,
      knn_k=20,
      num_classes=placeholder(int),  # None: from the labels of those images (no labels: no probe, no kNN)
  ))
  # A step whose loss or gradients are not finite: 'stop' the run (its checkpoints are the last good
  # states), or 'skip' the update (counted as nonfinite_skipped) and stop after nan_max_skips in a row.
  config.nan_policy = "stop"
  config.nan_max_skips = 10
  config.log_every_steps = 50
  # (start, stop): a jax.profiler trace of steps start..stop (from 1, both included) into
  # <workdir>/tensorboard (TensorBoard's profile plugin, Perfetto; experiments/summarize_trace.py), e.g.
  # (10, 12) to skip the first step's compilation. None: no trace.
  config.profile_steps = placeholder(tuple)
  config.viz_every_steps = 2000
  config.viz_num_images = 8
  return config


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Locks a run config so unknown keys raise; call at the end of every ``get_config``."""
  config.lock()
  return config


TASKS = ("pretrain", "knn", "linear_probe", "finetune")
NAN_POLICIES = ("stop", "skip")
MAX_VIZ_IMAGES = 1024  # one picture row per image kind; more would make a PNG no one can look at
_SEED_LIMIT = 2**32  # PRNGKey(seed + 1) (the pictures' key) must fit in 64 bits; 32 are plenty
INT32_LIMIT = 2**31


def is_int(value: Any) -> bool:
  """An int that is not a bool: a ConfigDict int field stores True, and no count or size is ever True."""
  return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
  """A finite real number that is not a bool (a ConfigDict float field stores nan, inf and True)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return False
  return isinstance(value, int) or math.isfinite(value)


def check_int(value: Any, key: str, minimum: int = 1, *, none_means: str = "") -> None:
  """Raises a ValueError naming ``config.<key>`` unless ``value`` is an int in ``[minimum, 2**31)``.

  Counts, sizes and steps become int32 array dimensions or step counters, hence the upper end. Any config
  field can hold None (ConfigDict allows it everywhere), so None is refused too unless ``none_means`` says
  what None stands for.
  """
  if none_means and value is None:
    return
  if not is_int(value) or not minimum <= value < INT32_LIMIT:
    alternative = f" (or None: {none_means})" if none_means else ""
    raise ValueError(f"config.{key}={value!r} must be an int in [{minimum}, 2**31){alternative}")


def check_number(value: Any, key: str, ok: Callable[[float], bool], expected: str, *,
                 none_means: str = "") -> None:
  """Raises a ValueError naming ``config.<key>`` unless ``value`` is a finite number with ``ok(value)``
  (``expected`` says which, e.g. ``'> 0'``); None only where ``none_means`` says what it stands for."""
  if none_means and value is None:
    return
  if not (is_number(value) and ok(value)):
    alternative = f" (or None: {none_means})" if none_means else ""
    raise ValueError(f"config.{key}={value!r} must be a number {expected}{alternative}")


def check_section_keys(section, defaults, section_name: str, owner: str) -> None:
  """A key of ``config.<section_name>`` that ``defaults`` lacks (e.g. one left from another method's section),
  or one of ``defaults`` missing from it, is named with what ``owner`` reads."""
  expected, present = set(defaults), set(section)
  unknown, missing = sorted(present - expected), sorted(expected - present)
  if unknown:
    raise ValueError(f"config.{section_name}.{unknown[0]} is not a {owner} key; {owner} reads {sorted(expected)}")
  if missing:
    raise ValueError(f"config.{section_name}.{missing[0]} is missing ({owner}'s default: "
                     f"{defaults[missing[0]]!r})")


def check_bool(value: Any, key: str) -> None:
  if not isinstance(value, bool):
    raise ValueError(f"config.{key}={value!r} must be True or False")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming the offending generic key; the sections of the encoder, the method, the data
  and the optimizer are checked by their own modules (`sslx.checks.validate_run_config` calls them all)."""
  if config.task not in TASKS:
    raise ValueError(f"config.task={config.task!r} is not one of {TASKS}")
  for section in ("model", "method"):
    if not isinstance(config[section], ml_collections.ConfigDict) or "name" not in config[section]:
      raise ValueError(f"config.{section} has no 'name'; start it from sslx.{section}s.default_config(NAME)")
  if not is_int(config.seed) or not 0 <= config.seed < _SEED_LIMIT:
    raise ValueError(f"config.seed={config.seed!r} must be an int in [0, 2**32)")
  _validate_batch_and_length(config)
  for key in ("log_every_steps", "viz_every_steps"):
    check_int(config[key], key)
  check_int(config.viz_num_images, "viz_num_images")
  if config.viz_num_images > MAX_VIZ_IMAGES:
    raise ValueError(f"config.viz_num_images={config.viz_num_images} must be at most {MAX_VIZ_IMAGES}")
  if config.nan_policy not in NAN_POLICIES:
    raise ValueError(f"config.nan_policy={config.nan_policy!r} is not one of {NAN_POLICIES}")
  check_int(config.nan_max_skips, "nan_max_skips")
  _validate_profile_steps(config.get("profile_steps"))
  _validate_checkpoint_config(config.checkpoint)
  validate_eval_config(config.eval)
  _validate_monitor_config(config.monitor)
  _validate_held_out(config)


def _validate_batch_and_length(config: ml_collections.ConfigDict) -> None:
  num_devices, num_processes = jax.device_count(), jax.process_count()
  batch_size = config.batch_size
  in_range = is_int(batch_size) and 0 < batch_size < INT32_LIMIT
  if not in_range or batch_size % num_devices or batch_size % num_processes:
    raise ValueError(f"config.batch_size={batch_size!r} must be a positive multiple of the device count "
                     f"({num_devices}) and of the process count ({num_processes})")
  check_int(config.total_steps, "total_steps", none_means="config.num_epochs epochs")
  if config.total_steps is None:
    check_int(config.num_epochs, "num_epochs")
  fsdp = config.parallel.fsdp
  if not is_int(fsdp) or fsdp < 1 or num_devices % fsdp:
    raise ValueError(f"config.parallel.fsdp={fsdp!r} must be an int >= 1 that divides the device count "
                     f"({num_devices})")


def _validate_profile_steps(profile_steps: Any) -> None:
  """None, or ``(start, stop)`` ints with ``1 <= start <= stop`` (steps count from 1, as the loop's do)."""
  if profile_steps is None:
    return
  is_pair = isinstance(profile_steps, (tuple, list)) and len(profile_steps) == 2
  if not (is_pair and all(is_int(step) and step < INT32_LIMIT for step in profile_steps)
          and 1 <= profile_steps[0] <= profile_steps[1]):
    raise ValueError(f"config.profile_steps={profile_steps!r} must be None or (start, stop): ints with "
                     "1 <= start <= stop (the steps to trace, both included)")


def _validate_checkpoint_config(checkpoint: ml_collections.ConfigDict) -> None:
  check_int(checkpoint.every_steps, "checkpoint.every_steps")
  check_int(checkpoint.max_to_keep, "checkpoint.max_to_keep")
  check_bool(checkpoint.async_save, "checkpoint.async_save")
  check_int(checkpoint.stop_check_every_steps, "checkpoint.stop_check_every_steps")
  check_number(checkpoint.max_minutes, "checkpoint.max_minutes", lambda v: v > 0, "> 0", none_means="no limit")
  best = checkpoint.best_metric
  # The held-out evaluation reports 'eval/<name>' only, so any other name could never be found.
  if best is not None and not (isinstance(best, str) and best.startswith("eval/") and len(best) > 5):
    raise ValueError(f"config.checkpoint.best_metric={best!r} must be None or a held-out metric "
                     "'eval/<name>', e.g. 'eval/top1'")


def _validate_monitor_config(monitor: ml_collections.ConfigDict) -> None:
  check_bool(monitor.online_probe, "monitor.online_probe")
  check_int(monitor.every_steps, "monitor.every_steps", 0, none_means="at each checkpoint; 0: no monitor")
  for key in ("probe_batch_size", "knn_train_examples", "knn_test_examples", "knn_k"):
    check_int(monitor[key], f"monitor.{key}")
  if monitor.every_steps != 0 and monitor.knn_k > monitor.knn_train_examples:
    raise ValueError(f"config.monitor.knn_k={monitor.knn_k} exceeds the kNN bank: "
                     f"config.monitor.knn_train_examples={monitor.knn_train_examples}")
  check_number(monitor.probe_lr, "monitor.probe_lr", lambda v: v > 0, "> 0")
  check_int(monitor.num_classes, "monitor.num_classes", 2, none_means="from the labels")


def _validate_held_out(config: ml_collections.ConfigDict) -> None:
  """What needs an evaluation split (``config.data.eval_split`` None: a folder of training images only)."""
  if config.data.get("eval_split") is None:
    needing = {"eval.every_epochs": config.eval.every_epochs,
               "checkpoint.best_metric": config.checkpoint.best_metric,
               "eval.after_pretrain": True if config.eval.after_pretrain else None}
    named = [f"config.{key}={value!r}" for key, value in needing.items() if value is not None]
    if named:
      raise ValueError(f"{', '.join(named)} need(s) a held-out split, but config.data.eval_split is None; "
                       "unset them or name an evaluation split")
  if config.checkpoint.best_metric is not None and config.eval.every_epochs is None:
    raise ValueError(f"config.checkpoint.best_metric={config.checkpoint.best_metric!r} needs a held-out "
                     "evaluation: set config.eval.every_epochs")


_PROBES = ("logistic", "lars")


def validate_eval_config(eval_config: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming the first bad ``config.eval`` key."""
  if eval_config.probe not in _PROBES:
    raise ValueError(f"config.eval.probe={eval_config.probe!r} is not one of {_PROBES}")
  knn_ks = eval_config.knn_ks
  is_tuple = isinstance(knn_ks, (tuple, list)) and bool(knn_ks)
  if not (is_tuple and all(is_int(k) and 1 <= k < INT32_LIMIT for k in knn_ks)):
    raise ValueError(f"config.eval.knn_ks={knn_ks!r} must be a non-empty tuple of positive ints")
  check_int(eval_config.batch_size, "eval.batch_size")
  check_int(eval_config.max_train_examples, "eval.max_train_examples", none_means="all")
  if eval_config.max_train_examples is not None and max(knn_ks) > eval_config.max_train_examples:
    raise ValueError(f"config.eval.knn_ks={knn_ks!r} holds a k larger than the kNN bank: "
                     f"config.eval.max_train_examples={eval_config.max_train_examples}")
  check_number(eval_config.knn_temperature, "eval.knn_temperature", lambda v: v > 0, "> 0")
  check_number(eval_config.probe_l2, "eval.probe_l2", lambda v: v >= 0, ">= 0",
               none_means="chosen on a held-out slice")
  check_int(eval_config.probe_epochs, "eval.probe_epochs")
  check_int(eval_config.probe_batch_size, "eval.probe_batch_size")
  check_number(eval_config.probe_base_lr, "eval.probe_base_lr", lambda v: v > 0, "> 0")
  check_number(eval_config.probe_warmup_epochs, "eval.probe_warmup_epochs", lambda v: v >= 0, ">= 0")
  check_number(eval_config.every_epochs, "eval.every_epochs", lambda v: v > 0, "> 0", none_means="off")
  check_bool(eval_config.after_pretrain, "eval.after_pretrain")
  if eval_config.batch_size % jax.process_count():
    raise ValueError(f"config.eval.batch_size={eval_config.batch_size} (global) must be divisible by the "
                     f"process count ({jax.process_count()})")
