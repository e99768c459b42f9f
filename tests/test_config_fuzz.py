"""Fuzzing the run-config validation: whatever a config file may store, `checks.validate_run_config` either
accepts it or raises a ValueError naming a ``config.`` key, and what it accepts gets as far as an abstract
training step (method, optimizer, augmentations, ``jax.eval_shape`` of the init and of one step) without an
error. Anything else is a validation gap, to be fixed in the module that owns the key.

Values are drawn per key: plausible ones (so that draws get past the first check and reach the later ones)
mixed with junk every key must survive: zero, negatives, huge numbers, non-finite floats, bools, None, empty
strings and tuples, wrong types. A value the locked ConfigDict itself refuses to store (a TypeError, which the
command line already reports in one line) is dropped from the draw.
"""
import collections

import flax.linen as nn
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp

from sslx import checks
from sslx import methods
from sslx import monitors
from sslx import optim
from sslx import train
from sslx.data import device_augment
from sslx.data import views
from sslx.methods import RunLength
from sslx.models import vit
from test_configs import load_config
from train_helpers import tiny_run_config

MAX_EXAMPLES = 60
NUM_TRAIN_EXAMPLES = 60_000  # Fashion-MNIST's training split, which both base configs read

# Kinds of junk, each drawn as often as the others: zero, negatives, huge, non-finite, bools, None, strings,
# tuples.
JUNK_KINDS = ((0, 0.0), (-1, -0.5, -(10**6)), (10**9, 2**31, 2**63, 10**30, 1e30),
              (float("nan"), float("inf"), -float("inf")), (True, False), (None,), ("", "junk", "None"),
              ((), ("junk",), (0,), (1.0, 2.0), ((".*", -1.0),)))

_RATES = (0.0, 1e-4, 0.1, 0.5, 0.99, 1.0)
_SPECS = ("random_resized_crop(28)|hflip", "random_resized_crop(28)|color_jitter(0.5)|grayscale|solarize",
          "center_crop(28)", "random_resized_crop(14)", "hflip", "random_resized_crop(28)|normalize",
          "random_resized_crop(28)|normalize((0.5, 0.5, 0.5), (0.2, 0.2, 0.2))",
          "random_resized_crop(28)|blur(kernel_size=99)", "random_resized_crop(28, scale=(0, 1))",
          "random_resized_crop(28)|blur", "random_resized_crop(28", "rrc(28)", "random_resized_crop(10**9)")
_REGEX_RULES = ((), ((".*", 1.0),), (("(", 1.0),), ((".*/kernel$",),), (".*",), ((".*decoder.*", 0.1),),
                ((".*", "x"),), (("encoder/.*", 1.0),), (("encoder/.*", -1),))
