"""The shared array helpers against numpy."""
import numpy as np

from sslx import numerics


def test_l2_normalize_gives_unit_rows_and_keeps_zero_rows_zero():
  x = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
  x[2] = 0.0
  out = np.asarray(numerics.l2_normalize(x))
  expected = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
  np.testing.assert_allclose(out, expected, rtol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(out[[0, 1, 3, 4]], axis=1), 1.0, rtol=1e-6)
  assert not out[2].any() and out.dtype == np.float32


def test_pad_rows_appends_fill_rows_only_when_short():
  x = np.arange(6, dtype=np.int32).reshape(3, 2)
  padded = numerics.pad_rows(x, 5, fill=-1)
  np.testing.assert_array_equal(padded, [[0, 1], [2, 3], [4, 5], [-1, -1], [-1, -1]])
  assert numerics.pad_rows(x, 3) is x and numerics.pad_rows(x, 2) is x
