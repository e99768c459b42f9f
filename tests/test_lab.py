"""CIE Lab conversion (`sslx.pretext.lab`) against scikit-image's ``rgb2lab`` / ``lab2rgb`` (float64).

Tolerances: our conversion runs in float32, whose relative precision (6e-8) on L, a, b of up to ~100 and the
cube root's amplification near black leaves about 1e-5 of error; 1e-4 on Lab and 1e-5 on RGB in [0, 1] bound
it with margin, and are far below a Lab unit (a just-noticeable difference is ~1).
"""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from skimage import color

from sslx.pretext.lab import lab_to_rgb, rgb_to_lab

RNG = np.random.default_rng(0)
# The sRGB companding threshold 0.04045 from both sides, black, white, the primaries and secondaries.
EDGE_LEVELS = [0.0, 0.04045 - 1e-6, 0.04045 + 1e-6, 0.5, 1.0]
EDGES = np.stack(np.meshgrid(*[EDGE_LEVELS] * 3, indexing="ij"), -1).reshape(-1, 3)
COLOURS = np.concatenate([RNG.random((2000, 3)), EDGES, RNG.random((50, 3)) * 0.01])


def test_rgb_to_lab_matches_scikit_image():
  ours = np.asarray(jax.jit(rgb_to_lab)(jnp.asarray(COLOURS, jnp.float32)))
  np.testing.assert_allclose(ours, color.rgb2lab(COLOURS), atol=1e-4)
  assert ours[..., 0].min() >= -1e-4 and ours[..., 0].max() <= 100 + 1e-4


def test_lab_to_rgb_matches_scikit_image_including_out_of_gamut_clipping():
  lab = np.stack([RNG.uniform(0, 100, 3000), RNG.uniform(-128, 128, 3000), RNG.uniform(-128, 128, 3000)], -1)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # scikit-image warns about the negative z it clips, as we clip it
    expected = color.lab2rgb(lab)
  ours = np.asarray(jax.jit(lab_to_rgb)(jnp.asarray(lab, jnp.float32)))
  np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_round_trip_and_batch_shapes():
  images = COLOURS[:2048].reshape(2, 32, 32, 3).astype(np.float32)
  back = np.asarray(lab_to_rgb(rgb_to_lab(images)))
  assert back.shape == images.shape
  np.testing.assert_allclose(back, images, atol=1e-5)


def test_gradients_are_finite_at_black_and_at_the_thresholds():
  grads = jax.grad(lambda x: jnp.sum(rgb_to_lab(x)))(jnp.asarray(EDGES, jnp.float32))
  assert np.all(np.isfinite(grads))
  back = jax.grad(lambda x: jnp.sum(lab_to_rgb(x)))(rgb_to_lab(jnp.asarray(EDGES, jnp.float32)))
  assert np.all(np.isfinite(back))
