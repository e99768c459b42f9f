"""BEiT's relative position bias (Bao et al., 2022; ``RelativePositionBias`` in microsoft/unilm ``beit``).

A ViT over an ``h x w`` patch grid attends over ``T = 1 + h w`` tokens, the class token first and the patches
in row-major order. Each head ``n`` adds a learned scalar to the attention logit of query ``i`` and key ``j``:

  logits[n, i, j] = q_i . k_j / sqrt(H) + table[index[i, j], n]

with a table of ``E = (2h - 1)(2w - 1) + 3`` rows per head, zero at initialisation, indexed by the patches'
relative offset ``(dr, dc) = (r_i - r_j, c_i - c_j)``:

  index[i, j] = (dr + h - 1)(2w - 1) + (dc + w - 1)                 (patch i, patch j)
  index[0, j] = E - 3,  index[i, 0] = E - 2,  index[0, 0] = E - 1   (class to patch, patch to class, class to
                                                                     class)

The table belongs to one grid: a ViT with it encodes images of the size it was initialised on.

The bias needs the logits, which cuDNN's fused attention computes internally: with a bias jax's cuDNN path
trains only on even token counts (``check_is_flash_attention`` in
``jax._src.cudnn.fused_attention_stablehlo``), and ``1 + h w`` is odd on ViT-B/16's 14 x 14 grid.
`biased_attention` is therefore the head-major XLA formulation of `sslx.models.attention.self_attention` with
the bias added, and a ViT with the bias always runs it (`sslx.models.vit.attention_implementation`).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

MODES = ("none", "shared", "per_block")  # config.model.rel_pos_bias


def num_entries(grid: tuple[int, int]) -> int:
  """``E = (2h - 1)(2w - 1) + 3``: a row per relative offset of two patches, and three for the class token."""
  h, w = grid
  return (2 * h - 1) * (2 * w - 1) + 3


def relative_position_index(grid: tuple[int, int]) -> np.ndarray:
  """``(T, T)`` int32 ``index[i, j]`` of the module docstring, ``T = 1 + h w``."""
  h, w = grid
  rows, cols = (a.reshape(-1) for a in np.meshgrid(np.arange(h), np.arange(w), indexing="ij"))
  offset = ((rows[:, None] - rows[None, :] + h - 1) * (2 * w - 1) + (cols[:, None] - cols[None, :] + w - 1))
  entries = num_entries(grid)
  index = np.empty((1 + h * w,) * 2, np.int32)
  index[1:, 1:] = offset
  index[0, 1:] = entries - 3
  index[1:, 0] = entries - 2
  index[0, 0] = entries - 1
  return index


class RelativePositionBias(nn.Module):
  """The ``(N, T, T)`` float32 bias of a ``grid`` for ``num_heads`` heads; parameter ``table`` ``(E, N)``."""
  num_heads: int
  grid: tuple[int, int]
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self):
    shape = (num_entries(self.grid), self.num_heads)
    if self.has_variable("params", "table"):
      stored = jnp.shape(nn.unbox(self.get_variable("params", "table")))
      if stored != shape:
        raise ValueError(f"A relative position table of shape {stored} belongs to another patch grid than "
                         f"{self.grid[0]}x{self.grid[1]} (shape {shape}); a ViT with "
                         "config.model.rel_pos_bias encodes the image size it was initialised on")
    table = self.param("table", nn.with_logical_partitioning(nn.initializers.zeros, (None, "heads")), shape,
                       self.param_dtype)
    bias = jnp.take(table.astype(jnp.float32), relative_position_index(self.grid), axis=0)  # (T, T, N)
    return jnp.transpose(bias, (2, 0, 1))


def encoder_bias(mode: str, num_heads: int, grid: tuple[int, int], param_dtype: Any):
  """``(bias, block_grid)`` of a ViT's ``rel_pos_bias`` ``mode``, inside its compact method: ``'shared'``, one
  table (``rel_pos_bias``) whose bias every block adds; ``'per_block'``, the grid each block's attention
  builds its own table for; ``'none'``, neither."""
  if mode == "shared":
    return RelativePositionBias(num_heads, grid, param_dtype, name="rel_pos_bias")(), None
  if mode == "per_block":
    return None, grid
  if mode != "none":
    raise ValueError(f"Unknown rel_pos_bias {mode!r}; choose one of {MODES}.")
  return None, None


def biased_attention(qkv: jax.Array, bias: jax.Array) -> jax.Array:
  """``softmax(q k^T / sqrt(H) + bias) v`` of every head: ``qkv`` ``(B, T, 3, N, H)``, ``bias`` ``(N, T, T)``
  -> ``(B, T, N, H)``; logits and softmax in float32."""
  query, key, value = jnp.transpose(qkv, (2, 0, 3, 1, 4))
  query = query * np.asarray(qkv.shape[-1] ** -0.5, qkv.dtype)
  logits = jnp.einsum("bnth,bnsh->bnts", query, key, preferred_element_type=jnp.float32) + bias
  probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
  return jnp.transpose(jnp.einsum("bnts,bnsh->bnth", probs, value), (0, 2, 1, 3))
