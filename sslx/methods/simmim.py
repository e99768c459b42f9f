"""SimMIM (Xie et al., 2022): regress the raw pixels of masked patches from a ViT that sees every token.

Masking (`sslx.mask_policy`, ``config.method.mask_strategy``): by default ``simmim``
(`sslx.masking.simmim_mask`): the image is tiled by square cells of ``mask_patch_size`` pixels (the paper's
32 px: 2 x 2 model patches of ViT-B/16), and ``ceil(n * r)`` of the ``n`` cells of each image are masked,
``r`` the mask ratio; ``random``, ``block``, ``grid`` and ``importance`` (ranked by the encoder's own class-token
attention over the unmasked image: one more encoder forward pass per step) are selectable too. Unlike MAE the
encoder keeps every token: the patch embeddings of masked model patches become the encoder's learned mask
token (``config.model.mask_token``) before the position embedding.

Prediction: one linear layer maps each of the encoder's patch tokens (final LayerNorm applied) to that
patch's ``p * p * C`` pixel values, the paper's 1 x 1 convolution followed by a pixel shuffle (the same map,
with its outputs listed in `sslx.models.patches` order).

Loss: the mean absolute error over the masked pixels of the (normalised) input image ``x``,

  ``loss = sum_{masked pixels q} sum_c |x_hat_qc - x_qc| / (C * #masked pixels)``,

the reference's ``(l1 * mask).sum() / mask.sum() / C``. It is `losses.masked_reconstruction_loss` with
``p=1, norm_pix=False`` and the per-patch mask: the mean over each patch's ``p * p * C`` values, averaged
over the masked patches, has the same numerator and ``#masked patches * p * p * C`` as denominator.

Progressive masking (``mask_ratio_end``, strategies ``simmim`` and ``random``): ``r_t = r_0 + (r_1 - r_0)
min(t / T, 1)`` with ``T`` the run's steps and ``t = method_state['step']``, the updates done so far
(`after_update` advances it); ``r_t`` is a traced value, so the ratio changes without recompiling.
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
from sslx.methods import Method, RunLength, online_encoder
from sslx.models import vit
from sslx.models.patches import patchify
from sslx.models.patches import reconstruction_rows


class SimMIM(nn.Module):
  """A ViT with a mask token and a linear pixel head. Params: ``{'encoder': ..., 'head': ...}``."""
  encoder: vit.VisionTransformer
  patch_dim: int

  @nn.compact
  def __call__(self, images, mask: Optional[jax.Array] = None, *, train: bool):
    """``(B, L, p*p*C)`` pixel predictions of every patch; ``mask`` ``(B, L)`` bool, True = masked."""
    _, aux = self.encoder(images, train=train, mask=mask)
    head = vit.dense(self.patch_dim, ("embed", "patch"), self.encoder.dtype, self.encoder.param_dtype, "head")
    return head(aux["patch_tokens"])


def default_config() -> ml_collections.ConfigDict:
  """``config.method`` of SimMIM: the paper's ViT-B mask (32 px cells, ratio 0.6), no progressive masking;
  the other masking keys (`sslx.mask_policy`) with their defaults."""
  return ml_collections.ConfigDict(dict(
      name="simmim", **mask_policy.config_keys("simmim", mask_ratio=0.6, mask_patch_size=32)))


def validate_config(config) -> None:
  """Raises a ValueError naming the first bad ``config.method`` key (or a model key SimMIM needs)."""
  config_lib.check_section_keys(config.method, default_config(), "method", "SimMIM")
  mask_policy.check_mask_token_encoder(config, "SimMIM")
  mask_policy.from_config(config, default_config())


def model_from_config(config) -> SimMIM:
  """The encoder of ``config.model`` (with its mask token) and a head to ``p * p * config.data.channels``."""
  encoder = vit.from_config(config.model)
  return SimMIM(encoder, encoder.patch_size ** 2 * int(config.data.channels))


def build(config, run_length: RunLength) -> Method:
  """The SimMIM bundle; ``run_length`` spans the progressive mask ratio."""
  model = model_from_config(config)
  patch_size = model.encoder.patch_size
  policy = mask_policy.from_config(config, default_config())
  embed, encoder_variables = online_encoder(model.encoder)
  masks = mask_policy.method_masks(policy, model.encoder, encoder_variables, int(run_length.total_steps))

  def draw_mask(rng, variables, method_state, images):
    return masks(rng, variables, method_state, images, method_state["step"])

  def init(rng, batch):
    variables = model.init({"params": rng}, batch["image"], train=False)
    return dict(variables), {"step": jnp.zeros((), jnp.int32)}

  def loss_fn(variables, method_state, batch, rng):
    masking_rng, dropout_rng = jax.random.split(rng)
    images = batch["image"]
    mask = draw_mask(masking_rng, variables, method_state, images)
    pred = model.apply(variables, images, mask, train=True, rngs={"dropout": dropout_rng})
    loss = losses.masked_reconstruction_loss(pred, patchify(images, patch_size), mask, norm_pix=False, p=1)
    metrics = {"loss": loss, "mask_ratio": jnp.mean(mask.astype(jnp.float32))}
    return loss, (metrics, method_state, {})

  def after_update(variables, method_state, step):
    del variables
    return {**method_state, "step": step + 1}

  def visualize(variables, method_state, batch, rng):
    images = jnp.asarray(batch["image"], jnp.float32)
    mask = draw_mask(rng, variables, method_state, images)
    pred = model.apply(variables, images, mask, train=False).astype(jnp.float32)
    return reconstruction_rows(images, pred, mask, patch_size)

  return Method(name="simmim", num_views=1, init=init, loss_fn=loss_fn, embed=embed,
                encoder_variables=encoder_variables, after_update=after_update, visualize=visualize)
