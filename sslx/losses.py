"""Pure loss functions. Each docstring states the formula; none of them calls a model."""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh

from sslx import numerics
from sslx import parallel


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


class ContrastiveLoss(NamedTuple):
  """A contrastive loss over the global batch, and what users watch of it.

  ``loss``: scalar float32, the mean of ``per_example`` over the global batch. ``per_example``: ``(B,)``
  float32, one value per row of the caller's batch (global shape when called on global arrays).
  ``accuracy``: scalar float32, the fraction of anchors whose positive has the largest logit (top-1;
  ties go to the lowest column).
  """
  loss: jax.Array
  per_example: jax.Array
  accuracy: jax.Array


_PER_ROW = ContrastiveLoss(loss=False, per_example=True, accuracy=False)  # `run_on_batch_shards` out spec


def info_nce(queries, keys, *, temperature, negatives=None, symmetric: bool = False,
             batch_negatives: bool = True,
             mesh: Optional[Union[Mesh, AbstractMesh]] = None) -> ContrastiveLoss:
  """InfoNCE with cosine logits over the global batch (MoCo v3 and CLIP; MoCo's queue as ``negatives``).

  With ``q``, ``k``, ``n`` the L2-normalised queries, keys and extra negatives:
  ``l_i = -log( exp(q_i.k_i/t) / (sum_j exp(q_i.k_j/t) + sum_m exp(q_i.n_m/t)) )``,
  ``j`` over every key of the global batch (``k_i`` is the positive of ``q_i``, the others negatives) and
  ``m`` over the rows of ``negatives``. With ``batch_negatives=False`` the sum over ``j`` keeps ``k_i`` only:
  the negatives are ``negatives`` alone, as in MoCo v1/v2 (its ``[l_pos, l_neg]`` logits against the queue) and
  lightly's memory-bank loss. ``symmetric`` averages ``l_i`` with the same term with the roles of
  queries and keys swapped (``k_i`` the anchor, every query the candidates, and the same ``negatives``);
  ``accuracy`` then counts the anchors of both directions.

  Under a mesh whose batch axes ``('data', 'fsdp')`` hold several devices, each device builds only its own
  rows of the logits, ``(B / devices, B + K)``, against all-gathered keys
  (`sslx.parallel.run_on_batch_shards`); loss and gradients do not depend on how the batch is split.

  Args:
    queries: ``(B, D)`` anchors, any float dtype (computed in float32).
    keys: ``(B, D)``, row ``i`` the positive of query ``i``.
    temperature: ``t > 0`` (a Python number, or a traced scalar for a schedule).
    negatives: optional ``(K, D)`` extra negatives, the same on every device (e.g. a MoCo queue). They are
      L2-normalised here too (a no-op on a queue of normalised keys) and receive no gradient.
    symmetric: average over both directions.
    batch_negatives: count the other keys of the global batch as negatives; False needs ``negatives``.
    mesh: the mesh to split the batch over; defaults to the current one (``jax.set_mesh``).

  Returns:
    `ContrastiveLoss`.
  """
  _check_pair("queries", queries, "keys", keys)
  if negatives is not None and (negatives.ndim != 2 or negatives.shape[1] != queries.shape[1]):
    raise ValueError(f"negatives must be (K, {queries.shape[1]}) like the rows of queries; "
                     f"got {negatives.shape}")
  _check_temperature(temperature)
  if not batch_negatives and negatives is None:
    raise ValueError("info_nce(batch_negatives=False) needs negatives: without the batch's other keys the "
                     "positive would be the only candidate")
  if negatives is not None:
    negatives = numerics.l2_normalize(jax.lax.stop_gradient(negatives))

  def per_shard(shards, queries, keys, negatives, inv_temperature):
    queries, keys = numerics.l2_normalize(queries), numerics.l2_normalize(keys)
    first = shards.first_row(queries.shape[0])

    def terms(anchors, partners):
      if batch_negatives:
        return _anchor_terms(anchors, shards.all_gather(partners), negatives, first, inv_temperature)
      return _pair_terms(anchors, partners, negatives, inv_temperature)

    losses, correct = terms(queries, keys)
    if symmetric:
      swapped_losses, swapped_correct = terms(keys, queries)
      losses, correct = (losses + swapped_losses) / 2, (correct + swapped_correct) / 2
    return ContrastiveLoss(shards.mean(losses), losses, shards.mean(correct))

  return parallel.run_on_batch_shards(
      per_shard, batched=dict(queries=queries, keys=keys),
      replicated=dict(negatives=negatives, inv_temperature=_inverse(temperature)), batched_out=_PER_ROW,
      mesh=mesh)


