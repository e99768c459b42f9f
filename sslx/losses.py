"""Pure loss functions. Each docstring states the formula; none of them calls a model."""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp


def normalize_patches(patches, *, eps: float = 1e-6):
  """Standardises each patch by its own statistics (the MAE "norm-pix" target).

  ``t_hat = (t - mean(t)) / sqrt(var(t) + eps)`` over the P values of a patch, where ``var`` is the
  unbiased variance (divides by P - 1), as ``torch.var`` in the reference code.

  Args:
    patches: ``(..., P)`` array.
    eps: added to the variance.

  Returns:
    ``(t_hat, mean, std)`` in float32 with ``std = sqrt(var + eps)``, so ``t = t_hat * std + mean``.
  """
  patches = jnp.asarray(patches, jnp.float32)
  mean = jnp.mean(patches, axis=-1, keepdims=True)
  std = jnp.sqrt(jnp.var(patches, axis=-1, keepdims=True, ddof=1) + eps)
  return (patches - mean) / std, mean, std


def masked_reconstruction_loss(pred, target, mask: Optional[jnp.ndarray] = None, *,
                               norm_pix: bool = True, p: int = 2, eps: float = 1e-6):
  """Pixel reconstruction loss averaged over masked patches (MAE with p=2, SimMIM with p=1).

  ``e_i = (1/P) sum_j |pred_ij - t_ij|^p`` per patch i, and
  ``loss = sum_i m_i e_i / sum_i m_i`` over all patches of the batch, where ``t`` is the target
  (standardised per patch by :func:`normalize_patches` when ``norm_pix``) and ``m_i = 1`` for a masked
  patch. Computed in float32.

  Args:
    pred: ``(B, L, P)`` predicted patches.
    target: ``(B, L, P)`` true patches (see ``sslx.models.patches.patchify``).
    mask: ``(B, L)`` with 1 where a patch was masked; ``None`` averages over every patch.
    norm_pix: regress per-patch standardised pixels.
    p: exponent of the per-pixel error (2: squared error, 1: absolute error).
    eps: variance offset for ``norm_pix``.

  Returns:
    Scalar float32 loss.
  """
  target = jnp.asarray(target, jnp.float32)
  if norm_pix:
    target, _, _ = normalize_patches(target, eps=eps)
  per_patch = jnp.mean(jnp.abs(jnp.asarray(pred, jnp.float32) - target) ** p, axis=-1)
  if mask is None:
    return jnp.mean(per_patch)
  mask = jnp.asarray(mask, jnp.float32)
  return jnp.sum(per_patch * mask) / jnp.sum(mask)
