"""A ViT's last-block attention weights, recomputed explicitly: what DINO's attention-map pictures show.

The blocks attend through `sslx.models.attention.self_attention` (cuDNN's fused kernel on GPU), which returns
the attended values, never the weights. Here, outside the training program, the encoder runs in evaluation
mode up to its last block's first LayerNorm, and that block's weights are recomputed from its own parameters:

  [q, k, v] = LN1(x) W_qkv + b_qkv,   A_n = softmax(q_n k_n^T / sqrt(H) + B_n)   (head n of N, H = D / N)

over the ``T = 1 + L`` tokens, the class token first; each row of ``A_n`` sums to 1 over all ``T`` keys.
``B_n`` is the ViT's relative position bias for head ``n`` (``config.model.rel_pos_bias``,
`sslx.models.relative_position`): the one the encoder's pass builds from the shared table or from the last
block's own, taken from that same pass, so it is indexed exactly as the block indexes it; 0 without one.
`cls_attention_maps` keeps the class token's row over the patch keys, ``A_n[0, 1:]``, laid out on the
patch grid: a map sums to ``1 - A_n[0, 0]`` (the class token's attention to itself is left out, as in DINO's
pictures).

An encoder with stacked blocks (``config.model.scan_blocks``) is run with them unstacked (exact,
`sslx.convert.scan_layout`), so both layouts give the same maps; ``remat`` is dropped (it changes nothing in
evaluation). The encoder module itself is not changed: its training program stays what it was.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from sslx.convert import scan_layout
from sslx.models import vit


def head_attention(tokens: jax.Array, qkv_kernel: jax.Array, qkv_bias: jax.Array, num_heads: int,
                   position_bias: Optional[jax.Array] = None) -> jax.Array:
  """``A_n = softmax(q_n k_n^T / sqrt(H) + B_n)`` of every head, float32 ``(B, N, T, T)`` (module docstring).

  Args:
    tokens: ``(B, T, D)``, the block's input after its first LayerNorm.
    qkv_kernel: ``(D, 3D)``: q, k and v for each head, in `sslx.models.vit.Attention`'s ``(3, N, H)`` order.
    qkv_bias: ``(3D,)``.
    num_heads: ``N``.
    position_bias: ``B``, ``(N, T, T)``: a relative position bias the block adds to its logits, or None.
  """
  batch, length, width = tokens.shape
  highest = jax.lax.Precision.HIGHEST  # maps are read, not trained: no TF32 on GPU
  qkv = jnp.einsum("btd,de->bte", tokens.astype(jnp.float32), qkv_kernel.astype(jnp.float32), precision=highest)
  qkv = (qkv + qkv_bias.astype(jnp.float32)).reshape(batch, length, 3, num_heads, width // num_heads)
  logits = jnp.einsum("btnh,bsnh->bnts", qkv[:, :, 0], qkv[:, :, 1], precision=highest)
  logits = logits / jnp.sqrt(jnp.float32(width // num_heads))
  if position_bias is not None:
    logits = logits + position_bias.astype(jnp.float32)
  return jax.nn.softmax(logits, axis=-1)


def last_block_attention(encoder: nn.Module, variables, images: jax.Array) -> jax.Array:
  """The attention weights of ``encoder``'s last block on ``images``, float32 ``(B, N, 1 + L, 1 + L)``.

  Args:
    encoder: an sslx ViT (`sslx.models.vit.VisionTransformer`), either block layout.
    variables: its variables (``{'params': ...}``), boxed or not.
    images: ``(B, H, W, C)``, normalised as in training; any size the patch size divides.
  """
  if not isinstance(encoder, vit.VisionTransformer):
    raise ValueError(f"Attention maps need a ViT encoder, not {type(encoder).__name__}")
  variables = scan_layout.unstack_blocks(nn.unbox(variables))
  last = f"block_{encoder.depth - 1}"
  # Where the pass builds the bias the last block adds (`sslx.models.relative_position.encoder_bias`).
  bias_paths = {"shared": ("rel_pos_bias",), "per_block": (last, "attn", "rel_pos_bias")}
  bias_path = bias_paths.get(encoder.rel_pos_bias)
  captured = lambda module, method: method == "__call__" and module.path in ((last, "norm1"), bias_path)
  _, state = encoder.clone(scan_blocks=False, remat="none").apply(
      variables, images, train=False, capture_intermediates=captured, mutable=["intermediates"])
  intermediates = state["intermediates"]
  tokens = intermediates[last]["norm1"]["__call__"][0]
  position_bias = None
  if bias_path is not None:
    position_bias = functools.reduce(lambda tree, key: tree[key], bias_path, intermediates)["__call__"][0]
  qkv = variables["params"][last]["attn"]["qkv"]
  return head_attention(tokens, qkv["kernel"], qkv["bias"], encoder.num_heads, position_bias)


def cls_attention_maps(encoder: nn.Module, variables, images: jax.Array) -> jax.Array:
  """The class token's attention over the patches in the last block, float32 ``(B, N, grid_h, grid_w)``.

  Row-major patch grid of ``images`` (``grid_h = H / patch``); each map sums to 1 minus the class token's
  attention to itself (module docstring). Jittable with ``encoder`` static (``functools.partial``).
  """
  weights = last_block_attention(encoder, variables, images)
  grid = (images.shape[1] // encoder.patch_size, images.shape[2] // encoder.patch_size)
  return weights[:, :, 0, 1:].reshape(*weights.shape[:2], *grid)
