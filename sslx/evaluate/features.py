"""Frozen-encoder feature extraction for kNN, linear probes and diagnostics.

Features come from a method's `Method.embed` ``(variables, method_state, images) -> (B, D)``: its
encoder in evaluation mode (no drop path, no masking, BatchNorm's running averages), pooled as
``config.model.pooling`` says (`sslx.models`: ``aux['pooled']``).

With several processes each one reads only its share of the split and the encoder runs once over the
global batch on the mesh; every process gets back all features, in the split's order. The pooled
features of each batch are replicated as they leave the jitted function (an all-gather of ``B x D``
values), so device memory stays ``O(B x D)`` whatever the split's size, and the whole ``N x D`` bank
(ImageNet with ViT-B: 1.28M x 768 float32 = 3.9 GB; twice that at the peak, while it is put in the
split's order) lives only in host memory, once per process. Gathering the bank at the end instead
(``process_allgather``) would put all of it on every device.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from sslx import parallel
from sslx import xla_options
from sslx.numerics import pad_rows


def _embed(state, images, ids, labels, *, embed, out_sharding):
  """Float32 features of a global batch, replicated on leaving with the rows' example ids and labels.

  Ids and labels travel in global arrays sharded like the images, so every process gets its rows back
  aligned, whatever order the mesh lays the processes' shards in. Compiled once per (``embed`` object,
  mesh, shapes), so later calls with the same ``embed`` reuse the program.
  """
  variables, method_state = state
  features = embed(variables, method_state, images).astype(jnp.float32)
  return jax.lax.with_sharding_constraint((features, ids, labels), out_sharding)


@functools.cache
def _embed_program():
  """`_embed` compiled with `sslx.xla_options`, built at first use (the options depend on the backend)."""
  return xla_options.jit(_embed, static_argnames=("embed", "out_sharding"))


def _default_device_mesh() -> Mesh:
  """A one-device mesh on this process's first device: the mesh-free call of a single process."""
  if jax.process_count() > 1:
    raise ValueError(f"extract_features needs mesh= when running as one of {jax.process_count()} processes "
                     "(e.g. sslx.parallel.create_mesh(1)).")
  return Mesh(np.array(jax.local_devices()[:1]).reshape(1, 1), parallel.DATA_AXES)


def extract_features(embed: Callable[..., Any], state: Any, batches: Iterable[dict], *,
                     mesh: Optional[Mesh] = None) -> tuple[np.ndarray, np.ndarray]:
  """Runs the frozen encoder over ``batches`` and keeps the real (unpadded) rows.

  Args:
    embed: a `Method.embed`, called as ``embed(variables, method_state, images)`` -> ``(B, D)``.
    state: ``(variables, method_state)``; replicated over ``mesh`` here unless already so.
    batches: THIS process's batches: dicts with ``'image'`` ``(b, H, W, C)``, ``'label'`` ``(b,)`` and
      optionally a boolean ``'mask'`` ``(b,)`` marking real examples (absent: all real), as from
      ``sslx.data.pipeline.make_eval_loader``. With ``P`` processes, process ``p`` must hold examples
      ``p, p + P, p + 2P, ...`` of the split (the loader's sharding, given ``jax.process_index()`` and
      ``jax.process_count()``) and every process must yield the same number of equally sized
      batches, since each batch is one collective computation. Each new batch shape compiles again.
    mesh: the ``('data', 'fsdp')`` mesh whose devices split each global batch (e.g.
      ``parallel.create_mesh(1)``); required with several processes. None: this process's first device.
      A batch that does not split evenly over the local devices is padded with masked rows.

  Returns:
    ``(features, labels)``: float32 ``(N, D)`` and ``(N,)`` numpy arrays of the masked-in rows of all
    processes, in the split's order; the same on every process.
  """
  mesh = _default_device_mesh() if mesh is None else mesh
  rows, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
  state = jax.device_put(state, replicated)
  num_local_devices = len(mesh.local_devices)
  process_index, process_count = jax.process_index(), jax.process_count()

  features, ids, labels = [], [], []
  label_dtype = None

  def keep(result):
    embedded, example_ids, example_labels = (np.asarray(x) for x in result)
    real = example_ids >= 0
    features.append(embedded[real])
    ids.append(example_ids[real])
    labels.append(example_labels[real])

  pending = None
  local_rows_seen = 0
  for batch in batches:
    images, batch_labels = np.asarray(batch["image"]), np.asarray(batch["label"])
    label_dtype = batch_labels.dtype
    size = len(batch_labels)
    mask = np.asarray(batch.get("mask", np.ones(size, bool)), bool)
    # Process p's local row r is example r * P + p of the split (the loader's sharding); -1: not real.
    example_ids = np.where(mask, (local_rows_seen + np.arange(size)) * process_count + process_index, -1)
    local_rows_seen += size
    padded = -(-size // num_local_devices) * num_local_devices
    local = (pad_rows(images, padded), pad_rows(example_ids.astype(np.int32), padded, fill=-1),
             pad_rows(batch_labels.astype(np.int32), padded))
    # Dispatch this batch before copying the previous result to the host, so the device keeps working
    # while the host waits and loads the next batch.
    current = _embed_program()(state, *(jax.make_array_from_process_local_data(rows, x) for x in local),
                                 embed=embed, out_sharding=replicated)
    if pending is not None:
      keep(pending)
    pending = current
  if pending is None:
    raise ValueError("extract_features got no batches.")
  keep(pending)
  order = np.argsort(np.concatenate(ids), kind="stable")
  unordered = np.concatenate(features)
  features.clear()  # the per-batch copies go before the ordered one comes: host peak 2 x N x D floats
  return unordered[order], np.concatenate(labels)[order].astype(label_dtype)
