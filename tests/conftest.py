"""Shared test helpers: tiny configs that build and run in well under a second on CPU."""
import os

import ml_collections
import numpy as np
import pytest

# Tests run tiny graphs once, so XLA's optimisation passes cost more than they save: skipping them
# halves compile time. Must be set before JAX starts its backend, i.e. before any test runs.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()

# Dozens of tests start runs in subprocesses that compile the same tiny programs. JAX's persistent compilation
# cache, which this environment hands on to every child, compiles each program once per suite run (a fresh
# clone starts empty). It is left unbounded: with a size bound JAX rescans the whole directory under a file
# lock on every write, which cost a tiny CLI run 20 of its 65 s once the suite had cached ~2000 programs. An
# entry read while another process is still writing it fails to decompress; JAX then warns and compiles.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_REPO, ".pytest_cache", "jax_compilation_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# Jigsaw's permutation sets are cached under $SSLX_CACHE_DIR (default ~/.cache/sslx); the suite, its CLI
# subprocesses included, keeps them inside the checkout instead of the user's home.
os.environ["SSLX_CACHE_DIR"] = os.path.join(_REPO, ".pytest_cache", "sslx_cache")


def tiny_mae_config() -> ml_collections.ConfigDict:
  """An MAE config for 32x32 RGB images: patch 8 (16 patches), width 32, 2 + 1 blocks."""
  config = ml_collections.ConfigDict()
  config.method = ml_collections.ConfigDict(dict(
      name="mae", mask_ratio=0.75, norm_pix_loss=True, decoder=dict(width=16, depth=1, num_heads=2, mlp_dim=32)))
  config.model = ml_collections.ConfigDict(dict(
      name="vit", variant="Ti/8", width=32, depth=2, num_heads=2, mlp_dim=64, pos_embed="sincos", pooling="cls",
      drop_path_rate=0.1, layer_norm_eps=1e-6, dtype="float32"))
  config.data = ml_collections.ConfigDict(dict(image_size=32, channels=3))
  return config


@pytest.fixture
def mae_config() -> ml_collections.ConfigDict:
  return tiny_mae_config()


def assert_same_batches(a, b):
  """Two lists of batches hold the same keys and bit-identical arrays."""
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
