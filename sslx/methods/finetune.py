"""Supervised training of an encoder for classification: fine-tuning a pretrained one (MAE, BEiT), or
training one from scratch.

A method bundle like any pretraining method: the one loop in ``sslx.train`` trains it
(``config.task='finetune'``), loads the pretrained encoder from ``config.init_from`` into the encoder's
variables, runs `Method.evaluate` on ``config.data.eval_split`` every ``config.eval.every_epochs`` and keeps
the best state by ``config.checkpoint.best_metric``. Any encoder of `sslx.models` works; BatchNorm
statistics (ResNets) are updated by the training step and used in evaluation.

Model: encoder (drop path) → pooled features (``aux['pooled']``) → ``fc_norm`` (LayerNorm, when
``config.method.fc_norm``) → linear head. Variables are ``{'encoder': ..., 'head': {'fc_norm', 'logits'}}``
in every collection.

Pooling, and where it differs from MAE: MAE's ``--global_pool`` deletes the encoder's final LayerNorm and
normalises the mean of the raw patch tokens with a new ``fc_norm``. Here the encoder stays exactly as it
was pretrained (``pooling='mean'`` averages its *normalised* patch tokens), so every pretrained parameter,
the final norm included, loads one-to-one and nothing pretrained is thrown away; a new ``fc_norm`` then
re-standardises the averaged vector (averaging shrinks it) before the head. The head's kernel starts
from N(0, (2e-5)^2) as in MAE (timm's ``trunc_normal_`` cuts at +-2 absolutely, i.e. never), bias 0.
With ``pooling='cls'`` the head reads the normalised class token directly (MAE's ``--cls_token``).
A fixed sin-cos position table stays fixed here; MAE copies it into a learned one that fine-tuning updates.

Training step: labels → one-hot → mixup or cutmix with probability ``mix_prob`` (cutmix with
probability ``switch_prob``) and label smoothing (`finetune_ops.mix_batch`) → soft-target cross-entropy
(`soft_target_cross_entropy`). Optional EMA of all variables in ``method_state['ema']``;
``config.method.embed_from='ema'`` makes it the representation the evaluation commands read.
"""
from __future__ import annotations

import copy

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn
from ml_collections.config_dict import placeholder

from sslx import config as config_lib
from sslx import models
from sslx.evaluate import finetune_ops
from sslx.methods import Method, RunLength, apply_train, frozen_encoder, online_encoder, subtree_variables
from sslx.models import vit

HEAD_INIT_STD = 2e-5
TOP_K = 5


class ClassifierHead(nn.Module):
  """``fc_norm`` (optional) then a linear layer to ``num_classes`` logits, in float32."""
  num_classes: int
  use_fc_norm: bool
  layer_norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, features):
    features = features.astype(jnp.float32)
    if self.use_fc_norm:
      features = vit.layer_norm(self.layer_norm_eps, jnp.float32, jnp.float32, "fc_norm")(features)
    logits = nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32,
                      kernel_init=vit.partitioned(nn.initializers.normal(HEAD_INIT_STD), ("embed", None)),
                      bias_init=vit.partitioned(nn.initializers.zeros, (None,)), name="logits")(features)
    return logits, features


class Classifier(nn.Module):
  """Encoder + head; returns ``(logits, {'pre_logits': ...})``, both float32."""
  encoder: nn.Module
  num_classes: int
  use_fc_norm: bool = False
  layer_norm_eps: float = 1e-6  # fc_norm's, the encoder's own where it has LayerNorms (MAE's)

  @nn.compact
  def __call__(self, images, *, train: bool):
    features, _ = self.encoder(images, train=train)
    head = ClassifierHead(self.num_classes, use_fc_norm=self.use_fc_norm, layer_norm_eps=self.layer_norm_eps,
                          name="head")
    logits, pre_logits = head(features)
    return logits, dict(pre_logits=pre_logits)


def soft_target_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean cross-entropy against soft targets: ``L = (1/B) sum_b sum_c -t_bc log softmax(z_b)_c``.

  Args:
    logits: ``(B, C)``.
    targets: ``(B, C)`` rows summing to one (mixed and smoothed labels).

  Returns:
    float32 scalar.
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(-jnp.sum(targets * log_probs, axis=-1))


