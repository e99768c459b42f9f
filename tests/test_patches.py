import numpy as np
import pytest

from sslx.models.patches import patchify
from sslx.models.patches import unpatchify


def _images(shape, seed=0):
  return np.random.RandomState(seed).randn(*shape).astype(np.float32)


def test_patchify_layout_row_major_patches_then_row_col_channel():
  p = 4
  images = _images((2, 8, 12, 3))
  patches = np.asarray(patchify(images, p))
  assert patches.shape == (2, 6, p * p * 3)
  for b in range(2):
    for r in range(2):
      for c in range(3):
        block = images[b, r * p:(r + 1) * p, c * p:(c + 1) * p, :]
        for i in range(p):
          for j in range(p):
            for ch in range(3):
              assert patches[b, r * 3 + c, (i * p + j) * 3 + ch] == block[i, j, ch]


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 8, 12, 1), (3, 16, 4, 2)])
def test_unpatchify_inverts_patchify(shape):
  images = _images(shape)
  restored = unpatchify(patchify(images, 4), 4, shape[1:3], shape[3])
  np.testing.assert_array_equal(np.asarray(restored), images)


def test_unpatchify_infers_square_grid_and_channels():
  images = _images((2, 12, 12, 3))
  np.testing.assert_array_equal(np.asarray(unpatchify(patchify(images, 4), 4)), images)


def test_patchify_rejects_indivisible_images():
  with pytest.raises(ValueError, match="not divisible by patch size 8"):
    patchify(np.zeros((1, 28, 32, 1)), 8)


def test_unpatchify_rejects_inconsistent_shapes():
  patches = np.zeros((1, 6, 48))
  with pytest.raises(ValueError, match="do not tile"):
    unpatchify(patches, 4, (8, 8))
  with pytest.raises(ValueError, match="channels"):
    unpatchify(patches, 4, (8, 12), channels=2)
