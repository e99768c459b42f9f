"""Pure loss functions. Each docstring states the formula; none of them calls a model."""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh

from sslx import numerics
from sslx import parallel
from sslx import schedules


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


def _check_temperature(temperature, name: str = "temperature") -> None:
  if not isinstance(temperature, jax.core.Tracer) and not float(temperature) > 0:
    raise ValueError(f"{name} must be > 0; got {temperature}")


def _inverse(temperature) -> jax.Array:
  return 1.0 / jnp.asarray(temperature, jnp.float32)


class RegressionLoss(NamedTuple):
  """A regression of one network's outputs onto another's: ``loss`` (scalar float32, the mean of
  ``per_example``) and ``per_example`` (``(B,)`` float32, one value per row of the caller's batch)."""
  loss: jax.Array
  per_example: jax.Array


def byol_loss(predictions, targets) -> RegressionLoss:
  """BYOL's regression of the online predictions onto the target projections.

  ``per_example_i = || p_i/|p_i| - t_i/|t_i| ||^2 = 2 - 2 cos(p_i, t_i)`` and ``loss = mean_i per_example_i``,
  in float32 for any input float dtype. ``targets`` pass through ``jax.lax.stop_gradient``: the target
  network never gets a gradient through this loss, only its EMA update moves it.

  Normalisation is `sslx.numerics.l2_normalize`, ``x / max(|x|, 1e-12)``; deepmind-research/byol divides by
  ``sqrt(max(|x|^2, 1e-12))``, i.e. floors the norm at 1e-6 instead. The two agree for every row whose norm
  exceeds 1e-6 (any projector output in practice). Both map a zero row to zero, so its term is the squared
  norm of the other row's unit vector (1; 0 when both are zero), not ``2 - 2 cos``.

  The rows are independent, so under ``jax.jit`` on a batch sharded over devices the plain mean is already the
  mean over the global batch (XLA inserts the reduction); no shard_map is needed.

  Args:
    predictions: ``(B, D)`` online predictor outputs, any float dtype.
    targets: ``(B, D)`` target projector outputs for the other view of the same images.

  Returns:
    `RegressionLoss`.
  """
  _check_pair("predictions", predictions, "targets", targets)
  predictions = numerics.l2_normalize(predictions)
  targets = numerics.l2_normalize(jax.lax.stop_gradient(targets))
  per_example = jnp.sum((predictions - targets) ** 2, axis=-1)
  return RegressionLoss(jnp.mean(per_example), per_example)


class DinoLoss(NamedTuple):
  """DINO's self-distillation loss and the two numbers that show collapse (scalars, float32, in nats).

  ``loss``: the mean cross-entropy ``H(P_t, P_s)`` over the (teacher crop, other student crop) pairs.
  ``teacher_entropy``: mean ``H(P_t)`` of the centred and sharpened teacher; ``ln K`` means the teacher
  collapsed to uniform, near 0 that one dimension dominates. ``kl``: mean ``KL(P_t || P_s) = H(P_t, P_s) -
  H(P_t)`` over the same pairs, i.e. ``loss - teacher_entropy``; it goes to 0 under either collapse. Being a
  difference of float32 values of a few nats it is exact to ~1e-6 nats only, and can read slightly below 0.
  """
  loss: jax.Array
  teacher_entropy: jax.Array
  kl: jax.Array


