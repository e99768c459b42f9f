"""Relative position / context prediction (Doersch, Gupta & Efros, 2015): which of its 8 neighbours is this?

From each image `sslx.pretext.context` cuts a centre patch and one of the 8 neighbours of a 3 x 3 layout
(``config.method.patch_size``, ``gap``, ``jitter``; the label order is in that module). Both patches of the
batch go through the registry encoder as one call of ``2B`` inputs (so a BatchNorm encoder normalises over
every patch of the step); the pooled features of centre and neighbour are concatenated, in that order, and an
MLP (``head_hidden_dims``, ReLU after each hidden layer) gives 8 logits. The loss is the softmax cross-entropy
against the neighbour's position,

  ``loss = -(1/B) sum_b log softmax(MLP([f(centre_b), f(neighbour_b)]))_{label_b}``.

Guards against shortcuts: the gap and the jitter (edge continuity); for RGB data ``colour``: ``'drop'`` (keep
one channel per patch, the others noise; what the reference code does) or ``'project'`` (remove the
green-magenta component), against chromatic aberration; ``normalize_patches`` standardises each patch as the
reference code does. Not implemented: the reference's random down- and up-sampling of a third of the patches.
The random choices (layout, label, jitter, colour) all come from ``loss_fn``'s key.

`Method.embed` is the encoder on the whole, unmasked image (evaluation mode, ``aux['pooled']``): the task
only ever shows the encoder patches, but what it trains is an encoder of images, and every downstream
consumer (probe, kNN, fine-tuning) reads whole images, as Doersch applies the trained network to whole images
and detection windows.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn

from sslx import config as config_lib
from sslx import models
from sslx.methods import Method, RunLength, apply_train, online_encoder
from sslx.models import heads
from sslx.models import vit
from sslx.pretext import context

COLOURS = ("none", "drop", "project")


class PairHead(nn.Module):
  """Dense layers of ``hidden_dims`` with ReLU, then 8 logits (float32)."""
  hidden_dims: tuple[int, ...]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i, width in enumerate(self.hidden_dims):
      x = nn.relu(vit.dense(width, heads.KERNEL_AXES, self.dtype, jnp.float32, f"hidden_{i}")(x))
    logits = vit.dense(context.NUM_POSITIONS, ("mlp", None), self.dtype, jnp.float32, "logits")(x)
    return logits.astype(jnp.float32)


class RelativePosition(nn.Module):
  """The encoder on both patches, then `PairHead` on the pair. Params: ``{'encoder': ..., 'head': ...}``."""
  encoder: nn.Module
  head: PairHead

  @nn.compact
  def __call__(self, centre, neighbour, *, train: bool):
    """``(B, 8)`` logits of the neighbour's position for ``(B, P, P, C)`` patch pairs."""
    batch = centre.shape[0]
    _, aux = self.encoder(jnp.concatenate([centre, neighbour]), train=train)
    pooled = aux["pooled"]
    return self.head(jnp.concatenate([pooled[:batch], pooled[batch:]], axis=-1))


def default_config() -> ml_collections.ConfigDict:
  """``config.method`` of relative position: Doersch's 96 px patches, gap 48, jitter 7, and the reference's
  pair layers (4096, 4096); no colour handling or patch normalisation (both for RGB data, see the module)."""
  return ml_collections.ConfigDict(dict(name="relpos", patch_size=96, gap=48, jitter=7, colour="none",
                                        normalize_patches=False, head_hidden_dims=(4096, 4096)))


