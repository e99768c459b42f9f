"""Lightweight decoders that turn encoder tokens back into pixels."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import jax.numpy as jnp
from flax import linen as nn

from sslx.models import pos_embed
from sslx.models import vit

Dtype = Any


class MAEDecoder(nn.Module):
  """The MAE decoder: fills masked positions with a shared token and predicts every patch's pixels.

  Attributes:
    patch_dim: length of a flattened patch, ``p * p * C``.
    width, depth, num_heads, mlp_dim: decoder transformer dimensions.
    scan_blocks, remat, attention: how its blocks compile, as the encoder's (`sslx.models.vit.run_blocks`).
  """
  patch_dim: int
  width: int = 512
  depth: int = 8
  num_heads: int = 16
  mlp_dim: int = 2048
  layer_norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  scan_blocks: bool = False
  remat: str = "none"
  attention: str = "xla"

  @nn.compact
  def __call__(self, tokens, ids_restore, *, train: bool,
               grid_hw: Optional[Sequence[int]] = None):
    """Predicts patches.

    Args:
      tokens: ``(B, 1 + L_keep, D_enc)`` encoder output, class token first, visible patches in the
        shuffled order the masking produced.
      ids_restore: ``(B, L)`` position of each original patch in the shuffled order.
      train: training mode (the decoder has no stochastic layers; kept for a uniform interface).
      grid_hw: patch grid ``(rows, cols)``; ``None`` assumes a square grid.

    Returns:
      ``(B, L, patch_dim)`` predictions in original (row-major) patch order.
    """
    del train
    batch, num_tokens, _ = tokens.shape
    num_patches = ids_restore.shape[1]
    if grid_hw is None:
      side = int(round(num_patches ** 0.5))
      if side * side != num_patches:
        raise ValueError(f"{num_patches} patches do not form a square grid; pass grid_hw.")
      grid_hw = (side, side)

    x = vit.dense(self.width, (None, "embed"), self.dtype, self.param_dtype, "decoder_embed")(tokens)
    mask_token = self.param("mask_token", vit.partitioned(vit.token_init, (None, None, "embed")),
                            (1, 1, self.width), self.param_dtype)
    mask_tokens = jnp.broadcast_to(mask_token.astype(x.dtype),
                                   (batch, num_patches + 1 - num_tokens, self.width))
    # Visible tokens followed by mask tokens are in shuffled order; ids_restore puts them back.
    patches = jnp.concatenate([x[:, 1:], mask_tokens], axis=1)
    patches = jnp.take_along_axis(patches, ids_restore[..., None], axis=1)
    x = jnp.concatenate([x[:, :1], patches], axis=1)
    pos = pos_embed.sincos_pos_embed_2d(self.width, tuple(grid_hw), cls_token=True)
    x = x + jnp.asarray(pos, self.dtype)

    x = vit.run_blocks(x, None, depth=self.depth, scan=self.scan_blocks, remat=self.remat,
                       num_heads=self.num_heads, mlp_dim=self.mlp_dim, layer_norm_eps=self.layer_norm_eps,
                       dtype=self.dtype, param_dtype=self.param_dtype, attention=self.attention)
    x = vit.layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, "norm")(x)
    x = vit.dense(self.patch_dim, ("embed", "patch"), self.dtype, self.param_dtype, "pred")(x)
    return x[:, 1:]
