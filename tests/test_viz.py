import numpy as np
from PIL import Image

from sslx import viz


def test_denormalize_inverts_normalization():
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(2, 4, 4, 3)).astype(np.float32)
  mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
  normalized = (images - np.array(mean)) / np.array(std)
  np.testing.assert_allclose(viz.denormalize(normalized, mean, std), images, atol=1e-6)


def test_grid_places_each_tile(tmp_path):
  rows = {"a": np.zeros((3, 28, 28, 1)), "b": np.ones((3, 28, 28, 1))}
  path = viz.save_image_grid(str(tmp_path / "g.png"), rows, min_tile=56, pad=2)
  grid = np.asarray(Image.open(path))
  assert grid.shape == (2 * (56 + 2) + 2, 3 * (56 + 2) + 2, 3)
  assert (grid[2:58, 2:58] == 0).all()           # row a, column 0: black, enlarged 2x
  assert (grid[60:116, 60:116] == 255).all()     # row b, column 1: white
  assert (grid[0, :] == 255).all()               # padding
