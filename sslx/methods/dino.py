"""DINO (Caron et al. 2021; facebookresearch/dino): self-distillation with no labels, a student against an EMA
teacher over multi-crop views.

Views (`config.data.views`, batch keys ``view_0..view_{V-1}``): the first ``G = config.method.num_global_crops``
are global crops at the model's size, the rest smaller local crops. The student ``g_s`` (encoder + `DINOHead`)
sees all ``V`` crops, the teacher ``g_t`` only the ``G`` global ones. Crops of one resolution go through the
encoder as one call (concatenated along the batch, then split; one call per resolution group, as the
reference's ``MultiCropWrapper``), and the head runs once on every crop's features.

Loss (`sslx.losses.dino_loss`, with the centre ``c`` of the previous step), over the pairs of a teacher crop
``a`` and another student crop ``v``:

    P_t[a] = softmax((g_t(x_a) - c) / tau_t),   log P_s[v] = log_softmax(g_s(x_v) / tau_s),
    L = 1 / (G (V - 1)) sum_{a < G} sum_{v != a} mean_b H(P_t[a, b], P_s[v, b]),

``tau_s = config.method.student_temperature`` (0.1) and ``tau_t`` rising linearly from
``warmup_teacher_temperature`` (0.04) to ``teacher_temperature`` (0.07) over ``teacher_temp_warmup_epochs`` (0:
constant; `losses.teacher_temperature_schedule`). The centre then moves to the teacher's mean logit
(`losses.dino_center_update`): ``c <- m_c c + (1 - m_c) mean_{a, b} g_t(x_a)_b``, ``m_c = 0.9``.

Teacher. Its parameters ``xi`` follow the student's ``theta`` after update ``k`` of ``K``
(`RunLength.total_steps`; `after_update`):

    xi <- m_k xi + (1 - m_k) theta,    m_k = 1 - (1 - m_0) (cos(pi k / K) + 1) / 2     (`schedules.cosine_momentum`)

with ``m_0 = config.method.momentum`` (0.996). The first update copies ``theta`` instead (the reference starts
the teacher as a copy of the student; copying at the first update also lets an encoder that ``config.init_from``
loads after `init` reach the teacher at once). The teacher gets no gradient and no stochastic depth (the
reference builds it without ``drop_path_rate``); it runs in training mode, so BatchNorm (a ResNet encoder, or a
head with ``batch_norm``) normalises with batch statistics, as in the reference.

Last layer. For its first ``config.method.freeze_last_layer_epochs`` epochs the student's last head layer
(prototypes, `dino_head.LAST_LAYER`) stays as initialised, as the reference's ``cancel_gradients_last_layer``
does by setting its gradients to None, which torch's AdamW then skips entirely. Here two things do it: the loss
gives that layer a zero gradient while frozen (so AdamW's moments stay 0 and the layer counts in neither the
gradient norm nor its clipping), and ``config.optimizer.freeze_epochs`` holds ``(LAST_LAYER_PATTERN, epochs)``,
whose zeroed update keeps the weight decay off it (`validate_config` checks the two agree). One difference
remains: optax's Adam counts steps for all parameters together, so when the layer starts moving its bias
correction is that of the global step, where torch's per-parameter count starts at 1.

``method_state`` holds the teacher's variables, the centre ``c`` (``(K,)`` float32) and ``step``, the number of
updates done, which `after_update` advances and the loss reads for ``tau_t`` (``loss_fn`` is given no step).

Metrics: ``loss``, ``teacher_entropy`` and ``kl`` (`losses.DinoLoss`: the collapse signals of the paper's
Fig. 7), ``teacher_temperature``, and ``collapse``: 1 when the teacher's entropy is within 2% of ``ln K``
(uniform) or of 0 (one prototype dominates) while the KL is below 0.01 nats (the student has caught up with
it), else 0. The loop warns whenever a logged mean of ``collapse`` is above 0 (`sslx.step_metrics`).

`Method.embed` reads the teacher encoder, as DINO's evaluations do (``config.method.embed_from='student'``:
the student's). `Method.visualize`, for a ViT encoder: the teacher's class-token attention maps of its last
block over the held-out picture batch (`sslx.models.attention_weights.cls_attention_maps`), one row per image:
the image, then each head's map over it, as ``python -m sslx.attention_maps`` draws them (`sslx.viz`).
"""
from __future__ import annotations

