"""A learned position table resized to another patch grid, so one ViT encodes crops of several sizes.

DINO trains one encoder on 224 px global crops and 96 px local crops: with patch 16, grids of 14 x 14 and
6 x 6. A learned table holds one row per patch of the grid it was created for (``n_r x n_c``, row-major);
`resize_pos_table` treats each of its ``D`` channels as an ``n_r x n_c`` image and resamples it bicubically
to the grid of the crop at hand, as DINO's ``interpolate_pos_encoding`` does (torch's
``interpolate(mode='bicubic')``: half-pixel centres, no antialiasing). Along one axis, ``n -> m``:

  out[i] = sum_{j = f-1}^{f+2} w(s_i - j) in[clamp(j, 0, n - 1)],   s_i = (i + 1/2) n / m - 1/2,  f = floor(s_i)

with Keys' cubic kernel at torch's ``a = -0.75``:

  w(t) = (a + 2)|t|^3 - (a + 3)|t|^2 + 1     for |t| <= 1
       = a|t|^3 - 5a|t|^2 + 8a|t| - 4a         for 1 < |t| < 2,   else 0.

The two axes are separable, so the resized table is ``M_r T M_c^T`` over the grid, with ``(m, n)`` matrices built
in numpy from the static shapes. Each row of ``M`` sums to 1 (clamping at the border only moves weight between
taps), so a constant table stays constant; at ``a = -0.75`` a linear ramp comes out bent by up to ~5% of one
step (``a = -0.5`` would keep it exact, but is not what DINO's checkpoints were trained with).

DINO passes torch a scale factor ``(m + 0.1) / n`` rather than the size ``m`` (to dodge a rounding of the output
size), which places its samples at ``(i + 1/2) n / (m + 0.1) - 1/2``: within 0.1 patch of these. The table on
the grid it was created for is returned as it is, bit for bit, and its parameter keeps its shape, so
checkpoints do not depend on the crop sizes a run trains with.

Crops of different sizes make token sequences of different lengths, so a method encodes them as one encoder
call per resolution group (DINO: the global crops together, then the local crops together), each call
resizing the table for its own grid.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

CUBIC_A = -0.75  # torch's bicubic, which DINO's tables were trained under


def cubic_weight(t: np.ndarray, a: float = CUBIC_A) -> np.ndarray:
  """Keys' cubic convolution kernel ``w(t)`` (module docstring)."""
  t = np.abs(t)
  near = ((a + 2) * t - (a + 3)) * t * t + 1
  far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
  return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
  """The ``(size_out, size_in)`` float64 matrix that resamples one axis bicubically (module docstring)."""
  source = (np.arange(size_out) + 0.5) * size_in / size_out - 0.5
  floor = np.floor(source)
  matrix = np.zeros((size_out, size_in))
  for offset in (-1, 0, 1, 2):
    taps = floor + offset
    # Taps beyond the border read the border value, as torch's bicubic does: their weight lands on it.
    np.add.at(matrix, (np.arange(size_out), np.clip(taps, 0, size_in - 1).astype(int)),
              cubic_weight(source - taps))
  return matrix


def square_grid(rows: int) -> tuple[int, int]:
  """``(n, n)`` for a table of ``n * n`` rows; a ValueError otherwise."""
  side = math.isqrt(rows)
  if side * side != rows:
    raise ValueError(f"A learned position table of {rows} rows is not a square patch grid, so it cannot be "
                     "resized to another grid; pass its source_grid")
  return side, side


def resize_pos_table(table: jax.Array, grid: Sequence[int], source_grid: Optional[Sequence[int]] = None):
  """The position table ``(n_r * n_c, D)`` of ``source_grid`` resampled to ``grid`` (module docstring).

  Args:
    table: ``(n_r * n_c, D)``, row-major over the grid it was created for (no class-token row).
    grid: ``(rows, cols)`` of the patches to embed.
    source_grid: ``(n_r, n_c)``; None: the square grid of the table's rows (sslx images are square), unless
      the table already has one row per patch of ``grid``.

  Returns:
    ``(rows * cols, D)`` in the table's dtype; ``table`` itself on its own grid.
  """
  rows, cols = grid
  if source_grid is None:
    source_grid = tuple(grid) if table.shape[0] == rows * cols else square_grid(table.shape[0])
  n_r, n_c = source_grid
  if n_r * n_c != table.shape[0]:
    raise ValueError(f"source_grid {tuple(source_grid)} does not hold the table's {table.shape[0]} rows")
  if (n_r, n_c) == (rows, cols):
    return table
  m_r = jnp.asarray(bicubic_matrix(n_r, rows), jnp.float32)
  m_c = jnp.asarray(bicubic_matrix(n_c, cols), jnp.float32)
  image = table.astype(jnp.float32).reshape(n_r, n_c, -1)
  # HIGHEST: a GPU would otherwise multiply these float32 matrices in TF32 (10-bit mantissas).
  resized = jnp.einsum("ia,jb,abd->ijd", m_r, m_c, image, precision=jax.lax.Precision.HIGHEST)
  return resized.reshape(rows * cols, -1).astype(table.dtype)


def sincos_pos_embed_2d(embed_dim: int, grid_size: Union[int, Sequence[int]],
                        cls_token: bool = False) -> np.ndarray:
  """Fixed 2-D sine-cosine position table, laid out as in the reference MAE code.

  For the patch in row ``r`` and column ``c`` (row-major order) the vector is
  ``[sin(c w), cos(c w), sin(r w), cos(r w)]`` with ``w_k = 1 / 10000^(k / (D/4))``, ``k < D/4``: the
  reference builds its grid with ``meshgrid(w, h)``, so the column encoding comes first.

  Args:
    embed_dim: ``D``, a multiple of 4.
    grid_size: patch grid side, or ``(rows, cols)``.
    cls_token: prepend a row of zeros for the class token.

  Returns:
    float32 array ``(rows * cols [+ 1], D)``.
  """
  if embed_dim % 4:
    raise ValueError(f"Sine-cosine position embeddings need a width divisible by 4, got {embed_dim}.")
  rows, cols = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
  quarter = embed_dim // 4
  omega = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
  row, col = np.meshgrid(np.arange(rows, dtype=np.float64), np.arange(cols, dtype=np.float64),
                         indexing="ij")
  col_angles = np.outer(col.reshape(-1), omega)
  row_angles = np.outer(row.reshape(-1), omega)
  table = np.concatenate([np.sin(col_angles), np.cos(col_angles), np.sin(row_angles),
                          np.cos(row_angles)], axis=1)
  if cls_token:
    table = np.concatenate([np.zeros((1, embed_dim)), table], axis=0)
  return table.astype(np.float32)
