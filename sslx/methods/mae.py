"""Masked autoencoder (He et al., 2022): reconstruct the pixels of masked patches.

The encoder sees only the visible patches (plus a class token); a lightweight decoder fills the masked
positions with a shared mask token and predicts every patch; the loss counts masked patches only.

Masking (`sslx.mask_policy`, ``config.method.mask_strategy``): ``random`` by default, the reference's argsort
of uniform noise (`masking.random_masking`, keeping ``int(L (1 - mask_ratio))`` patches), drawn inside the
model; ``simmim``, ``block``, ``grid`` and ``importance`` draw a boolean mask with a static count, whose
visible patches the encoder keeps (`mask_policy.token_dropping`). Dropping tokens makes the visible count an
array shape, so a progressive ratio (``mask_ratio_end``) is refused. ``importance`` ranks the patches by the
encoder's own class-token attention over the whole image: one more encoder pass per step.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from sslx import config as config_lib
from sslx import losses
from sslx import mask_policy
from sslx import masking
from sslx.methods import Method, RunLength, online_encoder
from sslx.models import attention as attention_lib
from sslx.models import decoders
from sslx.models import vit
from sslx.models.patches import patchify
from sslx.models.patches import reconstruction_rows


class MaskedAutoencoder(nn.Module):
  """Encoder + decoder around token dropping. Params: ``{'encoder': ..., 'decoder': ...}``."""
  encoder: vit.VisionTransformer
  decoder: decoders.MAEDecoder
  mask_ratio: float = 0.75

  @nn.compact
  def __call__(self, images, *, train: bool, noise: Optional[jax.Array] = None, keep=None):
    """Masks, encodes and reconstructs.

    Args:
      images: ``(B, H, W, C)``.
      train: training mode (drop path in the encoder; needs the ``'dropout'`` rng).
      noise: optional ``(B, L)`` random-masking noise; drawn from the ``'masking'`` rng when ``None``.
      keep: optional ``(ids_keep, mask, ids_restore)`` of another mask (`sslx.mask_policy.token_dropping`),
        used instead of random masking.

    Returns:
      dict with ``pred`` ``(B, L, p*p*C)``, ``mask`` ``(B, L)`` (1 = masked), ``ids_restore`` and
      ``ids_keep`` (see :func:`sslx.masking.random_masking`).
    """
    batch, height, width, _ = images.shape
    p = self.encoder.patch_size
    grid = (height // p, width // p)
    if keep is None:
      if noise is None:
        noise = masking.uniform_noise(self.make_rng("masking"), batch, grid[0] * grid[1])
      keep = masking.random_masking(noise, self.mask_ratio)
    ids_keep, mask, ids_restore = keep
    _, aux = self.encoder(images, train=train, ids_keep=ids_keep)
    tokens = jnp.concatenate([aux["cls_token"][:, None], aux["patch_tokens"]], axis=1)
    pred = self.decoder(tokens, ids_restore, train=train, grid_hw=grid)
    return dict(pred=pred, mask=mask, ids_restore=ids_restore, ids_keep=ids_keep)


def default_config() -> ml_collections.ConfigDict:
  """``config.method`` of MAE: the paper's random masking of 75%, target and decoder (512 wide, 8 deep);
  the other masking keys (`sslx.mask_policy`) with their defaults."""
  return ml_collections.ConfigDict(dict(
      name="mae", **mask_policy.config_keys("random", mask_ratio=0.75), norm_pix_loss=True,
      decoder=dict(width=512, depth=8, num_heads=16, mlp_dim=2048)))


def validate_config(config) -> None:
  """Raises a ValueError naming the first bad ``config.method`` key (or one MAE cannot work with)."""
  if config.model.get("name", "vit") != "vit":
    raise ValueError(f"config.method.name='mae' needs a token encoder: config.model.name="
                     f"{config.model.name!r} is not 'vit'")
  mask_policy_of(config)
  config_lib.check_bool(config.method.norm_pix_loss, "method.norm_pix_loss")
  decoder = config.method.decoder
  for key in ("width", "depth", "num_heads", "mlp_dim"):
    config_lib.check_int(decoder[key], f"method.decoder.{key}")
  if decoder.width % decoder.num_heads:
    raise ValueError(f"config.method.decoder.width={decoder.width} is not divisible by "
                     f"config.method.decoder.num_heads={decoder.num_heads}")
  if decoder.width % 4:
    raise ValueError(f"config.method.decoder.width={decoder.width} must be divisible by 4 for the decoder's "
                     "sin-cos position embeddings")
  if config.model.get("attention", "auto") == "cudnn":
    try:
      attention_lib.resolve("cudnn", vit.resolve_dtype(config.model.get("dtype", "auto")),
                            decoder.width // decoder.num_heads)
    except ValueError as error:
      raise ValueError(f"{error} (in the MAE decoder, config.method.decoder)") from None
  layer_decay = config.get("optimizer", {}).get("layer_decay")
  if layer_decay is not None:
    raise ValueError(f"config.optimizer.layer_decay={layer_decay} is for fine-tuning one ViT; MAE's tree "
                     "also holds the decoder's blocks: set it to None")


def mask_policy_of(config) -> mask_policy.MaskPolicy:
  """The run's masking, checked; keys a config lacks (one written before the selector) take MAE's defaults."""
  return mask_policy.from_config(config, default_config(), drops_tokens=True)


def model_from_config(config) -> MaskedAutoencoder:
  """Builds the module from ``config.model``, ``config.method`` and ``config.data``.

  Decoder dimensions come from ``config.method.decoder.{width,depth,num_heads,mlp_dim}``. The decoder's
  blocks compile as the encoder's (``config.model.scan_blocks``, ``remat``, ``attention``): one switch per
  run, so a checkpoint has one layout and the decoder's 8 blocks are not left unrolled beside a scanned encoder.
  """
  encoder = vit.from_config(config.model)
  dec = config.method.decoder
  attention = attention_lib.resolve(config.model.get("attention", "auto"), encoder.dtype,
                                    int(dec.width) // int(dec.num_heads))
  decoder = decoders.MAEDecoder(
      patch_dim=encoder.patch_size ** 2 * int(config.data.channels),
      width=int(dec.width), depth=int(dec.depth), num_heads=int(dec.num_heads), mlp_dim=int(dec.mlp_dim),
      layer_norm_eps=encoder.layer_norm_eps, dtype=encoder.dtype, param_dtype=encoder.param_dtype,
      scan_blocks=encoder.scan_blocks, remat=encoder.remat, attention=attention)
  return MaskedAutoencoder(encoder, decoder, float(config.method.mask_ratio))


def build(config, run_length: RunLength) -> Method:
  """The MAE method bundle; ``config.method.norm_pix_loss`` picks the target, `mask_policy_of` the masking."""
  del run_length  # MAE follows no schedule of its own (it refuses a progressive mask ratio)
  model = model_from_config(config)
  patch_size = model.encoder.patch_size
  norm_pix = bool(config.method.norm_pix_loss)
  policy = mask_policy_of(config)
  embed, encoder_variables = online_encoder(model.encoder)
  masks = mask_policy.method_masks(policy, model.encoder, encoder_variables)

  def apply(variables, method_state, images, masking_rng, rngs, *, train):
    """The model on ``images`` masked by the policy from ``masking_rng``; ``rngs``: the other rngs."""
    if policy.strategy == "random":
      # The reference's argsort of noise, drawn inside the model: Hugging Face's masks, bit for bit.
      return model.apply(variables, images, train=train, rngs={"masking": masking_rng, **rngs})
    keep = mask_policy.token_dropping(masks(masking_rng, variables, method_state, images), policy.num_masked)
    return model.apply(variables, images, train=train, keep=keep, rngs=rngs)

  def init(rng, batch):
    params_rng, masking_rng = jax.random.split(rng)
    images = batch["image"]
    keep = None
    if policy.strategy != "random":
      # Parameters depend on shapes only, and random masking need not accept a mask_ratio grid never reads.
      keep = mask_policy.token_dropping(mask_policy.placeholder_mask(policy, images.shape[0]), policy.num_masked)
    variables = model.init({"params": params_rng, "masking": masking_rng}, images, train=False, keep=keep)
    return dict(variables), {}

  def loss_fn(variables, method_state, batch, rng):
    masking_rng, dropout_rng = jax.random.split(rng)
    images = batch["image"]
    out = apply(variables, method_state, images, masking_rng, {"dropout": dropout_rng}, train=True)
    loss = losses.masked_reconstruction_loss(out["pred"], patchify(images, patch_size), out["mask"],
                                             norm_pix=norm_pix)
    return loss, ({"loss": loss}, method_state, {})

  def visualize(variables, method_state, batch, rng):
    images = jnp.asarray(batch["image"], jnp.float32)
    out = apply(variables, method_state, images, rng, {}, train=False)
    target = patchify(images, patch_size)
    pred = out["pred"].astype(jnp.float32)
    if norm_pix:
      # Predictions live in each patch's standardised space; map them back with the true statistics.
      _, mean, std = losses.normalize_patches(target)
      pred = pred * std + mean
    return reconstruction_rows(images, pred, out["mask"], patch_size)

  return Method(name="mae", num_views=1, init=init, loss_fn=loss_fn, embed=embed,
                encoder_variables=encoder_variables, visualize=visualize)
