"""Colorization (Zhang, Isola & Efros, 2016): predict a grey image's colour as a distribution over ab bins.

Inputs, on the device inside ``loss_fn``: ``batch['image']`` is mapped back to RGB in ``[0, 1]`` with
``config.data.mean/std``, then to CIE Lab (`sslx.pretext.lab`). The encoder sees the lightness alone,
``(L - 50) / 50`` in ``[-1, 1]`` (one channel; the reference centres L but does not scale it).

Prediction: a linear layer maps the encoder's spatial features to ``Q`` logits per location (``Q`` the
in-gamut ab bins of `sslx.pretext.ab_bins`), at the encoder's own resolution: a ViT's patch tokens (one
location per patch) or a ResNet's last feature map ``aux['feature_map']`` (stride 32, or 8 with the
small-image stem).

Targets: the image's ab averaged over each location's pixels (an exact box mean where the resolution divides
the image, else an antialiased resize), then soft-encoded on its ``neighbours`` nearest bins (`soft_encode`).

Loss ``loss='classification'``: the rebalanced multinomial cross-entropy `rebalanced_cross_entropy`, with
class weights from ``ab_prior`` (a ``.npy`` that ``python -m sslx.pretext.ab_bins`` writes; None: uniform,
every weight 1, plain cross-entropy). ``'l2'`` / ``'smooth_l1'`` regress ab directly (`ab_regression_loss`).

Grey images (every pixel with ``|a| <= grey_threshold`` and ``|b| <= grey_threshold``, 5 as the reference's
``NonGrayMaskLayer``: a colourless JPEG decodes to ``|ab|`` below 1) carry no colour to predict and get
weight 0.

Pictures (`visualize`): the grey input, the prediction (annealed mean at ``temperature``, upsampled to the
image and joined to its own L) and the original. `Method.embed`: the encoder's pooled features of the image's
L channel, in evaluation mode.
"""
from __future__ import annotations

import collections
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from ml_collections.config_dict import placeholder

from sslx import config as config_lib
from sslx import models
from sslx.methods import Method, RunLength, apply_train, subtree_variables
from sslx.models import heads
from sslx.pretext import ab_bins
from sslx.pretext.lab import lab_to_rgb, rgb_to_lab

LOSSES = ("classification", "l2", "smooth_l1")
# Regression targets are ab in units of the bin grid (10), so smooth-L1's quadratic zone is one bin wide.
AB_REGRESSION_SCALE = ab_bins.GRID


def default_config() -> ml_collections.ConfigDict:
  """``config.method`` of colorization: the reference's soft encoding (10 neighbours, sigma 5), lambda 0.5,
  grey threshold 5, annealed-mean temperature 0.38; a uniform prior until ``ab_prior`` names one."""
  return ml_collections.ConfigDict(dict(
      name="colorization", loss="classification", ab_prior=placeholder(str), prior_mix=ab_bins.UNIFORM_MIX,
      neighbours=ab_bins.NEIGHBOURS, sigma=ab_bins.SOFT_SIGMA, grey_threshold=5.0,
      temperature=ab_bins.ANNEALED_T))


def validate_colour_keys(config, method: str) -> None:
  """Checks the keys colorization and split-brain share, that the data are RGB, and that BatchNorm groups
  split the batch (each encoder, split-brain's two halves included, reads it in one pass)."""
  mc = config.method
  if config.data.channels != 3:
    raise ValueError(f"config.data.channels={config.data.channels}: {method} needs RGB images (3 channels) "
                     "to take their Lab colour apart")
  if mc.ab_prior is not None:
    if not (isinstance(mc.ab_prior, str) and os.path.isfile(mc.ab_prior)):
      raise ValueError(f"config.method.ab_prior={mc.ab_prior!r} is not a file (None: a uniform prior)")
    try:
      ab_bins.rebalancing_weights(ab_bins.load_prior(mc.ab_prior), mix=mc.prior_mix)
    except ValueError as error:
      raise ValueError(f"config.method.ab_prior={mc.ab_prior!r}: {error}") from None
  config_lib.check_number(mc.prior_mix, "method.prior_mix", lambda v: 0 < v <= 1, "in (0, 1]")
  config_lib.check_int(mc.neighbours, "method.neighbours")
  if mc.neighbours > ab_bins.num_bins():
    raise ValueError(f"config.method.neighbours={mc.neighbours} exceeds the {ab_bins.num_bins()} ab bins")
  config_lib.check_number(mc.sigma, "method.sigma", lambda v: v > 0, "> 0")
  config_lib.check_number(mc.grey_threshold, "method.grey_threshold", lambda v: v >= 0, ">= 0")
  config_lib.check_number(mc.temperature, "method.temperature", lambda v: v > 0, "> 0")
  heads.check_bn_groups(config, config.batch_size, f"config.batch_size={config.batch_size}")