_COMMON = {
    "seed": (0, 1, 2**32, 2**40),
    "batch_size": (1, 2, 3, 8, 16),
    "total_steps": (1, 2, 100, None),
    "num_epochs": (1, 2),
    "log_every_steps": (1, 5, 1000),
    "viz_every_steps": (1, 5, 1000),
    "viz_num_images": (1, 4, 2000),
    "parallel.fsdp": (1, 2),
    "checkpoint.every_steps": (1, 5),
    "checkpoint.max_to_keep": (1, 10),
    "checkpoint.async_save": (True, False),
    "checkpoint.best_metric": ("eval/top1", "top1", "eval/"),
    "checkpoint.max_minutes": (None, 1e-6, 0.0, -1.0, 60.0),
    "checkpoint.stop_check_every_steps": (1, 10, 0, -3),
    "nan_policy": ("stop", "skip", "ignore", ""),
    "nan_max_skips": (1, 10, 0, -1),
    "init_from": ("runs/nowhere", (("runs/x", "encoder", "encoder"),), (("a", "b"),), ("a", "b", "c")),
    "data.image_size": (28, 14, 7, 56, 30, 4096, 5000),
    "data.channels": (1, 3, 2),
    "data.mean": ((0.5,), (0.5, 0.5, 0.5), (2.0,)),
    "data.std": ((0.5,), (0.0,), (0.2, 0.2, 0.2)),
    "data.augmentation": (None, *_SPECS),
    "data.views": (("random_resized_crop(28)",), ("random_resized_crop(28)", "random_resized_crop(14)")),
    "data.augment.crop_scale": ((0.2, 1.0), (0.0, 1.0), (0.5, 0.4)),
    "data.augment.crop_ratio": ((0.75, 1.33), (2.0, 1.0)),
    "data.augment.interpolation": ("bilinear", "nearest"),
    "data.augment.hflip": (True, False),
    "data.eval_crop_fraction": (0.875, 1.0, 1.5),
    "data.num_workers": (0, 2),
    "data.augment_on": ("host", "device", "gpu"),
    "data.split": ("train", "test", "val"),
    "data.eval_split": (None, "test", "train", "validation"),
    "optimizer.name": ("adamw", "sgd", "lars", "adam"),
    "optimizer.base_lr": (0.0, 1e-3, 1e30),
    "optimizer.lr_batch_base": (256, 1),
    "optimizer.b1": (0.0, 0.9, 1.0),
    "optimizer.b2": (0.95, 0.999, 1.0),
    "optimizer.momentum": (0.9, 1.0),
    "optimizer.nesterov": (True, False),
    "optimizer.lars_trust_coefficient": (0.001, 1.0),
    "optimizer.weight_decay": (0.0, 0.05),
    "optimizer.weight_decay_end": (None, 0.0, 0.5),
    "optimizer.wd_mults": _REGEX_RULES,
    "optimizer.lr_mults": _REGEX_RULES,
    "optimizer.frozen": (("encoder/.*",), (".*",), ("(",), "encoder", (1,)),
    "optimizer.freeze_epochs": _REGEX_RULES,
    "optimizer.grad_clip_norm": (None, 1.0),
    "optimizer.layer_decay": (None, 0.75, 1.0, 1.5),
    "schedule.warmup_epochs": (0.0, 1.0, 1e9),
    "schedule.min_lr": (0.0, 1e-6, 1.0),
    "eval.after_pretrain": (True, False),
    "eval.batch_size": (1, 3, 100),
    "eval.max_train_examples": (None, 1, 10),
    "eval.knn_ks": ((20,), (1, 5), (0,), ("a",), (2.5,)),
    "eval.knn_temperature": (0.07, 1.0),
    "eval.probe": ("logistic", "lars", "sgd"),
    "eval.probe_l2": (None, 1e-4),
    "eval.probe_epochs": (1, 90),
    "eval.probe_batch_size": (1, 1024),
    "eval.probe_base_lr": (0.1, 1.0),
    "eval.probe_warmup_epochs": (0.0, 10.0),
    "eval.every_epochs": (None, 1.0, 0.5),
    "monitor.online_probe": (True, False),
    "monitor.probe_batch_size": (1, 8, 10**6),
    "monitor.probe_lr": (1e-3, 1.0),
    "monitor.every_steps": (None, 0, 1),
    "monitor.knn_train_examples": (1, 200),
    "monitor.knn_test_examples": (1, 100),
    "monitor.knn_k": (1, 20, 500),
    "monitor.num_classes": (None, 1, 2, 10),
}
_VIT = {
    "model.variant": ("Ti/7", "Ti/4", "S/14", "B/16", "Ti/28", "Ti/3", "X/7", "Ti/0", "Ti"),
    "model.width": (None, 4, 8, 30, 36, 64),
    "model.depth": (None, 1, 2),
    "model.num_heads": (None, 1, 2, 3, 5),
    "model.mlp_dim": (None, 1, 16),
    "model.pooling": (None, "cls", "mean", "max"),
    "model.pos_embed": ("learned", "sincos", "rope"),
    "model.dtype": ("float32", "bfloat16", "auto", "float64"),
    "model.drop_path_rate": (0.0, 0.5, 1.0),
    "model.layer_norm_eps": (1e-6, 1.0),
    "model.mask_token": (True, False),
    "model.scan_blocks": (True, False),
    "model.remat": ("none", "matmuls", "full", "dots"),
    "model.attention": ("auto", "xla", "cudnn", "flash"),
}
_MAE = {
    "method.mask_ratio": (0.5, 0.75, 0.9, 0.99, 0.999, 1e-17),
    "method.norm_pix_loss": (True, False),
    "method.decoder.width": (8, 16, 30, 6),
    "method.decoder.depth": (1, 2),
    "method.decoder.num_heads": (1, 2, 3),
    "method.decoder.mlp_dim": (8, 64),
}
_RESNET = {
    "model.variant": ("18", "34", "50", "19", "resnet18"),
    "model.width": (1, 4, 8),
    "model.small_images": (True, False),
    "model.zero_init_last_bn": (True, False),
    "model.pooling": (None, "mean", "cls"),
    "model.dtype": ("float32", "bfloat16", "auto", "float64"),
}
_SUPERVISED = {
    "method.num_classes": (2, 10, 1, 1000),
    "method.label_smoothing": (0.0, 0.1, 0.99),
    "method.mixup_alpha": (0.0, 0.8),
    "method.cutmix_alpha": (0.0, 1.0),
    "method.mix_prob": _RATES,
    "method.switch_prob": _RATES,
    "method.fc_norm": (True, False),
    "method.ema_decay": (None, 0.9, 0.9999),
    "method.embed_from": ("online", "ema"),
}
_CONTRASTIVE = {
    "model.variant": ("18", "50"),
    "model.width": (1, 4, 8),
    "model.bn_groups": (1, 2, 3, 4, 64),
    "method.temperature": (0.1, 0.5, 0.0),
    "method.head.num_layers": (1, 2, 3),
    "method.head.hidden_dim": (None, 8, 2048),
    "method.head.out_dim": (8, 128),
    "method.head.batch_norm": (True, False),
    "method.head.kernel_init_std": (None, 0.01, 1.0),
    "data.views": (("random_resized_crop(28)|hflip",) * 2,
                   ("random_resized_crop(28)", "random_resized_crop(14)"), ("random_resized_crop(28)",) * 3),
}
_MOCO = {
    "method.queue_size": (16, 32, 64, 48, 65536),
    "method.momentum": (0.0, 0.99, 0.999, 1.0),
}
_JUNK = st.sampled_from(JUNK_KINDS).flatmap(st.sampled_from)
BASES = {
    "mae": (tiny_run_config, {**_COMMON, **_VIT, **_MAE}),
    "resnet": (lambda: load_config("supervised_fashion_mnist", "test"),
               {**_COMMON, **_RESNET, **_SUPERVISED}),
    "simclr": (lambda: load_config("simclr_fashion_mnist", "test"), {**_COMMON, **_CONTRASTIVE}),
    "moco": (lambda: load_config("mocov2_fashion_mnist", "test"), {**_COMMON, **_CONTRASTIVE, **_MOCO}),
}