def dino_loss(student_logits, teacher_logits, center, *, student_temperature,
              teacher_temperature) -> DinoLoss:
  """DINO's cross-entropy between the centred, sharpened teacher and the student over pairs of crops.

  ``P_t[a] = softmax((t_a - c) / tau_t)`` for each teacher crop ``a`` (under ``stop_gradient``, as is the
  centre ``c``) and ``log P_s[v] = log_softmax(s_v / tau_s)`` for each student crop ``v``:
  ``loss = 1/|pairs| sum_{(a, v): v != a} 1/B sum_b -sum_k P_t[a, b, k] log P_s[v, b, k]``,
  over every teacher crop ``a`` and every student crop ``v`` except ``a`` itself: ``V_t (V_s - 1)`` pairs,
  the reference's ``n_loss_terms`` (facebookresearch/dino ``DINOLoss``; lightly's ``DINOLoss`` likewise skips
  the diagonal of its (teacher crop, student crop) matrix). Computed in float32.

  The mean over ``b`` is a plain mean over the global batch under ``jax.jit``, however the batch is sharded;
  no shard_map is needed. Call it with the centre of the previous step, then `dino_center_update`, as the
  reference updates its centre after the loss.

  Args:
    student_logits: ``(V_s, B, K)`` student head outputs for every crop; the first ``V_t`` are the global
      crops in the teacher's order, the local crops follow.
    teacher_logits: ``(V_t, B, K)`` teacher head outputs for the global crops.
    center: ``(K,)`` or ``(1, K)`` running mean of the teacher logits.
    student_temperature: ``tau_s > 0`` (DINO: 0.1).
    teacher_temperature: ``tau_t > 0``, a Python number or a traced scalar (`teacher_temperature_schedule`).

  Returns:
    `DinoLoss`.
  """
  _check_dino_logits(student_logits, teacher_logits)
  _check_center(center, teacher_logits)
  num_classes = teacher_logits.shape[-1]
  _check_temperature(student_temperature, "student_temperature")
  _check_temperature(teacher_temperature, "teacher_temperature")
  teacher_logits, center = jax.lax.stop_gradient((teacher_logits, center.reshape(num_classes)))
  teacher_log_probs = jax.nn.log_softmax(
      (jnp.asarray(teacher_logits, jnp.float32) - center) * _inverse(teacher_temperature), axis=-1)
  teacher_probs = jnp.exp(teacher_log_probs)
  student_log_probs = jax.nn.log_softmax(
      jnp.asarray(student_logits, jnp.float32) * _inverse(student_temperature), axis=-1)
  # (V_t, V_s): each pair's cross-entropy averaged over the batch. Full float32 products, as in _similarities:
  # with tau_t = 0.04 the teacher's probabilities are sharp and K is large (65,536).
  cross_entropy = -jnp.einsum("abk,vbk->av", teacher_probs, student_log_probs,
                              precision=jax.lax.Precision.HIGHEST) / teacher_logits.shape[1]
  num_teacher_crops, num_student_crops = cross_entropy.shape
  other_crop = jnp.arange(num_student_crops) != jnp.arange(num_teacher_crops)[:, None]
  loss = jnp.sum(jnp.where(other_crop, cross_entropy, 0.0)) / (num_teacher_crops * (num_student_crops - 1))
  teacher_entropy = -jnp.mean(jnp.sum(teacher_probs * teacher_log_probs, axis=-1))
  # Every teacher crop meets the same number of student crops (V_s - 1), so the pairs' mean entropy is the
  # teacher's mean entropy and the mean KL is exactly their difference.
  return DinoLoss(loss, teacher_entropy, loss - teacher_entropy)


def dino_center_update(center, teacher_logits, momentum):
  """DINO's centre: ``c <- m c + (1 - m) mean_{a, b} t_{a, b}``, the EMA of the raw teacher logits.

  The mean runs over every teacher crop ``a`` and every image ``b`` of the global batch: the reference
  all-reduces the per-GPU sums and divides by the global count; under ``jax.jit`` the plain mean over the global
  array is that mean, however the batch is sharded. The result never carries a gradient.

  Args:
    center: ``(K,)`` or ``(1, K)``; the result has the same shape, in float32.
    teacher_logits: ``(V_t, B, K)`` teacher head outputs, before centring.
    momentum: ``m`` in ``[0, 1)`` (DINO: 0.9); a Python number or a traced scalar.

  Returns:
    The new centre.
  """
  if teacher_logits.ndim != 3:
    raise ValueError(f"teacher_logits must be (V_t, B, K); got {teacher_logits.shape}")
  _check_center(center, teacher_logits)
  if not isinstance(momentum, jax.core.Tracer) and not 0 <= float(momentum) < 1:
    raise ValueError(f"momentum must be in [0, 1); got {momentum}")
  batch_center = jnp.mean(jnp.asarray(teacher_logits, jnp.float32), axis=(0, 1))
  momentum = jnp.asarray(momentum, jnp.float32)
  center = jnp.asarray(center, jnp.float32)
  return jax.lax.stop_gradient(momentum * center + (1 - momentum) * batch_center.reshape(center.shape))