import collections
import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sslx import config as config_lib
from sslx import losses
from sslx import models
from sslx import optim
from sslx import schedules
from sslx.data import transforms
from sslx.data import views as views_lib
from sslx.methods import Method, RunLength, apply_train, frozen_encoder, subtree_variables
from sslx.models import attention_weights
from sslx.models import dino_head
from sslx.models import heads
from sslx.models import vit

EMBED_FROM = ("teacher", "student")
CENTER_MOMENTUM = 0.9
# `collapse`: the teacher's entropy within this fraction of ln K of either end, and the KL below COLLAPSE_KL.
COLLAPSE_ENTROPY_MARGIN = 0.02
COLLAPSE_KL = 0.01
_LAST_LAYER_KERNEL = f"head/{dino_head.LAST_LAYER}/kernel"
_OVERLAY_ALPHA = 0.6  # `sslx.viz.attention_rows`' blend of heat map over image


def default_config() -> ml_collections.ConfigDict:
  """``config.method`` of DINO (the paper's ViT setting): 2 global crops, tau_s = 0.1, tau_t 0.04 -> 0.07 over
  30 epochs, m_0 = 0.996, the last layer frozen for 1 epoch, `dino_head.dino_head_config` (K = 65,536),
  evaluation from the teacher."""
  return ml_collections.ConfigDict(dict(
      name="dino", num_global_crops=2, student_temperature=0.1, warmup_teacher_temperature=0.04,
      teacher_temperature=0.07, teacher_temp_warmup_epochs=30.0, momentum=0.996, freeze_last_layer_epochs=1.0,
      embed_from="teacher", head=dino_head.dino_head_config()))


def crop_sizes(config) -> list[int]:
  """The side of every view's crop, in view order (``config.data.views``)."""
  data = config.data
  return [transforms.build_augmentation(spec, mean=tuple(data.mean), std=tuple(data.std)).output_size
          for _, spec in views_lib.view_specs(data).values()]


def validate_config(config) -> None:
  """Raises a ValueError naming the first bad ``config.method`` key, or the view or optimizer rule at odds with
  it."""
  mc = config.method
  for key in ("student_temperature", "warmup_teacher_temperature", "teacher_temperature"):
    config_lib.check_number(mc.get(key), f"method.{key}", lambda v: v > 0, "> 0")
  for key in ("teacher_temp_warmup_epochs", "freeze_last_layer_epochs"):
    config_lib.check_number(mc.get(key), f"method.{key}", lambda v: v >= 0, ">= 0")
  config_lib.check_number(mc.momentum, "method.momentum", lambda v: 0 <= v < 1, "in [0, 1)")
  if mc.embed_from not in EMBED_FROM:
    raise ValueError(f"config.method.embed_from={mc.embed_from!r} is not one of {EMBED_FROM}")
  dino_head.validate_dino_head_config(mc.head)
  _validate_crops(config)
  _validate_last_layer_freeze(config)
  heads.check_bn_groups(config, config.batch_size, f"one crop of config.batch_size={config.batch_size}")


def _validate_crops(config) -> None:
  views = config.data.views
  config_lib.check_int(config.method.num_global_crops, "method.num_global_crops")
  num_global = config.method.num_global_crops
  if views is None or len(views) < max(num_global, 2):
    raise ValueError(f"config.method.num_global_crops={num_global} global crops and the local ones come from "
                     f"config.data.views={views!r}: list at least {max(num_global, 2)} specs, the global ones first")
  patch = None
  if config.model.get("name", "vit") == "vit":
    patch = vit.parse_variant(config.model.variant)["patch_size"]
  for i, size in enumerate(crop_sizes(config)):
    if i < num_global and size != config.data.image_size:
      raise ValueError(f"config.data.views[{i}] makes {size} px crops but it is one of the "
                       f"config.method.num_global_crops={num_global} global crops, which must be the model's "
                       f"config.data.image_size={config.data.image_size}")
    if patch is not None and size % patch:
      raise ValueError(f"config.data.views[{i}] makes {size} px crops, not divisible by the patch size {patch} "
                       f"of config.model.variant={config.model.variant!r}")


