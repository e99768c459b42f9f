"""The config keys every sslx run understands, their defaults, and their validation.

Run configs in ``configs/`` start from `base_config()`, add an encoder and a method section and override
values; the dict is locked, so a
typo in a config file or in a ``--config.key=value`` override is an error naming the key instead of a
silently ignored setting.
"""
from __future__ import annotations

import jax
import ml_collections
from ml_collections.config_dict import placeholder


def _data_defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      source="idx",                 # 'idx' | 'tfds' | 'synthetic' | 'folder'
      dataset="fashion_mnist",      # TFDS name for source='tfds' (e.g. 'imagenet2012')
      data_dir=placeholder(str),  # None = the source's default place
      split="train",
      eval_split="test",
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
  config.schedule = ml_collections.ConfigDict(dict(warmup_epochs=40.0, min_lr=0.0))
  config.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=1000, max_to_keep=3, async_save=True,
      best_metric=placeholder(str),  # e.g. 'eval/top1': also keep the best-scoring state in <workdir>/best
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
  config.log_every_steps = 50
  config.viz_every_steps = 2000
  config.viz_num_images = 8
  return config


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Locks a run config so unknown keys raise; call at the end of every ``get_config``."""
  config.lock()
  return config


TASKS = ("pretrain", "knn", "linear_probe", "finetune")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming the offending generic key; the sections of the encoder, the method, the data
  and the optimizer are checked by their own modules (`sslx.checks.validate_run_config` calls them all)."""
  if config.task not in TASKS:
    raise ValueError(f"config.task={config.task!r} is not one of {TASKS}")
  for section in ("model", "method"):
    if "name" not in config[section]:
      raise ValueError(f"config.{section} has no 'name'; start it from sslx.{section}s.default_config(NAME)")
  num_devices, num_processes = jax.device_count(), jax.process_count()
  if config.batch_size <= 0 or config.batch_size % num_devices or config.batch_size % num_processes:
    raise ValueError(f"config.batch_size={config.batch_size} must be a positive multiple of the device count "
                     f"({num_devices}) and of the process count ({num_processes})")
  if config.eval.batch_size % num_processes:
    raise ValueError(f"config.eval.batch_size={config.eval.batch_size} (global) must be divisible by the process "
                     f"count ({num_processes})")
  for key in ("log_every_steps", "viz_every_steps"):
    if config[key] <= 0:
      raise ValueError(f"config.{key}={config[key]} must be positive")
  if config.checkpoint.every_steps <= 0 or config.checkpoint.max_to_keep <= 0:
    raise ValueError("config.checkpoint.every_steps and config.checkpoint.max_to_keep must be positive")
  if config.total_steps is not None and config.total_steps <= 0:
    raise ValueError(f"config.total_steps={config.total_steps} must be positive")
  validate_eval_config(config.eval)
  _validate_monitor_config(config)
  if config.checkpoint.best_metric is not None and config.eval.every_epochs is None:
    raise ValueError(f"config.checkpoint.best_metric={config.checkpoint.best_metric!r} needs a held-out "
                     "evaluation: set config.eval.every_epochs")


def _validate_monitor_config(config: ml_collections.ConfigDict) -> None:
  monitor = config.monitor
  if monitor.every_steps is not None and monitor.every_steps < 0:
    raise ValueError(f"config.monitor.every_steps={monitor.every_steps} must be >= 0 (0: no monitor)")
  for key in ("probe_batch_size", "knn_train_examples", "knn_test_examples", "knn_k"):
    if monitor[key] < 1:
      raise ValueError(f"config.monitor.{key}={monitor[key]} must be positive")
  if monitor.probe_lr <= 0:
    raise ValueError(f"config.monitor.probe_lr={monitor.probe_lr} must be positive")
  if monitor.num_classes is not None and monitor.num_classes < 2:
    raise ValueError(f"config.monitor.num_classes={monitor.num_classes} must be at least 2 (or None)")
  if config.eval.every_epochs is not None and config.eval.every_epochs <= 0:
    raise ValueError(f"config.eval.every_epochs={config.eval.every_epochs} must be positive (or None)")


def validate_eval_config(eval_config: ml_collections.ConfigDict) -> None:
  if eval_config.probe not in ("logistic", "lars"):
    raise ValueError(f"config.eval.probe={eval_config.probe!r} is not 'logistic' or 'lars'")
  if not eval_config.knn_ks or any(int(k) != k or k < 1 for k in eval_config.knn_ks):
    raise ValueError(f"config.eval.knn_ks={eval_config.knn_ks!r} must be positive integers")
  if eval_config.batch_size < 1:
    raise ValueError(f"config.eval.batch_size={eval_config.batch_size} must be positive")
