"""Weighted k-nearest-neighbour classification of frozen features (Caron et al., 2021, DINO).

Features are L2-normalised, so similarity is cosine similarity ``s = <q, b> / (||q|| ||b||)``. Each
query's ``k`` most similar training examples vote for their labels with weight ``exp(s / T)``:

  score_c(q) = sum_{j in topk(q)} exp(s_j / T) [y_j = c],   prediction = argmax_c score_c(q).

Memory stays ``O(query_chunk * (bank_chunk + k))``: queries go in chunks and, for each, the bank is
scanned chunk by chunk while a running top-k is merged with each chunk's similarities. The full
``N_test x N_train`` similarity matrix is never formed.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sslx.numerics import l2_normalize
from sslx.numerics import pad_rows


def _pad_to_multiple(x: np.ndarray, multiple: int) -> np.ndarray:
  return pad_rows(x, -(-len(x) // multiple) * multiple)


@functools.partial(jax.jit, static_argnames=("k",))
def _search_chunked(bank: jax.Array, num_bank: jax.Array, queries: jax.Array, *, k: int):
  """bank ``(num_bank_chunks, bank_chunk, D)``, queries ``(num_query_chunks, query_chunk, D)``."""
  bank = l2_normalize(bank)
  bank_chunk = bank.shape[1]
  offsets = jnp.arange(bank.shape[0]) * bank_chunk

  def one_query_chunk(q):
    q = l2_normalize(q)
    init = (jnp.full((q.shape[0], k), -jnp.inf, jnp.float32), jnp.zeros((q.shape[0], k), jnp.int32))

    def merge(best, chunk_and_offset):
      chunk, offset = chunk_and_offset
      index = offset + jnp.arange(bank_chunk, dtype=jnp.int32)
      # Padding rows get -inf, so any real row (similarity >= -1) outranks them; k <= num_bank
      # guarantees k real rows exist.
      sim = jnp.where(index < num_bank, q @ chunk.T, -jnp.inf)
      sims = jnp.concatenate([best[0], sim], axis=1)
      ids = jnp.concatenate([best[1], jnp.broadcast_to(index, sim.shape)], axis=1)
      top_sims, pos = jax.lax.top_k(sims, k)
      return (top_sims, jnp.take_along_axis(ids, pos, axis=1)), None

    best, _ = jax.lax.scan(merge, init, (bank, offsets))
    return best

  return jax.lax.map(one_query_chunk, queries)


def knn_search(bank: np.ndarray, queries: np.ndarray, *, k: int, query_chunk: int = 512,
               bank_chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-``k`` cosine neighbours of every query in ``bank``.

  Args:
    bank: ``(N_bank, D)`` features (any scale; they are L2-normalised here).
    queries: ``(N_query, D)`` features.
    k: neighbours per query, ``1 <= k <= N_bank``.
    query_chunk, bank_chunk: static tile sizes; the last tiles are zero-padded and padded bank rows are
      never returned. Larger tiles are faster and use ``O(query_chunk * (bank_chunk + k))`` memory.

  Returns:
    ``(similarities, indices)``, both ``(N_query, k)``, sorted by decreasing similarity.
  """
  bank, queries = np.asarray(bank, np.float32), np.asarray(queries, np.float32)
  if bank.ndim != 2 or queries.ndim != 2 or bank.shape[1] != queries.shape[1]:
    raise ValueError(f"Expected (N, D) bank and queries with the same D; got {bank.shape} and "
                     f"{queries.shape}.")
  if not 1 <= k <= len(bank):
    raise ValueError(f"k={k} must be between 1 and the bank size {len(bank)}.")
  if query_chunk < 1 or bank_chunk < 1:
    raise ValueError(f"Chunk sizes must be positive; got query_chunk={query_chunk}, "
                     f"bank_chunk={bank_chunk}.")
  num_query = len(queries)
  # Tiles larger than the data would only add padding.
  query_chunk, bank_chunk = min(query_chunk, max(num_query, 1)), min(bank_chunk, len(bank))
  tiled_bank = _pad_to_multiple(bank, bank_chunk).reshape(-1, bank_chunk, bank.shape[1])
  tiled_queries = _pad_to_multiple(queries, query_chunk).reshape(-1, query_chunk, queries.shape[1])
  sims, ids = _search_chunked(tiled_bank, jnp.int32(len(bank)), tiled_queries, k=k)
  return (np.asarray(sims).reshape(-1, k)[:num_query], np.asarray(ids).reshape(-1, k)[:num_query])


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _vote(similarities, neighbor_labels, temperature, *, num_classes: int):
  weights = jnp.exp(similarities / temperature)
  rows = jnp.arange(similarities.shape[0])[:, None]
  return jnp.zeros((similarities.shape[0], num_classes), jnp.float32).at[rows, neighbor_labels].add(weights)


