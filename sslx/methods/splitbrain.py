"""Split-brain autoencoder (Zhang, Isola & Efros, 2017): two disjoint half-width networks, each predicting one
part of the Lab channels from the other.

The halves: two copies of the registry encoder ``config.model`` with half its width (ViT: width, heads and MLP
halved, depth and patch kept; ResNet: ``width`` halved), each with its own per-location linear head
(`sslx.methods.colorization.ColourPredictor`). They share no parameter: the L half lives under ``encoder`` /
``head``, the ab half under ``ab_encoder`` / ``ab_head``.

- L -> ab: input ``(L - 50) / 50``; target the ab of each location soft-encoded on the in-gamut ab bins, loss
  the rebalanced cross-entropy of colorization (`colorization.rebalanced_cross_entropy`; same keys).
- ab -> L: input ``ab / 110`` (2 channels); target the location's mean L in one of ``l_bins`` equal bins of
  ``[0, 100]`` (50 by default, what we recall of the paper's L quantisation; not checked against its text
  here), loss the softmax cross-entropy against that one bin.

``loss = CE_ab + CE_L``, each averaged over the locations of colour images (grey images carry no ab to
predict or to predict from, so both terms skip them). `Method.embed` concatenates both halves' pooled features
(evaluation mode): the L half on the image's L, the ab half on its ab. `Method.encoder_variables` is the L
half (what ``config.init_from`` copies as ``'encoder'``). Pictures: grey input, ab predicted from L (annealed
mean), the truth, and the truth's ab on the L predicted from it (the L bins' expected value).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sslx import config as config_lib
from sslx import models
from sslx.methods import Method, RunLength, apply_train, subtree_variables
from sslx.methods import colorization as colour
from sslx.models import vit
from sslx.pretext import ab_bins
from sslx.pretext.lab import lab_to_rgb

AB_INPUT_SCALE = 110.0


def default_config() -> ml_collections.ConfigDict:
  """``config.method`` of the split-brain autoencoder: colorization's ab keys (no regression) and 50
  L bins."""
  config = colour.default_config()
  del config["loss"]
  config.update(dict(name="splitbrain", l_bins=50))
  return config


def half_model_config(model_config) -> ml_collections.ConfigDict:
  """``config.model`` at half width: a ViT's width, heads and MLP, a ResNet's ``width``."""
  half = ml_collections.ConfigDict(model_config.to_dict())
  if half.name == "vit":
    dims = vit.parse_variant(half.variant)
    for key in ("width", "num_heads", "mlp_dim"):
      full = half.get(key) if half.get(key) is not None else dims[key]
      if full % 2:
        raise ValueError(f"config.model.{key}={full} is odd: the split-brain halves need half of it each")
      half[key] = full // 2
    if half.width % half.num_heads:
      raise ValueError(f"config.model.width={2 * half.width} and num_heads={2 * half.num_heads}: the halves' "
                       "width must split evenly into their heads")
  else:
    full = int(half.get("width", 64))
    if full % 2:
      raise ValueError(f"config.model.width={full} is odd: the split-brain halves need half of it each")
    half.width = full // 2
  return half


def validate_config(config) -> None:
  """Raises a ValueError naming the first bad ``config.method`` key (or model / data key split-brain
  needs)."""
  config_lib.check_section_keys(config.method, default_config(), "method", "split-brain")
  config_lib.check_int(config.method.l_bins, "method.l_bins", 2)
  colour.validate_colour_keys(config, "split-brain")
  half = half_model_config(config.model)
  # The full width passed the encoder's checks; its half must pass them too (a sin-cos ViT needs a width
  # divisible by 4, so a full width of 4 has a half of 2 that does not build).
  try:
    models.validate_config(half, config.data.image_size)
  except ValueError as error:
    raise ValueError(f"config.model: each split-brain half is this encoder at half width, and that half is "
                     f"not a valid encoder: {error}") from None


def l_bin_labels(lightness, num_bins: int):
  """``(...)`` int32 bin of L in ``[0, 100]`` cut into ``num_bins`` equal bins (L = 100 in the last)."""
  return jnp.clip(jnp.floor(lightness * num_bins / 100.0), 0, num_bins - 1).astype(jnp.int32)


def l_cross_entropy(logits, labels, example_mask):
  """Softmax cross-entropy of L bins over colour images:

    ``loss = sum_{b,h,w} m_b (-log softmax(z_bhw)[y_bhw]) / max(sum_b m_b h w, 1)``.
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  per_location = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
  mask = example_mask[:, None, None] * jnp.ones_like(per_location)
  return jnp.sum(per_location * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def build(config, run_length: RunLength) -> Method:
  """The split-brain bundle (no method state; the run length is not used)."""
  del run_length
  mc, mean, std = config.method, tuple(config.data.mean), tuple(config.data.std)
  half = half_model_config(config.model)
  l_to_ab = colour.ColourPredictor(models.encoder_from_config(half), ab_bins.num_bins())
  ab_to_l = colour.ColourPredictor(models.encoder_from_config(half), int(mc.l_bins))
  colour_targets = colour.ColourTargets(mc)
  l_centres = (np.arange(mc.l_bins, dtype=np.float32) + 0.5) * 100.0 / mc.l_bins

  def half_variables(variables, prefix):
    """``{collection: {'encoder': ..., 'head': ...}}`` of the half stored under ``prefix``."""
    return {name: {part: tree[f"{prefix}{part}"] for part in ("encoder", "head") if f"{prefix}{part}" in tree}
            for name, tree in variables.items()}

  def join(l_half, ab_half):
    out = {}
    for name in set(l_half) | set(ab_half):
      ab_parts = {f"ab_{part}": tree for part, tree in ab_half.get(name, {}).items()}
      out[name] = {**l_half.get(name, {}), **ab_parts}
    return out

  def inputs(images):
    lab = colour.to_lab(images, mean, std)
    return lab, colour.lightness_input(lab), lab[..., 1:] / AB_INPUT_SCALE

  def init(rng, batch):
    _, l_input, ab_input = inputs(batch["image"])
    l_rng, ab_rng = jax.random.split(rng)
    l_half = l_to_ab.init({"params": l_rng, "dropout": l_rng}, l_input, train=False)
    ab_half = ab_to_l.init({"params": ab_rng, "dropout": ab_rng}, ab_input, train=False)
    return join(dict(l_half), dict(ab_half)), {}

  def loss_fn(variables, method_state, batch, rng):
    lab, l_input, ab_input = inputs(batch["image"])
    l_rng, ab_rng = jax.random.split(rng)
    ab_logits, l_state = apply_train(l_to_ab, half_variables(variables, ""), l_input, rngs={"dropout": l_rng})
    l_logits, ab_state = apply_train(ab_to_l, half_variables(variables, "ab_"), ab_input,
                                     rngs={"dropout": ab_rng})
    targets, pixel_weights, is_colour = colour_targets(lab[..., 1:], ab_logits.shape[1], ab_logits.shape[2])
    ab_loss = colour.rebalanced_cross_entropy(ab_logits, targets, pixel_weights, is_colour)
    mean_l = colour.pool_to(lab[..., :1], l_logits.shape[1], l_logits.shape[2])[..., 0]
    l_loss = l_cross_entropy(l_logits, l_bin_labels(mean_l, int(mc.l_bins)), is_colour)
    loss = ab_loss + l_loss
    metrics = {"loss": loss, "ab_loss": ab_loss, "l_loss": l_loss, "colour_fraction": jnp.mean(is_colour)}
    return loss, (metrics, method_state, join(l_state, ab_state))

  def encoder_variables(variables, method_state):
    del method_state
    return subtree_variables(variables, "encoder")

  def embed(variables, method_state, images):
    del method_state
    _, l_input, ab_input = inputs(images)
    _, l_aux = l_to_ab.encoder.apply(subtree_variables(variables, "encoder"), l_input, train=False)
    _, ab_aux = ab_to_l.encoder.apply(subtree_variables(variables, "ab_encoder"), ab_input, train=False)
    features = jnp.concatenate([l_aux["pooled"], ab_aux["pooled"]], axis=-1)
    return jax.lax.stop_gradient(features).astype(jnp.float32)

  def visualize(variables, method_state, batch, rng):
    del method_state, rng
    lab, l_input, ab_input = inputs(jnp.asarray(batch["image"], jnp.float32))
    ab_logits = l_to_ab.apply(half_variables(variables, ""), l_input, train=False)
    l_logits = ab_to_l.apply(half_variables(variables, "ab_"), ab_input, train=False)
    rows = colour.colour_rows(lab, ab_bins.annealed_mean(ab_logits, mc.temperature), mean, std)
    b, h, w, _ = lab.shape
    expected_l = jax.nn.softmax(l_logits.astype(jnp.float32), axis=-1) @ jnp.asarray(l_centres)
    lightness = jax.image.resize(expected_l[..., None], (b, h, w, 1), "linear")
    rows["l_from_ab"] = colour.from_normalised(
        lab_to_rgb(jnp.concatenate([lightness, lab[..., 1:]], axis=-1)), mean, std)
    return rows

  return Method(name="splitbrain", num_views=1, init=init, loss_fn=loss_fn, embed=embed,
                encoder_variables=encoder_variables, visualize=visualize)