def validate_config(config) -> None:
  """Raises a ValueError naming the first bad ``config.method`` key, e.g. a layout that does not fit."""
  method = config.method
  config_lib.check_section_keys(method, default_config(), "method", "relative position")
  config_lib.check_int(method.patch_size, "method.patch_size")
  config_lib.check_int(method.gap, "method.gap", 0)
  config_lib.check_int(method.jitter, "method.jitter", 0)
  if method.jitter > method.gap // 2:
    raise ValueError(f"config.method.jitter={method.jitter} must be at most half config.method.gap="
                     f"{method.gap}, so that jittered patches never overlap")
  extent = context.layout_extent(method.patch_size, method.gap, method.jitter)
  if extent > config.data.image_size:
    raise ValueError(f"config.method.patch_size={method.patch_size}: the 3 x 3 layout (3 x patch_size + 2 x "
                     f"gap {method.gap} + 2 x jitter {method.jitter} = {extent} px) does not fit "
                     f"config.data.image_size={config.data.image_size}")
  if config.model.get("name") == "vit":
    patch = vit.parse_variant(config.model.variant)["patch_size"]
    if method.patch_size % patch:
      raise ValueError(f"config.method.patch_size={method.patch_size} is not a multiple of the ViT's patch "
                       f"size {patch} (config.model.variant={config.model.variant!r})")
  if method.colour not in COLOURS:
    raise ValueError(f"config.method.colour={method.colour!r} is not one of {COLOURS}")
  if method.colour != "none" and config.data.channels != 3:
    raise ValueError(f"config.method.colour={method.colour!r} needs RGB images but config.data.channels="
                     f"{config.data.channels}")
  config_lib.check_bool(method.normalize_patches, "method.normalize_patches")
  dims = method.head_hidden_dims
  if not isinstance(dims, (tuple, list)) or not all(config_lib.is_int(d) and d > 0 for d in dims):
    raise ValueError(f"config.method.head_hidden_dims={dims!r} must be a tuple of positive ints (may be "
                     "empty)")
  heads.check_bn_groups(config, 2 * config.batch_size,
                        f"both patches of config.batch_size={config.batch_size}")


def model_from_config(config) -> RelativePosition:
  dtype = vit.resolve_dtype(config.model.get("dtype", "auto"))
  head = PairHead(tuple(int(d) for d in config.method.head_hidden_dims), dtype)
  return RelativePosition(models.encoder_from_config(config.model), head)


def build(config, run_length: RunLength) -> Method:
  """The relative-position bundle."""
  del run_length  # no schedule of its own
  model = model_from_config(config)
  method = config.method
  patch_size, gap, jitter = int(method.patch_size), int(method.gap), int(method.jitter)
  colour, normalize = method.colour, bool(method.normalize_patches)
  mean, std = tuple(config.data.mean), tuple(config.data.std)
  embed, encoder_variables = online_encoder(model.encoder)

  def prepare(rng, patches):
    """The shortcut guards on ``(N, P, P, C)`` patches."""
    if colour == "drop":
      patches = context.drop_colours(rng, patches)
    elif colour == "project":
      patches = context.project_green_magenta(patches, mean, std)
    return context.standardize_patches(patches) if normalize else patches

  def init(rng, batch):
    patch = jnp.zeros((1, patch_size, patch_size, batch["image"].shape[-1]), jnp.float32)
    return dict(model.init({"params": rng}, patch, patch, train=False)), {}

  def loss_fn(variables, method_state, batch, rng):
    pair_rng, colour_rng, dropout_rng = jax.random.split(rng, 3)
    images = jnp.asarray(batch["image"], jnp.float32)
    pairs = context.sample_patch_pairs(pair_rng, images, patch_size=patch_size, gap=gap, jitter=jitter)
    centre, neighbour = jnp.split(prepare(colour_rng, jnp.concatenate([pairs.centre, pairs.neighbour])), 2)
    logits, model_state = apply_train(model, variables, centre, neighbour, rngs={"dropout": dropout_rng})
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, pairs.label))
    accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == pairs.label).astype(jnp.float32))
    return loss, ({"loss": loss, "position_accuracy": accuracy}, method_state, model_state)

  return Method(name="relpos", num_views=1, init=init, loss_fn=loss_fn, embed=embed,
                encoder_variables=encoder_variables)
