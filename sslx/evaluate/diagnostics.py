"""Label-free health checks of an embedding ``Z`` ``(N, D)``: collapse, effective rank, alignment, uniformity.

All functions are pure ``jnp`` (jittable) and L2-normalise rows first where the definition lives on the
unit sphere: ``f(x) = z / ||z||``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sslx.numerics import NORM_EPS
from sslx.numerics import l2_normalize


def embedding_std(z: jax.Array, *, collapse_fraction: float = 0.1) -> dict:
  """Per-dimension standard deviation of the L2-normalised embeddings (SimSiam's collapse monitor).

  For embeddings spread isotropically on the sphere each coordinate has std ``~ 1/sqrt(D)``; a collapsed
  encoder (every input mapped to one point) has std 0.

  Returns:
    dict with ``per_dim_std`` ``(D,)``, ``mean_std`` and ``collapsed``
    (``mean_std < collapse_fraction / sqrt(D)``).
  """
  per_dim_std = jnp.std(l2_normalize(z), axis=0)
  mean_std = jnp.mean(per_dim_std)
  return dict(per_dim_std=per_dim_std, mean_std=mean_std,
              collapsed=mean_std < collapse_fraction / jnp.sqrt(per_dim_std.shape[0]))


def rankme(z: jax.Array, *, eps: float = 1e-7) -> jax.Array:
  """RankMe effective rank (Garrido et al., 2023) of the raw (un-normalised, uncentred) embeddings.

    p_k = sigma_k(Z) / ||sigma(Z)||_1 + eps,   RankMe(Z) = exp(-sum_k p_k log p_k),

  over the ``min(N, D)`` singular values; it is ``r`` for a rank-``r`` matrix with equal singular values.
  """
  sigma = jnp.linalg.svd(jnp.asarray(z, jnp.float32), compute_uv=False)
  p = sigma / jnp.maximum(jnp.sum(sigma), NORM_EPS) + eps
  return jnp.exp(-jnp.sum(p * jnp.log(p)))


def alignment(z: jax.Array, z_positive: jax.Array, *, alpha: float = 2.0) -> jax.Array:
  """Alignment (Wang & Isola, 2020): ``E ||f(x) - f(x+)||_2^alpha`` over positive pairs (rows)."""
  distance = jnp.linalg.norm(l2_normalize(z) - l2_normalize(z_positive), axis=-1)
  return jnp.mean(distance ** alpha)


def uniformity(z: jax.Array, *, t: float = 2.0) -> jax.Array:
  """Uniformity (Wang & Isola, 2020): ``log E_{i<j} exp(-t ||f(x_i) - f(x_j)||_2^2)``.

  Uses the Gram matrix, so memory is ``O(N^2)``: subsample large sets (a few thousand rows suffice).
  """
  f = l2_normalize(z)
  n = f.shape[0]
  # ||a - b||^2 = 2 - 2 <a, b> on the unit sphere; clip the rounding below zero.
  sq_dist = jnp.maximum(2.0 - 2.0 * (f @ f.T), 0.0)
  upper = jnp.triu(jnp.ones((n, n), bool), k=1)
  logits = jnp.where(upper, -t * sq_dist, -jnp.inf)
  return jax.nn.logsumexp(logits) - jnp.log(n * (n - 1) / 2)


@jax.jit
def _scalars(z: jax.Array) -> dict[str, jax.Array]:
  std = embedding_std(z)
  return dict(std=std["mean_std"], collapsed=std["collapsed"], rankme=rankme(z), uniformity=uniformity(z))


_alignment = jax.jit(alignment)


def summary(z: jax.Array, z_positive: jax.Array | None = None) -> dict[str, float]:
  """Scalar diagnostics for logging: ``std``, ``collapsed``, ``rankme``, ``uniformity`` and, given
  positives (a second view of the same inputs), ``alignment``."""
  # One compiled program for all of them: op by op, each new feature shape compiled a dozen small ones.
  out = {name: float(value) for name, value in _scalars(z).items()}
  if z_positive is not None:
    out["alignment"] = float(_alignment(z, z_positive))
  return out
