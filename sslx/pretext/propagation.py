"""Label propagation through an attention over frame embeddings (Vondrick et al., 2018).

A target pixel ``i`` points at the reference pixels ``j`` by

    A_ij = exp(f_i . f_j / tau) / sum_j' exp(f_i . f_j' / tau),

the softmax over every reference pixel of every reference frame, and takes the weighted labels
``y_i = sum_j A_ij l_j``. With colours as ``l`` (one-hot colour clusters) this is video colourisation's
prediction; with any other per-pixel labels (one-hot masks, keypoint heatmaps) it is the tracker that
colourisation teaches. ``top_k`` keeps, for each target pixel, only its ``k`` largest logits (the others get
``A_ij = 0``), which sharpens long propagations.

Everything is pure ``jnp`` with static shapes; embeddings and labels live on one grid (the encoder's), so
`cell_average` brings full-resolution labels down to it and `upsample` brings predictions back.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


SIMILARITIES = ("dot", "neg_sq_dist")


def attention_logits(target_features, reference_features, temperature: float, similarity: str = "dot"):
  """``f_i . f_j / tau`` (``similarity='dot'``, the paper's) or ``-|f_i - f_j|^2 / tau`` ('neg_sq_dist', a
  Gaussian kernel, for raw pixels as features): ``(..., N, D)`` and ``(..., M, D)`` -> ``(..., N, M)``, in
  float32."""
  target, reference = target_features.astype(jnp.float32), reference_features.astype(jnp.float32)
  dot = jnp.einsum("...nd,...md->...nm", target, reference)
  if similarity == "dot":
    return dot / temperature
  if similarity != "neg_sq_dist":
    raise ValueError(f"similarity={similarity!r} is not one of {SIMILARITIES}")
  squared = jnp.sum(target ** 2, -1)[..., :, None] + jnp.sum(reference ** 2, -1)[..., None, :] - 2 * dot
  return -squared / temperature


def attention(target_features, reference_features, *, temperature: float, top_k: Optional[int] = None,
              reference_mask=None, similarity: str = "dot"):
  """The weights ``A`` ``(..., N, M)`` of the module docstring.

  Args:
    target_features: ``(..., N, D)``.
    reference_features: ``(..., M, D)``.
    temperature: ``tau`` > 0.
    top_k: keep only each row's ``k`` largest logits (ties may keep more); None: all ``M``.
    reference_mask: optional bool ``(..., M)``; False references get no weight (at least one must be True).
    similarity: 'dot' or 'neg_sq_dist' (`attention_logits`).
  """
  logits = attention_logits(target_features, reference_features, temperature, similarity)
  if reference_mask is not None:
    logits = jnp.where(reference_mask[..., None, :], logits, -jnp.inf)
  if top_k is not None and top_k < logits.shape[-1]:
    kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits >= kth_largest, logits, -jnp.inf)
  return jax.nn.softmax(logits, axis=-1)


def propagate(target_features, reference_features, reference_labels, *, temperature: float,
              top_k: Optional[int] = None, reference_mask=None, similarity: str = "dot"):
  """``sum_j A_ij l_j``: labels ``(..., M, K)`` of the references -> ``(..., N, K)`` of the targets."""
  weights = attention(target_features, reference_features, temperature=temperature, top_k=top_k,
                      reference_mask=reference_mask, similarity=similarity)
  return jnp.einsum("...nm,...mk->...nk", weights, reference_labels.astype(jnp.float32))


def propagate_video(embeddings, first_labels, *, temperature: float, window: int = 3,
                    top_k: Optional[int] = None, similarity: str = "dot"):
  """Propagates the first frame's labels through a video.

  Frame ``t >= 1`` is predicted from frame 0 with its given labels plus the ``window`` frames before it
  (those after frame 0, with their own predictions fed back as soft label distributions): the first frame
  anchors every prediction against drift, and the recent frames follow changes of appearance.
  ``window=0`` propagates from the first frame alone.

  Args:
    embeddings: ``(T, h, w, D)`` per-frame embeddings.
    first_labels: ``(h, w, K)`` labels of frame 0 (e.g. one-hot masks or their cell averages).
    temperature, top_k, similarity: as `attention`.
    window: how many previous predicted frames are references besides frame 0.

  Returns:
    ``(T, h, w, K)`` float32: frame 0's labels, then each frame's prediction.
  """
  num_frames, h, w, dim = embeddings.shape
  num_labels = first_labels.shape[-1]
  flat = embeddings.reshape(num_frames, h * w, dim).astype(jnp.float32)
  first = first_labels.reshape(h * w, num_labels).astype(jnp.float32)
  window_features = jnp.zeros((window, h * w, dim), jnp.float32)
  window_labels = jnp.zeros((window, h * w, num_labels), jnp.float32)
  window_valid = jnp.zeros((window,), bool)

  def step(carry, features):
    window_features, window_labels, window_valid = carry
    references = jnp.concatenate([flat[:1], window_features]).reshape(-1, dim)
    labels = jnp.concatenate([first[None], window_labels]).reshape(-1, num_labels)
    valid = jnp.repeat(jnp.concatenate([jnp.ones((1,), bool), window_valid]), h * w)
    prediction = propagate(features, references, labels, temperature=temperature, top_k=top_k,
                           reference_mask=valid, similarity=similarity)
    if window:
      carry = (jnp.concatenate([window_features[1:], features[None]]),
               jnp.concatenate([window_labels[1:], prediction[None]]),
               jnp.concatenate([window_valid[1:], jnp.ones((1,), bool)]))
    return carry, prediction

  _, predictions = jax.lax.scan(step, (window_features, window_labels, window_valid), flat[1:])
  out = jnp.concatenate([first[None], predictions])
  return out.reshape(num_frames, h, w, num_labels)


def cell_average(x, grid: tuple[int, int]):
  """Means of ``x`` ``(..., H, W, C)`` over the cells of an ``(h, w)`` grid that divides ``(H, W)``."""
  *lead, height, width, channels = x.shape
  h, w = grid
  if height % h or width % w:
    raise ValueError(f"a {h}x{w} grid does not divide {height}x{width} pixels into whole cells")
  cells = x.reshape(*lead, h, height // h, w, width // w, channels)
  return jnp.mean(cells, axis=(-4, -2))


def upsample(x, size: tuple[int, int]):
  """Bilinear resize of ``(..., h, w, C)`` to ``(..., H, W, C)`` (label distributions to full frames)."""
  return jax.image.resize(x, (*x.shape[:-3], *size, x.shape[-1]), method="linear")