def classification_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
  """Per-batch sums over the rows where ``mask`` is True, for the loop to divide by ``count``.

  ``top1`` / ``top5``: 100 x [label is the arg-max / among the 5 largest logits (all of them when there
  are fewer than 5 classes)]; ``loss``: ``-log softmax(z)_label`` (plain cross-entropy, no smoothing,
  as MAE evaluates).
  """
  logits = logits.astype(jnp.float32)
  weight = mask.astype(jnp.float32)
  # Padding rows carry label -1; any valid index keeps the gathers in range, and `where` drops them.
  safe_labels = jnp.where(mask, labels, 0).astype(jnp.int32)
  _, top = jax.lax.top_k(logits, min(TOP_K, logits.shape[-1]))
  correct1 = (top[:, 0] == safe_labels).astype(jnp.float32)
  correct5 = jnp.any(top == safe_labels[:, None], axis=-1).astype(jnp.float32)
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), safe_labels[:, None], axis=-1)[:, 0]
  return dict(count=jnp.sum(weight), top1=100.0 * jnp.sum(correct1 * weight),
              top5=100.0 * jnp.sum(correct5 * weight), loss=jnp.sum(jnp.where(mask, nll, 0.0)))


def ema_update(ema: Any, params: Any, decay: jax.Array) -> Any:
  """``ema <- decay * ema + (1 - decay) * params``, leaf by leaf."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def training_inputs(rng: jax.Array, images: jax.Array, labels: jax.Array,
                    method_config) -> tuple[jax.Array, jax.Array]:
  """``(images, soft targets)`` of a training batch: mixup / cutmix with probability ``mix_prob``, smoothing.

  Reads ``num_classes``, ``label_smoothing``, ``mixup_alpha``, ``cutmix_alpha``, ``mix_prob`` and
  ``switch_prob`` of ``method_config``; every target row sums to one.
  """
  mc = method_config
  onehot = jax.nn.one_hot(labels, int(mc.num_classes))
  mix_rng, apply_rng = jax.random.split(rng)
  # Both alphas 0 is mix_batch's "smooth only" path: what a batch that is not mixed trains on.
  plain = finetune_ops.mix_batch(mix_rng, images, onehot, mixup_alpha=0.0, cutmix_alpha=0.0,
                                 label_smoothing=mc.label_smoothing)
  if mc.mix_prob == 0 or (mc.mixup_alpha == 0 and mc.cutmix_alpha == 0):
    return plain
  mixed = finetune_ops.mix_batch(mix_rng, images, onehot, mixup_alpha=mc.mixup_alpha,
                                 cutmix_alpha=mc.cutmix_alpha, switch_prob=mc.switch_prob,
                                 label_smoothing=mc.label_smoothing)
  if mc.mix_prob == 1:
    return mixed
  apply = jax.random.bernoulli(apply_rng, mc.mix_prob)
  return jax.tree.map(lambda m, p: jnp.where(apply, m, p), mixed, plain)


def model_from_config(config) -> Classifier:
  return Classifier(models.encoder_from_config(config.model), int(config.method.num_classes),
                    use_fc_norm=bool(config.method.fc_norm),
                    layer_norm_eps=float(config.model.get("layer_norm_eps", 1e-6)))


def build(config, run_length: RunLength) -> Method:
  """The fine-tuning bundle; reads ``config.method.*`` (see `default_config`) and ``config.model``."""
  del run_length
  validate_config(config)
  model = model_from_config(config)
  ema_decay = config.method.ema_decay

  def init(rng, batch):
    variables = dict(model.init({"params": rng}, batch["image"], train=False))
    # The loop replaces the encoder with the pretrained one after init; `after_update` therefore
    # overwrites this copy at the first step instead of averaging the random encoder in.
    return variables, ({"ema": variables} if ema_decay is not None else {})

  def loss_fn(variables, method_state, batch, rng):
    mix_rng, dropout_rng = jax.random.split(rng)
    images, targets = training_inputs(mix_rng, batch["image"], batch["label"], config.method)
    (logits, _), model_state = apply_train(model, variables, images, rngs={"dropout": dropout_rng})
    loss = soft_target_cross_entropy(logits, targets)
    return loss, ({"loss": loss}, method_state, model_state)

  def after_update(variables, method_state, step):
    if ema_decay is None:
      return method_state
    decay = jnp.where(step == 0, 0.0, ema_decay)
    return {"ema": ema_update(method_state["ema"], variables, decay)}

  def logits_of(variables, images):
    return model.apply(variables, images, train=False)[0]

  def evaluate(variables, method_state, batch):
    mask = batch.get("mask", jnp.ones(batch["label"].shape, bool))
    sums = classification_sums(logits_of(variables, batch["image"]), batch["label"], mask)
    if "ema" in method_state:
      ema_sums = classification_sums(logits_of(method_state["ema"], batch["image"]), batch["label"], mask)
      sums.update({f"ema_{name}": value for name, value in ema_sums.items() if name != "count"})
    return sums

  if config.method.embed_from == "ema":
    embed, encoder_variables = frozen_encoder(
        model.encoder, lambda variables, method_state: subtree_variables(method_state["ema"], "encoder"))
  else:
    embed, encoder_variables = online_encoder(model.encoder)
  return Method(name="finetune", num_views=1, init=init, loss_fn=loss_fn, embed=embed,
                encoder_variables=encoder_variables, after_update=after_update, evaluate=evaluate)


def default_config() -> ml_collections.ConfigDict:
  """``config.method`` of supervised training: MAE's fine-tuning regularisers (see `finetune_config`)."""
  return ml_collections.ConfigDict(dict(
      name="finetune", num_classes=placeholder(int), label_smoothing=0.1, mixup_alpha=0.8, cutmix_alpha=1.0,
      mix_prob=1.0, switch_prob=0.5,
      fc_norm=False,                # LayerNorm before the linear head (MAE's global pooling)
      ema_decay=placeholder(float),  # e.g. 0.9999; None: no EMA
      embed_from="online",          # the representation evaluations read: 'online' | 'ema'
  ))