def _set(config, key, value) -> bool:
  """Stores ``value`` at the dotted ``key``; False where the ConfigDict refuses its type."""
  *parents, leaf = key.split(".")
  holder = config
  for parent in parents:
    holder = holder[parent]
  try:
    holder[leaf] = value
  except TypeError:
    return False
  return True


def _too_big_to_trace(config) -> bool:
  """Shapes past which tracing alone takes minutes or gigabytes: a cost of this test, not an error."""
  model = config.model
  if model.name == "resnet":
    return config.batch_size > 4096 or model.width > 2**14
  dims = vit.parse_variant(model.variant)
  dims.update({key: model[key] for key in dims if model.get(key) is not None})
  decoder = config.method.get("decoder") or dims  # a method without a decoder of its own: the encoder's sizes
  num_patches = (config.data.image_size // dims["patch_size"]) ** 2
  return (config.batch_size > 4096 or max(dims["depth"], decoder["depth"]) > 64
          or max(dims["width"], decoder["width"]) * num_patches > 2**22
          or max(dims["mlp_dim"], decoder["mlp_dim"]) > 2**16)


def _abstract_training_step(config) -> None:
  """Everything the loop builds before its first batch, with abstract arrays in place of data."""
  steps_per_epoch, total_steps = train.schedule_length(config, NUM_TRAIN_EXAMPLES)
  method = methods.build_method(config, RunLength(steps_per_epoch, total_steps))
  checks.validate_views(config, method.num_views)
  tx, schedules = optim.build_optimizer(config, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  on_device = config.data.augment_on == "device"
  augmentations = views.build_views(config.data, host_part=device_augment.host_part if on_device else None)
  prepare_batch = device_augment.build_device_augmentation(config.data)
  probe = monitors.make_online_probe(config, method.embed, num_classes=10)
  size, channels = config.data.image_size, config.data.channels
  state = jax.eval_shape(lambda rng: train.init_train_state(method, tx, rng, (size, size, channels), probe),
                         jax.random.PRNGKey(config.seed))
  batch = {key: jax.ShapeDtypeStruct((config.batch_size, *shape), jnp.uint8 if on_device else jnp.float32)
           for key, shape in views.view_shapes(augmentations, channels).items()}
  batch["label"] = jax.ShapeDtypeStruct((config.batch_size,), jnp.int32)
  step = train.make_train_step(method, tx, schedules, probe=probe, prepare_batch=prepare_batch)
  jax.eval_shape(step, nn.unbox(state), batch)


def fuzz(bases, max_examples: int) -> collections.Counter:
  """Draws ``max_examples`` configs, each a base of ``bases`` (name: ``(make_config, {key: values})``) with 1
  to 3 of its keys overridden, and checks that each is rejected naming a key or traced through a step."""
  counts = collections.Counter()

  @settings(max_examples=max_examples, derandomize=True, deadline=None, database=None,
            suppress_health_check=list(HealthCheck))
  @given(base=st.sampled_from(sorted(bases)), data=st.data())
  def check(base, data):
    make_config, values = bases[base]
    config = make_config()
    keys = data.draw(st.lists(st.sampled_from(sorted(values)), min_size=1, max_size=3, unique=True))
    for key in keys:
      value = data.draw(st.one_of(st.sampled_from(values[key]), _JUNK), label=key)
      counts["overrides refused by the ConfigDict (TypeError)"] += not _set(config, key, value)
    counts["configs tried"] += 1
    try:
      checks.validate_run_config(config)
    except ValueError as error:
      assert "config." in str(error), f"a ValueError that names no config key: {error}"
      counts["rejected with a ValueError naming config.<key>"] += 1
      return
    if _too_big_to_trace(config):
      counts["accepted, too big to trace here"] += 1
      return
    try:
      _abstract_training_step(config)
    except Exception as error:  # pylint: disable=broad-except  (any error past validation is a gap)
      note(f"validation accepted the config, then: {type(error).__name__}: {error}")
      raise
    counts["accepted and traced through one abstract step"] += 1

  check()
  print("\nconfig fuzz: " + ", ".join(f"{name} {count}" for name, count in counts.items()))
  # A fuzz that rejects everything, or nothing, would test little.
  assert counts["rejected with a ValueError naming config.<key>"] >= max_examples // 4
  assert counts["accepted and traced through one abstract step"] >= max_examples // 10
  return counts


def test_validation_accepts_or_names_a_key():
  fuzz(BASES, MAX_EXAMPLES)
