"""Masked autoencoder (He et al., 2022): reconstruct the pixels of randomly masked patches.

The encoder sees only the visible patches (plus a class token); a lightweight decoder fills the masked
positions with a shared mask token and predicts every patch; the loss counts masked patches only.
"""
from __future__ import annotations

import collections
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from sslx import config as config_lib
from sslx import losses
from sslx import masking
from sslx.methods import Method, RunLength, online_encoder
from sslx.models import attention as attention_lib
from sslx.models import decoders
from sslx.models import vit
from sslx.models.patches import patchify
from sslx.models.patches import unpatchify


class MaskedAutoencoder(nn.Module):
  """Encoder + decoder around random masking. Params: ``{'encoder': ..., 'decoder': ...}``."""
  encoder: vit.VisionTransformer
  decoder: decoders.MAEDecoder
  mask_ratio: float = 0.75

  @nn.compact
  def __call__(self, images, *, train: bool, noise: Optional[jax.Array] = None):
    """Masks, encodes and reconstructs.

    Args:
      images: ``(B, H, W, C)``.
      train: training mode (drop path in the encoder; needs the ``'dropout'`` rng).
      noise: optional ``(B, L)`` masking noise; drawn from the ``'masking'`` rng when ``None``.

    Returns:
      dict with ``pred`` ``(B, L, p*p*C)``, ``mask`` ``(B, L)`` (1 = masked), ``ids_restore`` and
      ``ids_keep`` (see :func:`sslx.masking.random_masking`).
    """
    batch, height, width, _ = images.shape
    p = self.encoder.patch_size
    grid = (height // p, width // p)
    if noise is None:
      noise = masking.uniform_noise(self.make_rng("masking"), batch, grid[0] * grid[1])
    ids_keep, mask, ids_restore = masking.random_masking(noise, self.mask_ratio)
    _, aux = self.encoder(images, train=train, ids_keep=ids_keep)
    tokens = jnp.concatenate([aux["cls_token"][:, None], aux["patch_tokens"]], axis=1)
    pred = self.decoder(tokens, ids_restore, train=train, grid_hw=grid)
    return dict(pred=pred, mask=mask, ids_restore=ids_restore, ids_keep=ids_keep)


def default_config() -> ml_collections.ConfigDict:
  """``config.method`` of MAE: the paper's mask ratio, target and decoder (512 wide, 8 deep)."""
  return ml_collections.ConfigDict(dict(
      name="mae", mask_ratio=0.75, norm_pix_loss=True,
      decoder=dict(width=512, depth=8, num_heads=16, mlp_dim=2048)))


def validate_config(config) -> None:
  """Raises a ValueError naming the first bad ``config.method`` key (or one MAE cannot work with)."""
  if config.model.get("name", "vit") != "vit":
    raise ValueError(f"config.method.name='mae' needs a token encoder: config.model.name="
                     f"{config.model.name!r} is not 'vit'")
  _check_mask_ratio(config)
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


def _check_mask_ratio(config) -> None:
  """The ratio must leave at least one patch visible and mask at least one (`masking.num_kept`)."""
  ratio = config.method.mask_ratio
  if not config_lib.is_number(ratio) or not 0.0 < ratio < 1.0:
    raise ValueError(f"config.method.mask_ratio={ratio!r} must lie strictly between 0 and 1")
  size, variant = config.data.image_size, config.model.variant
  patch = vit.parse_variant(variant)["patch_size"]
  num_patches = (size // patch) ** 2
  images = f"({size}x{size} images, patch size {patch} from config.model.variant={variant!r})"
  if num_patches < 2:
    raise ValueError(f"config.data.image_size={size} makes {num_patches} patch {images}; MAE needs 2 or more")
  try:
    masking.num_kept(num_patches, ratio)
  except ValueError:
    largest = masking.max_mask_ratio(num_patches)
    if ratio > largest:
      raise ValueError(f"config.method.mask_ratio={ratio} leaves no visible patch of the {num_patches} "
                       f"patches {images}; the largest ratio allowed is {largest!r} (1 - 1/{num_patches})"
                       ) from None
    raise ValueError(f"config.method.mask_ratio={ratio} masks none of the {num_patches} patches {images}"
                     ) from None


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
  """The MAE method bundle; ``config.method.norm_pix_loss`` picks the target."""
  del run_length  # MAE follows no schedule of its own
  model = model_from_config(config)
  patch_size = model.encoder.patch_size
  norm_pix = bool(config.method.norm_pix_loss)
  embed, encoder_variables = online_encoder(model.encoder)

  def init(rng, batch):
    params_rng, masking_rng = jax.random.split(rng)
    variables = model.init({"params": params_rng, "masking": masking_rng}, batch["image"], train=False)
    return dict(variables), {}

  def loss_fn(variables, method_state, batch, rng):
    masking_rng, dropout_rng = jax.random.split(rng)
    images = batch["image"]
    out = model.apply(variables, images, train=True, rngs={"masking": masking_rng, "dropout": dropout_rng})
    loss = losses.masked_reconstruction_loss(out["pred"], patchify(images, patch_size), out["mask"],
                                             norm_pix=norm_pix)
    return loss, ({"loss": loss}, method_state, {})

  def visualize(variables, method_state, batch, rng):
    del method_state
    images = jnp.asarray(batch["image"], jnp.float32)
    out = model.apply(variables, images, train=False, rngs={"masking": rng})
    target = patchify(images, patch_size)
    pred = out["pred"].astype(jnp.float32)
    if norm_pix:
      # Predictions live in each patch's standardised space; map them back with the true statistics.
      _, mean, std = losses.normalize_patches(target)
      pred = pred * std + mean
    masked = out["mask"][..., None]
    visible = target * (1.0 - masked)
    image_hw = images.shape[1:3]
    # An OrderedDict keeps its row order through jit (a plain dict comes back with sorted keys).
    return collections.OrderedDict(
        original=images,
        masked=unpatchify(visible, patch_size, image_hw),
        reconstruction=unpatchify(visible + pred * masked, patch_size, image_hw))

  return Method(name="mae", num_views=1, init=init, loss_fn=loss_fn, embed=embed,
                encoder_variables=encoder_variables, visualize=visualize)