def teacher_temperature_schedule(step, *, warmup_from, final, warmup_steps):
  """DINO's teacher temperature: ``warmup_from + (final - warmup_from) min(step / warmup_steps, 1)``.

  A linear warm-up then constant (DINO's ViT recipes: 0.04 -> 0.07 over 30 epochs), a pure jittable function of
  the step (`sslx.schedules.linear_warmup`). The reference steps it once per epoch with ``linspace``, reaching
  ``final`` at epoch ``warmup - 1``; this ramp moves every step and reaches it at ``warmup_steps``.
  """
  for name, value in (("warmup_from", warmup_from), ("final", final)):
    _check_temperature(value, name)
  if not isinstance(warmup_steps, jax.core.Tracer) and warmup_steps < 0:
    raise ValueError(f"warmup_steps must be >= 0; got {warmup_steps}")
  return schedules.linear_warmup(step, warmup_steps, warmup_from, final)


def mocov3_loss(q1, q2, k1, k2, *, temperature,
                mesh: Optional[Union[Mesh, AbstractMesh]] = None) -> ContrastiveLoss:
  """MoCo v3's symmetrised InfoNCE: ``2 t (info_nce(q1, k2) + info_nce(q2, k1))``.

  Each view's queries against the momentum encoder's keys of the other view, the positives on the diagonal of
  the global batch and every other key of the global batch a negative (`info_nce`). The ``2 t`` factor
  multiplies each term and the two terms are summed, as facebookresearch/moco-v3 does (``ctr_loss(...) * 2T``
  per direction, ``l1 + l2``): it cancels the ``1/t`` that the logits put into the gradient wrt the cosines.
  Keys pass through ``stop_gradient``: the momentum encoder gets no gradient. Under a mesh each device builds
  only its rows of the logits, as in `info_nce`.

  Args:
    q1, q2: ``(B, D)`` predictor outputs for the first and second views.
    k1, k2: ``(B, D)`` momentum encoder outputs for the first and second views.
    temperature: ``t > 0`` (MoCo v3: 0.2 for ViT, 1.0 for ResNet).
    mesh: the mesh to split the batch over; defaults to the current one (``jax.set_mesh``).

  Returns:
    `ContrastiveLoss`: ``loss`` as above, ``per_example`` the same combination per row, ``accuracy`` the mean
    over both directions.
  """
  _check_pair("q1", q1, "q2", q2)
  _check_pair("k1", k1, "k2", k2)
  _check_pair("q1", q1, "k1", k1)
  k1, k2 = jax.lax.stop_gradient((k1, k2))
  first = info_nce(q1, k2, temperature=temperature, mesh=mesh)
  second = info_nce(q2, k1, temperature=temperature, mesh=mesh)
  scale = 2 * jnp.asarray(temperature, jnp.float32)
  return ContrastiveLoss(scale * (first.loss + second.loss), scale * (first.per_example + second.per_example),
                         (first.accuracy + second.accuracy) / 2)


def _check_dino_logits(student_logits, teacher_logits) -> None:
  if student_logits.ndim != 3:
    raise ValueError(f"student_logits must be (V_s, B, K); got {student_logits.shape}")
  if teacher_logits.ndim != 3 or teacher_logits.shape[1:] != student_logits.shape[1:]:
    raise ValueError(f"teacher_logits must be (V_t, B, K) with the student's B and K "
                     f"{student_logits.shape[1:]}; got {teacher_logits.shape}")
  if student_logits.shape[0] < max(2, teacher_logits.shape[0]):
    raise ValueError(f"student_logits must hold at least 2 crops, the teacher's {teacher_logits.shape[0]} "
                     f"global crops first; got {student_logits.shape[0]}")


def _check_center(center, teacher_logits) -> None:
  num_classes = teacher_logits.shape[-1]
  if center.shape not in ((num_classes,), (1, num_classes)):
    raise ValueError(f"center must be ({num_classes},) or (1, {num_classes}) like the logits' last axis; "
                     f"got {center.shape}")