def _validate_last_layer_freeze(config) -> None:
  """``config.optimizer.freeze_epochs`` must freeze the last layer for as long as the loss cancels its gradient."""
  epochs = config.method.freeze_last_layer_epochs
  optim.validate_optimizer_config(config)  # the rules are well formed before they are read
  if optim.rule_value(config.optimizer.get("freeze_epochs", ()), _LAST_LAYER_KERNEL, 0) != epochs:
    raise ValueError(f"config.optimizer.freeze_epochs={config.optimizer.get('freeze_epochs')!r} must hold "
                     f"({dino_head.LAST_LAYER_PATTERN!r}, {epochs}) to match config.method.freeze_last_layer_epochs="
                     f"{epochs} (recipes_distillation.freeze_last_layer sets both)")


def resolution_groups(crops: Sequence[jax.Array]) -> list[list[int]]:
  """Indices of the crops of each resolution, in order of first appearance, e.g. ``[[0, 1], [2, 3, 4]]``."""
  groups: dict[tuple[int, ...], list[int]] = {}
  for i, crop in enumerate(crops):
    groups.setdefault(tuple(crop.shape[1:3]), []).append(i)
  return list(groups.values())


class MultiCropNetwork(nn.Module):
  """Encoder then `DINOHead` on a sequence of crops of one batch: one encoder call per resolution group, one
  head call on every crop's features. Returns the logits ``(num_crops, B, K)``. Variables:
  ``{'encoder', 'head'}`` in every collection."""
  encoder: nn.Module
  head: dino_head.DINOHead

  @nn.compact
  def __call__(self, crops: Sequence[jax.Array], *, train: bool):
    features = [None] * len(crops)
    for group in resolution_groups(crops):
      pooled, _ = self.encoder(jnp.concatenate([crops[i] for i in group]), train=train)
      for i, part in zip(group, jnp.split(pooled, len(group)), strict=True):
        features[i] = part
    logits = self.head(jnp.concatenate(features), train=train)
    return logits.reshape(len(crops), crops[0].shape[0], logits.shape[-1])


def networks(config) -> tuple[MultiCropNetwork, MultiCropNetwork]:
  """``(student, teacher)``: the encoder of ``config.model`` under the head of ``config.method.head``, the
  teacher's encoder without stochastic depth. Same variables; the head computes in the encoder's dtype."""
  dtype = vit.resolve_dtype(config.model.get("dtype", "auto"))
  head = dino_head.from_config(config.method.head, dtype, int(config.model.get("bn_groups", 1)))
  teacher_model = config.model.copy_and_resolve_references()
  if "drop_path_rate" in teacher_model:
    teacher_model.drop_path_rate = 0.0
  return (MultiCropNetwork(models.encoder_from_config(config.model), head),
          MultiCropNetwork(models.encoder_from_config(teacher_model), head))


def cancel_last_layer_gradient(params, frozen):
  """``params`` whose last head layer passes no gradient while ``frozen`` (a traced bool)."""
  gate = lambda p: jnp.where(frozen, jax.lax.stop_gradient(p), p)
  head = {**params["head"], dino_head.LAST_LAYER: jax.tree.map(gate, params["head"][dino_head.LAST_LAYER])}
  return {**params, "head": head}


def collapse_flag(out: losses.DinoLoss, num_prototypes: int) -> jax.Array:
  """1.0 when the teacher is (near) uniform or one-hot and the student matches it (module docstring), else 0."""
  margin = COLLAPSE_ENTROPY_MARGIN * np.log(num_prototypes)
  extreme = (out.teacher_entropy > np.log(num_prototypes) - margin) | (out.teacher_entropy < margin)
  return (extreme & (out.kl < COLLAPSE_KL)).astype(jnp.float32)


