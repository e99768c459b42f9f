"""Frozen-encoder feature extraction for kNN, linear probes and diagnostics.

The encoder runs in evaluation mode (``train=False``: no drop path; no masking, since no ``ids_keep``
is passed) and its ``(features, aux)`` output is pooled into one vector per image:

  'cls':  z = aux['cls_token']                      (after the final LayerNorm)
  'mean': z = (1 / L) sum_l aux['patch_tokens'][l]  (mean of the normalised patch tokens)
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from sslx import parallel

POOLINGS = ("cls", "mean")


def _pool(aux: dict, pooling: str) -> jax.Array:
  if pooling == "cls":
    return aux["cls_token"]
  return jnp.mean(aux["patch_tokens"], axis=1)


def extract_features(encoder_apply: Callable[..., Any], params: Any, batches: Iterable[dict], *,
                     pooling: str = "cls", mesh: Optional[Mesh] = None) -> tuple[np.ndarray, np.ndarray]:
  """Runs the frozen encoder over ``batches`` and keeps the real (unpadded) rows.

  Args:
    encoder_apply: a Flax ``apply`` such as ``VisionTransformer(...).apply``; it is called as
      ``encoder_apply({'params': params}, images, train=False)`` and returns ``(features, aux)``.
    params: the encoder's parameters (e.g. ``params['encoder']`` of an MAE train state).
    batches: iterable of dicts with ``'image'`` ``(B, H, W, C)``, ``'label'`` ``(B,)`` and optionally a
      boolean ``'mask'`` ``(B,)`` marking real examples (absent: all real), as from
      ``sslx.data.pipeline.make_eval_loader``. Every batch should have the same shape, or each new
      shape compiles again.
    pooling: ``'cls'`` or ``'mean'`` (see module docstring).
    mesh: if given, images are split over the ``('data', 'fsdp')`` axes of this mesh, so the batch size
      must be divisible by its size. Single-process only: every row must be addressable here.

  Returns:
    ``(features, labels)``: float32 ``(N, D)`` and ``(N,)`` numpy arrays of the masked-in rows, in order.
  """
  if pooling not in POOLINGS:
    raise ValueError(f"Unknown pooling {pooling!r}; choose one of {POOLINGS}.")

  @jax.jit
  def embed(params, images):
    _, aux = encoder_apply({"params": params}, images, train=False)
    return _pool(aux, pooling).astype(jnp.float32)

  sharding = parallel.batch_sharding(mesh) if mesh is not None else None
  features, labels = [], []

  def keep(result):
    embedded, mask, label = result
    features.append(np.asarray(embedded)[mask])
    labels.append(label[mask])

  pending = None
  for batch in batches:
    images = batch["image"]
    if sharding is not None:
      if images.shape[0] % mesh.size:
        raise ValueError(f"Batch size {images.shape[0]} is not divisible by the {mesh.size} devices of "
                         "the mesh.")
      images = jax.device_put(images, sharding)
    mask = np.asarray(batch.get("mask", np.ones(len(batch["label"]), bool)), bool)
    # Dispatch this batch before copying the previous result to the host, so the device keeps working
    # while the host waits and loads the next batch.
    current = (embed(params, images), mask, np.asarray(batch["label"]))
    if pending is not None:
      keep(pending)
    pending = current
  if pending is None:
    raise ValueError("extract_features got no batches.")
  keep(pending)
  return np.concatenate(features), np.concatenate(labels)