def validate_config(config) -> None:
  """Raises a ValueError naming the first bad ``config.method`` key (or data key colorization needs)."""
  config_lib.check_section_keys(config.method, default_config(), "method", "colorization")
  if config.method.loss not in LOSSES:
    raise ValueError(f"config.method.loss={config.method.loss!r} is not one of {LOSSES}")
  validate_colour_keys(config, "colorization")


def to_lab(images, mean, std):
  """Normalised ``(B, H, W, 3)`` images -> Lab, float32, from RGB clipped to [0, 1]."""
  rgb = jnp.clip(images.astype(jnp.float32) * jnp.asarray(std, jnp.float32) + jnp.asarray(mean, jnp.float32),
                 0.0, 1.0)
  return rgb_to_lab(rgb)


def lightness_input(lab):
  """The encoder's input of the lightness: ``(L - 50) / 50``, ``(B, H, W, 1)``."""
  return (lab[..., :1] - 50.0) / 50.0


def from_normalised(rgb, mean, std):
  return (rgb - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def colour_mask(ab, threshold: float):
  """``(B,)`` float32: 1 for an image with some pixel of ``|a| > threshold`` or ``|b| > threshold``,
  else 0."""
  return jnp.any(jnp.abs(ab) > threshold, axis=(1, 2, 3)).astype(jnp.float32)


def pool_to(values, height: int, width: int):
  """``(B, H, W, C)`` -> ``(B, height, width, C)``: the mean over each cell when the sizes divide, else an
  antialiased linear resize."""
  b, h, w, c = values.shape
  if h % height == 0 and w % width == 0:
    return values.reshape(b, height, h // height, width, w // width, c).mean(axis=(2, 4))
  return jax.image.resize(values, (b, height, width, c), "linear", antialias=True)


def spatial_features(aux, image_shape):
  """The encoder's last spatial features ``(B, h, w, D)``: ``aux['feature_map']`` (ResNet) or the patch tokens
  on their grid (ViT; the grid keeps the image's aspect ratio)."""
  if "feature_map" in aux:
    return aux["feature_map"]
  if "patch_tokens" not in aux:
    raise ValueError(f"the encoder gives neither a feature map nor patch tokens (aux holds {sorted(aux)})")
  tokens = aux["patch_tokens"]
  count = tokens.shape[1]
  rows = int(round(np.sqrt(count * image_shape[0] / image_shape[1])))
  return tokens.reshape(tokens.shape[0], rows, count // rows, tokens.shape[-1])


def rebalanced_cross_entropy(logits, targets, pixel_weights, example_mask):
  """The rebalanced multinomial cross-entropy of Zhang et al. (2016, Eq. 2), over colour images only:

    ``loss = sum_{b,h,w} m_b v_bhw (-sum_q Z_bhwq log softmax(z_bhw)_q) / max(sum_b m_b * h * w, 1)``,

  ``z`` the ``(B, h, w, Q)`` logits, ``Z`` the soft-encoded targets, ``v`` ``(B, h, w)`` the class weight of
  each location's nearest bin, ``m`` ``(B,)`` 1 for colour images and 0 for grey ones. Float32.
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  per_location = -jnp.sum(targets * log_probs, axis=-1) * pixel_weights
  mask = example_mask[:, None, None]
  return jnp.sum(per_location * mask) / jnp.maximum(jnp.sum(mask * jnp.ones_like(per_location)), 1.0)


def ab_regression_loss(pred, target, example_mask, kind: str):
  """Regression of ab (both in units of `AB_REGRESSION_SCALE`) over colour images only:

    ``loss = sum_{b,h,w,c} m_b rho(pred_bhwc - target_bhwc) / max(2 sum_b m_b h w, 1)``,

  ``rho(x) = x^2`` (``'l2'``) or smooth-L1 ``x^2 / 2`` for ``|x| < 1``, ``|x| - 1/2`` beyond
  (``'smooth_l1'``).
  """
  diff = pred.astype(jnp.float32) - target
  smooth_l1 = jnp.where(jnp.abs(diff) < 1.0, 0.5 * diff ** 2, jnp.abs(diff) - 0.5)
  per_value = diff ** 2 if kind == "l2" else smooth_l1
  mask = example_mask[:, None, None, None] * jnp.ones_like(per_value)
  return jnp.sum(per_value * mask) / jnp.maximum(jnp.sum(mask), 1.0)


class ColourPredictor(nn.Module):
  """An encoder and a per-location linear head (float32) on its spatial features."""
  encoder: nn.Module
  outputs: int

  @nn.compact
  def __call__(self, inputs, *, train: bool):
    _, aux = self.encoder(inputs, train=train)
    features = spatial_features(aux, inputs.shape[1:3]).astype(jnp.float32)
    return nn.Dense(self.outputs, name="head")(features)


class ColourTargets:
  """Soft-encoded ab targets, class weights and colour masks of one method config."""

  def __init__(self, method_config):
    self.neighbours, self.sigma = int(method_config.neighbours), float(method_config.sigma)
    self.grey_threshold = float(method_config.grey_threshold)
    prior = ab_bins.load_prior(method_config.ab_prior)
    self.class_weights = ab_bins.rebalancing_weights(prior, mix=float(method_config.prior_mix))

  def __call__(self, ab, height: int, width: int):
    """``(targets (B, h, w, Q), pixel_weights (B, h, w), colour mask (B,))`` of full-resolution ab."""
    targets = ab_bins.soft_encode(pool_to(ab, height, width), k=self.neighbours, sigma=self.sigma)
    pixel_weights = jnp.asarray(self.class_weights)[jnp.argmax(targets, axis=-1)]
    return targets, pixel_weights, colour_mask(ab, self.grey_threshold)


def build(config, run_length: RunLength) -> Method:
  """The colorization bundle (no method state; the run length is not used)."""
  del run_length
  mc, mean, std = config.method, tuple(config.data.mean), tuple(config.data.std)
  classify = mc.loss == "classification"
  model = ColourPredictor(models.encoder_from_config(config.model), ab_bins.num_bins() if classify else 2)
  colour_targets = ColourTargets(mc)

  def encoder_variables(variables, method_state):
    del method_state
    return subtree_variables(variables, "encoder")

  def init(rng, batch):
    inputs = lightness_input(to_lab(batch["image"], mean, std))
    return dict(model.init({"params": rng, "dropout": rng}, inputs, train=False)), {}

  def loss_fn(variables, method_state, batch, rng):
    lab = to_lab(batch["image"], mean, std)
    out, model_state = apply_train(model, variables, lightness_input(lab), rngs={"dropout": rng})
    targets, pixel_weights, is_colour = colour_targets(lab[..., 1:], out.shape[1], out.shape[2])
    if classify:
      loss = rebalanced_cross_entropy(out, targets, pixel_weights, is_colour)
    else:
      target_ab = pool_to(lab[..., 1:], out.shape[1], out.shape[2]) / AB_REGRESSION_SCALE
      loss = ab_regression_loss(out, target_ab, is_colour, mc.loss)
    return loss, ({"loss": loss, "colour_fraction": jnp.mean(is_colour)}, method_state, model_state)

  def embed(variables, method_state, images):
    inputs = lightness_input(to_lab(images, mean, std))
    _, aux = model.encoder.apply(encoder_variables(variables, method_state), inputs, train=False)
    return jax.lax.stop_gradient(aux["pooled"]).astype(jnp.float32)

  def visualize(variables, method_state, batch, rng):
    del method_state, rng
    images = jnp.asarray(batch["image"], jnp.float32)
    lab = to_lab(images, mean, std)
    out = model.apply(variables, lightness_input(lab), train=False)
    ab = ab_bins.annealed_mean(out, mc.temperature) if classify else out * AB_REGRESSION_SCALE
    return colour_rows(lab, ab, mean, std)

  return Method(name="colorization", num_views=1, init=init, loss_fn=loss_fn, embed=embed,
                encoder_variables=encoder_variables, visualize=visualize)


def colour_rows(lab, predicted_ab, mean, std):
  """The picture rows ``grey``, ``prediction`` (``predicted_ab`` (B, h, w, 2) upsampled bilinearly onto the
  image's own L) and ``truth``, in the normalised input space."""
  b, h, w, _ = lab.shape
  ab = jax.image.resize(predicted_ab.astype(jnp.float32), (b, h, w, 2), "linear")
  rows = {"grey": jnp.concatenate([lab[..., :1], jnp.zeros_like(ab)], axis=-1),
          "prediction": jnp.concatenate([lab[..., :1], ab], axis=-1), "truth": lab}
  return collections.OrderedDict((name, from_normalised(lab_to_rgb(value), mean, std))
                                 for name, value in rows.items())