def knn_vote(similarities: np.ndarray, neighbor_labels: np.ndarray, num_classes: int, *,
             temperature: float = 0.07) -> np.ndarray:
  """Class scores ``score_c = sum_j exp(s_j / T) [y_j = c]`` over each query's neighbours, ``(N, C)``."""
  return np.asarray(_vote(jnp.asarray(similarities, jnp.float32), jnp.asarray(neighbor_labels, jnp.int32),
                          jnp.float32(temperature), num_classes=num_classes))


def _check_labels(labels: np.ndarray, num_classes: int, name: str) -> np.ndarray:
  labels = np.asarray(labels)
  # Out-of-range labels (e.g. the -1 of padding rows) would silently wrap around in the scatter.
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"{name} must lie in [0, {num_classes}); got range [{labels.min()}, {labels.max()}].")
  return labels


def knn_classify(train_feats, train_labels, test_feats, num_classes: int, *, k: int = 20,
                 temperature: float = 0.07, query_chunk: int = 512,
                 bank_chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
  """Weighted kNN predictions of ``test_feats`` from the labelled bank ``train_feats``.

  Returns:
    ``(predictions, scores)``: int ``(N_test,)`` argmax classes (lowest class on a tie) and float32
    ``(N_test, num_classes)`` vote scores.
  """
  train_labels = _check_labels(train_labels, num_classes, "train_labels")
  sims, ids = knn_search(train_feats, test_feats, k=k, query_chunk=query_chunk, bank_chunk=bank_chunk)
  scores = knn_vote(sims, train_labels[ids], num_classes, temperature=temperature)
  return scores.argmax(axis=1), scores


def topk_correct(scores: np.ndarray, labels: np.ndarray, topk: int) -> np.ndarray:
  """Whether the true class is among the ``topk`` best-scoring classes that received any vote.

  A class without votes (score 0) is never a prediction, so with ``k`` neighbours at most ``k``
  classes can be right: DINO's ``min(5, k)`` rule for top-5 follows.
  """
  true_score = np.take_along_axis(scores, np.asarray(labels)[:, None], axis=1)
  rank = np.sum(scores > true_score, axis=1)
  return (true_score[:, 0] > 0) & (rank < topk)


def knn_accuracies(train_feats, train_labels, test_feats, test_labels, num_classes: int, *,
                   ks: Sequence[int] = (20, 200), temperature: float = 0.07, query_chunk: int = 512,
                   bank_chunk: int = 8192) -> dict[int, dict[str, float]]:
  """Top-1 / top-5 accuracy (fractions in [0, 1]) for several ``k`` from a single neighbour search.

  Returns:
    ``{k: {'top1': ..., 'top5': ...}}``.
  """
  train_labels = _check_labels(train_labels, num_classes, "train_labels")
  test_labels = _check_labels(test_labels, num_classes, "test_labels")
  sims, ids = knn_search(train_feats, test_feats, k=max(ks), query_chunk=query_chunk,
                         bank_chunk=bank_chunk)
  results = {}
  for k in ks:
    # Neighbours come sorted, so the k nearest are the first k columns of the largest search.
    scores = knn_vote(sims[:, :k], train_labels[ids[:, :k]], num_classes, temperature=temperature)
    results[k] = dict(top1=float(topk_correct(scores, test_labels, 1).mean()),
                      top5=float(topk_correct(scores, test_labels, 5).mean()))
  return results


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes: int, *, k: int = 20,
                 temperature: float = 0.07, query_chunk: int = 512,
                 bank_chunk: int = 8192) -> dict[str, float]:
  """Weighted-kNN ``{'top1': ..., 'top5': ...}`` accuracy (fractions in [0, 1])."""
  return knn_accuracies(train_feats, train_labels, test_feats, test_labels, num_classes, ks=(k,),
                        temperature=temperature, query_chunk=query_chunk, bank_chunk=bank_chunk)[k]
