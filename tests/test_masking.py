import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslx import masking


@pytest.mark.parametrize("num_patches,ratio", [(16, 0.75), (196, 0.75), (10, 0.33), (49, 0.6)])
def test_keeps_the_lowest_noise_patches(num_patches, ratio):
  noise = np.random.RandomState(num_patches).rand(3, num_patches).astype(np.float32)
  ids_keep, mask, ids_restore = jax.jit(masking.random_masking, static_argnums=1)(noise, ratio)
  len_keep = int(num_patches * (1 - ratio))
  assert ids_keep.shape == (3, len_keep)
  assert mask.shape == ids_restore.shape == (3, num_patches)
  np.testing.assert_array_equal(np.sum(mask, axis=1), num_patches - len_keep)
  for b in range(3):
    ids_shuffle = np.argsort(noise[b])
    np.testing.assert_array_equal(np.asarray(ids_keep[b]), ids_shuffle[:len_keep])
    expected_mask = np.ones(num_patches)
    expected_mask[ids_shuffle[:len_keep]] = 0
    np.testing.assert_array_equal(np.asarray(mask[b]), expected_mask)
    # ids_restore is the inverse permutation of the shuffle.
    np.testing.assert_array_equal(ids_shuffle[np.asarray(ids_restore[b])], np.arange(num_patches))


def test_uniform_noise():
  noise = masking.uniform_noise(jax.random.key(0), 4, 16)
  assert noise.shape == (4, 16) and noise.dtype == jnp.float32
  assert 0 <= float(noise.min()) and float(noise.max()) < 1
  assert not np.allclose(noise, masking.uniform_noise(jax.random.key(1), 4, 16))


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_rejects_ratio_outside_open_interval(ratio):
  with pytest.raises(ValueError, match="mask_ratio"):
    masking.random_masking(jnp.zeros((1, 16)), ratio)


def test_rejects_ratio_leaving_nothing_visible():
  with pytest.raises(ValueError, match="no visible patch"):
    masking.random_masking(jnp.zeros((1, 4)), 0.9)