def attention_overlays(images, maps, mean, std) -> collections.OrderedDict:
  """`sslx.viz.attention_rows` in jax (the loop jits `Method.visualize`), back in the normalised input space.

  ``images`` ``(B, H, W, C)`` normalised with ``mean`` / ``std``; ``maps`` ``(B, N, gh, gw)``. Row ``image i``:
  the image in RGB, then each head's map stretched to [0, 1], enlarged to the image and blended over it.
  """
  mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
  pictures = jnp.clip(images.astype(jnp.float32) * std + mean, 0.0, 1.0)
  low, high = maps.min(axis=(2, 3), keepdims=True), maps.max(axis=(2, 3), keepdims=True)
  maps = (maps - low) / jnp.maximum(high - low, 1e-12)
  maps = jnp.repeat(jnp.repeat(maps, images.shape[1] // maps.shape[2], axis=2), images.shape[2] // maps.shape[3],
                    axis=3)
  heat = jnp.clip(3 * maps[..., None] - jnp.arange(3, dtype=jnp.float32), 0.0, 1.0)  # `viz.heat_colors`
  rgb = jnp.broadcast_to(pictures, (*pictures.shape[:3], 3))
  rows = jnp.concatenate([rgb[:, None], (1 - _OVERLAY_ALPHA) * rgb[:, None] + _OVERLAY_ALPHA * heat], axis=1)
  rows = (rows - mean) / std
  # An OrderedDict keeps its row order through jit (a plain dict comes back with sorted keys).
  return collections.OrderedDict((f"image {i}", rows[i]) for i in range(rows.shape[0]))


def build(config, run_length: RunLength) -> Method:
  """The DINO bundle; reads every ``config.method`` key of `default_config`."""
  student, teacher = networks(config)
  mc = config.method
  num_views, num_global = len(config.data.views), int(mc.num_global_crops)
  steps_per_epoch, total_steps = run_length.steps_per_epoch, int(run_length.total_steps)
  student_temperature, base_momentum = float(mc.student_temperature), float(mc.momentum)
  freeze_steps = float(mc.freeze_last_layer_epochs) * steps_per_epoch  # as `optim.zero_until` counts them
  temperature = functools.partial(
      losses.teacher_temperature_schedule, warmup_from=float(mc.warmup_teacher_temperature),
      final=float(mc.teacher_temperature), warmup_steps=int(round(mc.teacher_temp_warmup_epochs * steps_per_epoch)))
  if mc.embed_from == "teacher":
    select = lambda variables, method_state: subtree_variables(method_state["teacher"], "encoder")
  else:
    select = lambda variables, method_state: subtree_variables(variables, "encoder")
  embed, encoder_variables = frozen_encoder(student.encoder, select)

  def init(rng, batch):
    variables = dict(student.init({"params": rng}, (batch["image"],), train=False))
    num_prototypes = int(mc.head.out_dim)
    return variables, {"teacher": variables, "center": jnp.zeros((num_prototypes,), jnp.float32),
                       "step": jnp.zeros((), jnp.int32)}

  def loss_fn(variables, method_state, batch, rng):
    crops = [batch[f"view_{i}"] for i in range(num_views)]
    student_rng, teacher_rng = jax.random.split(rng)
    step = method_state["step"]
    params = cancel_last_layer_gradient(variables["params"], step < freeze_steps)
    student_logits, model_state = apply_train(student, {**variables, "params": params}, crops,
                                              rngs={"dropout": student_rng})
    teacher_logits, teacher_state = apply_train(teacher, method_state["teacher"], crops[:num_global],
                                                rngs={"dropout": teacher_rng})
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    tau_t = temperature(step)
    out = losses.dino_loss(student_logits, teacher_logits, method_state["center"],
                           student_temperature=student_temperature, teacher_temperature=tau_t)
    metrics = {"loss": out.loss, "teacher_entropy": out.teacher_entropy, "kl": out.kl,
               "teacher_temperature": tau_t, "collapse": collapse_flag(out, teacher_logits.shape[-1])}
    new_state = {**method_state, "teacher": {**method_state["teacher"], **jax.lax.stop_gradient(teacher_state)},
                 "center": losses.dino_center_update(method_state["center"], teacher_logits, CENTER_MOMENTUM)}
    return out.loss, (metrics, new_state, model_state)

  def after_update(variables, method_state, step):
    # The first update copies the student: `config.init_from` replaces it after `init` made the copy.
    momentum = jnp.where(step == 0, 0.0, schedules.cosine_momentum(step, total_steps, base_momentum))
    teacher = method_state["teacher"]
    params = optax.incremental_update(variables["params"], teacher["params"], 1.0 - momentum)
    return {**method_state, "teacher": {**teacher, "params": params}, "step": step + 1}

  def visualize(variables, method_state, batch, rng):
    del variables, rng
    images = jnp.asarray(batch["image"], jnp.float32)
    maps = attention_weights.cls_attention_maps(
        teacher.encoder, subtree_variables(method_state["teacher"], "encoder"), images)
    return attention_overlays(images, maps, config.data.mean, config.data.std)

  is_vit = config.model.get("name", "vit") == "vit"  # attention maps need one
  return Method(name="dino", num_views=num_views, init=init, loss_fn=loss_fn, embed=embed,
                encoder_variables=encoder_variables, after_update=after_update,
                visualize=visualize if is_vit else None)