def finetune_config(pretrain: ml_collections.ConfigDict, *, num_classes: int, batch_size: int,
                    num_epochs: int, base_lr: float, layer_decay: float, drop_path_rate: float,
                    augmentation: str, warmup_epochs: float = 5.0) -> ml_collections.ConfigDict:
  """A fine-tuning config for the encoder and data set of the pretraining config ``pretrain``.

  Model shape and data come from ``pretrain`` (so ``--config.init_from`` restores into the same shapes);
  the rest is MAE's fine-tuning recipe: AdamW (0.9, 0.999), weight decay 0.05, lr = base_lr * batch / 256
  with ``warmup_epochs`` of warm-up then half-cosine to 1e-6, label smoothing 0.1, mixup 0.8 / cutmix 1.0
  (always one of them, cutmix half the time), global average pooling, evaluation every epoch and the
  best state kept by top-1. Returned unlocked, for the caller to adjust and `config.finalize`.
  """
  config = config_lib.base_config()
  config.task = "finetune"
  # Copies: the pretraining config stays as it was. A mask token is a pretraining device; `init_from` lists it
  # as ignored when the pretrained encoder has one.
  config.model = copy.deepcopy(pretrain.model)
  config.model.update(dict(pooling="mean", drop_path_rate=drop_path_rate))
  if "mask_token" in config.model:
    config.model.mask_token = False
  config.data = copy.deepcopy(pretrain.data)
  config.data.augmentation = augmentation
  config.method = default_config()
  config.method.update(dict(num_classes=num_classes, fc_norm=True))
  config.batch_size = batch_size
  config.num_epochs = num_epochs
  # The default weight-decay rule (kernels only) is MAE's fine-tuning one: tokens and position tables exempt.
  config.optimizer.update(dict(base_lr=base_lr, b1=0.9, b2=0.999, weight_decay=0.05, layer_decay=layer_decay))
  config.schedule.update(dict(warmup_epochs=warmup_epochs, min_lr=1e-6))
  config.eval.every_epochs = 1.0
  config.checkpoint.best_metric = "eval/top1"
  # Fine-tuning scores itself on the held-out split (`evaluate`); the frozen-encoder monitors would only
  # add their kNN and probe passes at every checkpoint.
  config.monitor.online_probe = False
  config.monitor.every_steps = 0
  config.eval.after_pretrain = False
  return config


_EMBED_FROM = ("online", "ema")


def validate_config(config) -> None:
  """Raises a ValueError naming the first bad fine-tuning key; cheap, runs before anything compiles."""
  mc = config.method
  config_lib.check_int(mc.num_classes, "method.num_classes", 2)
  config_lib.check_number(mc.label_smoothing, "method.label_smoothing", lambda v: 0.0 <= v < 1.0, "in [0, 1)")
  for key in ("mixup_alpha", "cutmix_alpha"):
    config_lib.check_number(mc[key], f"method.{key}", lambda v: v >= 0, ">= 0 (0: off)")
  for key in ("mix_prob", "switch_prob"):
    config_lib.check_number(mc[key], f"method.{key}", lambda v: 0.0 <= v <= 1.0, "in [0, 1] (a probability)")
  config_lib.check_bool(mc.fc_norm, "method.fc_norm")
  config_lib.check_number(mc.ema_decay, "method.ema_decay", lambda v: 0.0 < v < 1.0, "in (0, 1)",
                          none_means="no EMA")
  if mc.embed_from not in _EMBED_FROM:
    raise ValueError(f"config.method.embed_from={mc.embed_from!r} is not one of {_EMBED_FROM}")
  if mc.embed_from == "ema" and mc.ema_decay is None:
    raise ValueError("config.method.embed_from='ema' needs config.method.ema_decay")
  if config.optimizer.get("layer_decay") is not None and config.model.get("name", "vit") != "vit":
    raise ValueError(f"config.optimizer.layer_decay={config.optimizer.layer_decay} needs a ViT's blocks; "
                     f"config.model.name={config.model.name!r}")
