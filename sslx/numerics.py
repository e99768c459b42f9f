"""Small array helpers shared by the losses, the evaluation and the monitors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NORM_EPS = 1e-12


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """``x / max(||x||_2, 1e-12)`` along ``axis``, in float32 (a zero row stays zero instead of NaN)."""
  x = jnp.asarray(x, jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), NORM_EPS)


def pad_rows(x: np.ndarray, rows: int, fill=0) -> np.ndarray:
  """``x`` with rows of ``fill`` appended up to ``rows`` rows (unchanged when it already has as many)."""
  return np.concatenate([x, np.full((rows - len(x), *x.shape[1:]), fill, x.dtype)]) if rows > len(x) else x