def nt_xent(z1, z2, *, temperature, mesh: Optional[Union[Mesh, AbstractMesh]] = None) -> ContrastiveLoss:
  """SimCLR's NT-Xent: 2N anchors, each view's positive its other view, the 2N - 2 others its negatives.

  With ``z = [z1; z2]`` the ``2N`` L2-normalised views of the global batch of ``N`` images, ``s_ab =
  z_a.z_b/t`` and ``p(a)`` the other view of anchor ``a`` (``a + N`` or ``a - N``):
  ``l_a = -log( exp(s_{a,p(a)}) / sum_{b != a} exp(s_ab) )``; ``loss`` is the mean over the 2N anchors,
  ``per_example[i] = (l_i + l_{i+N}) / 2`` and ``accuracy`` counts the 2N anchors.

  Under a mesh with several devices on the batch axes each device builds only its ``2N / devices`` rows of
  the ``(2N, 2N)`` logits, against all-gathered views, as in `info_nce`.

  Args:
    z1: ``(N, D)`` first views (any float dtype; computed in float32).
    z2: ``(N, D)`` second views, row ``i`` of the same image as row ``i`` of ``z1``.
    temperature: ``t > 0``.
    mesh: the mesh to split the batch over; defaults to the current one (``jax.set_mesh``).

  Returns:
    `ContrastiveLoss`.
  """
  _check_pair("z1", z1, "z2", z2)
  _check_temperature(temperature)

  def per_shard(shards, z1, z2, inv_temperature):
    z1, z2 = numerics.l2_normalize(z1), numerics.l2_normalize(z2)
    rows = z1.shape[0]
    images = rows * shards.size
    # Candidate columns: [every first view; every second view], so image g's views sit at g and images + g.
    candidates = jnp.concatenate([shards.all_gather(z1), shards.all_gather(z2)])
    image = shards.first_row(rows) + jnp.arange(rows)
    own_column = jnp.concatenate([image, images + image])
    positive_column = jnp.concatenate([images + image, image])
    logits = _similarities(jnp.concatenate([z1, z2]), candidates) * inv_temperature
    logits = jnp.where(jnp.arange(2 * images) == own_column[:, None], -jnp.inf, logits)
    losses, correct = _cross_entropy(logits, positive_column)
    per_image = (losses[:rows] + losses[rows:]) / 2
    return ContrastiveLoss(shards.mean(per_image), per_image, shards.mean(correct))

  return parallel.run_on_batch_shards(per_shard, batched=dict(z1=z1, z2=z2),
                                      replicated=dict(inv_temperature=_inverse(temperature)),
                                      batched_out=_PER_ROW, mesh=mesh)


def _anchor_terms(anchors, candidates, negatives, first_row, inv_temperature):
  """Per-anchor loss and top-1 hit; anchor i's positive is candidate ``first_row + i``."""
  logits = _similarities(anchors, candidates)
  if negatives is not None:
    logits = jnp.concatenate([logits, _similarities(anchors, negatives)], axis=1)
  return _cross_entropy(logits * inv_temperature, first_row + jnp.arange(anchors.shape[0]))


def _pair_terms(anchors, partners, negatives, inv_temperature):
  """Per-anchor loss and top-1 hit against ``[its partner, every negative]`` (column 0 the positive)."""
  positive = jnp.sum(anchors * partners, axis=1, keepdims=True)
  logits = jnp.concatenate([positive, _similarities(anchors, negatives)], axis=1)
  return _cross_entropy(logits * inv_temperature, jnp.zeros(anchors.shape[0], jnp.int32))


def _similarities(anchors, candidates):
  # Full float32 products: accelerators' default (TF32 / one bf16 pass) errs by 1e-3 or more per cosine,
  # which 1/t (up to ~14) magnifies in the logits; the (B, B) products cost little next to the encoder.
  return jnp.matmul(anchors, candidates.T, precision=jax.lax.Precision.HIGHEST)


def _cross_entropy(logits, targets):
  """``(logsumexp(logits_i) - logits_i[target_i], argmax(logits_i) == target_i)`` per row."""
  target_logits = jnp.take_along_axis(logits, targets[:, None], axis=1)[:, 0]
  correct = (jnp.argmax(logits, axis=1) == targets).astype(jnp.float32)
  return jax.nn.logsumexp(logits, axis=1) - target_logits, correct


def _check_pair(first_name, first, second_name, second) -> None:
  if first.ndim != 2 or first.shape != second.shape:
    raise ValueError(f"{first_name} and {second_name} must both be (B, D); "
                     f"got {first.shape} and {second.shape}")


def _check_temperature(temperature) -> None:
  if not isinstance(temperature, jax.core.Tracer) and not float(temperature) > 0:
    raise ValueError(f"temperature must be > 0; got {temperature}")


def _inverse(temperature) -> jax.Array:
  return 1.0 / jnp.asarray(temperature, jnp.float32)
