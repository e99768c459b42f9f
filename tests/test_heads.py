"""Projection heads: layer shapes, where BatchNorm and ReLU sit (against a numpy forward pass),
initialisation, and config validation."""
import jax
import ml_collections
import numpy as np
import pytest

from sslx.models import heads


def _init(head_config, features, in_dim=32):
  head = heads.from_config(head_config)
  x = np.random.default_rng(0).normal(size=(features, in_dim)).astype(np.float32)
  variables = jax.tree.map(np.asarray, dict(head.init(jax.random.PRNGKey(0), x[:1], train=False)))
  return head, jax.tree.map(lambda leaf: getattr(leaf, "value", leaf), variables,
                            is_leaf=lambda leaf: hasattr(leaf, "value")), x


def _shapes(tree):
  return jax.tree.map(np.shape, tree)


def _batch_norm(x, scale, bias=0.0, eps=1e-5):
  return scale * (x - x.mean(0)) / np.sqrt(x.var(0) + eps) + bias


def test_simclr_v2_head_is_three_bias_free_layers_each_with_batch_norm():
  head, variables, x = _init(heads.simclr_v2_head(), 16)
  params = variables["params"]
  assert _shapes(params) == {
      "layer_0": {"kernel": (32, 32)}, "bn_0": {"scale": (32,), "bias": (32,)},
      "layer_1": {"kernel": (32, 32)}, "bn_1": {"scale": (32,), "bias": (32,)},
      "layer_2": {"kernel": (32, 128)}, "bn_2": {"scale": (128,)}}  # no bias: nothing shifts the output
  assert set(variables["batch_stats"]) == {"bn_0", "bn_1", "bn_2"}
  # dense -> BN -> ReLU, twice, then dense -> BN (no ReLU), with batch statistics in training.
  hidden = x
  for i in range(2):
    bn = params[f"bn_{i}"]
    hidden = np.maximum(_batch_norm(hidden @ params[f"layer_{i}"]["kernel"], bn["scale"], bn["bias"]), 0)
  expected = _batch_norm(hidden @ params["layer_2"]["kernel"], params["bn_2"]["scale"])
  out, _ = head.apply(variables, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
  assert out.min() < 0  # no ReLU after the last layer


def test_simclr_kernels_start_from_a_normal_of_std_001():
  _, variables, _ = _init(heads.simclr_v1_head(), 4, in_dim=512)
  assert set(variables["params"]) == {"layer_0", "bn_0", "layer_1", "bn_1"}  # v1: one hidden layer
  kernel = variables["params"]["layer_0"]["kernel"]
  assert kernel.shape == (512, 512) and abs(kernel.std() - 0.01) < 0.0005 and abs(kernel.mean()) < 0.0005


def test_mocov2_head_is_two_linear_layers_without_batch_norm():
  head, variables, x = _init(heads.mocov2_head(), 8)
  params = variables["params"]
  assert _shapes(params) == {"layer_0": {"kernel": (32, 2048), "bias": (2048,)},
                             "layer_1": {"kernel": (2048, 128), "bias": (128,)}}
  assert "batch_stats" not in variables
  expected = np.maximum(x @ params["layer_0"]["kernel"] + params["layer_0"]["bias"], 0)
  expected = expected @ params["layer_1"]["kernel"] + params["layer_1"]["bias"]
  np.testing.assert_allclose(head.apply(variables, x, train=True), expected, rtol=1e-4, atol=1e-5)
  # torch's nn.Linear initialisation: kernel and bias uniform in +-1/sqrt(fan_in).
  for name, fan_in in (("layer_0", 32), ("layer_1", 2048)):
    for leaf in params[name].values():
      bound = 1 / np.sqrt(fan_in)
      assert np.abs(leaf).max() <= bound and np.abs(leaf).max() > 0.9 * bound


def test_widths_are_configurable():
  config = heads.head_config(num_layers=4, out_dim=16, hidden_dim=64, batch_norm=False, kernel_init_std=0.1)
  _, variables, _ = _init(config, 4)
  kernels = [variables["params"][f"layer_{i}"]["kernel"].shape for i in range(4)]
  assert kernels == [(32, 64), (64, 64), (64, 64), (64, 16)]


@pytest.mark.parametrize("key, value", [("num_layers", 0), ("out_dim", 0), ("hidden_dim", -3),
                                        ("batch_norm", None), ("kernel_init_std", 0.0)])
def test_bad_head_config_names_the_key(key, value):
  config = heads.simclr_v2_head()
  config[key] = value
  with pytest.raises(ValueError, match=rf"config\.method\.head\.{key}="):
    heads.validate_head_config(config)


def test_batch_norm_groups_must_split_the_rows():
  config = ml_collections.ConfigDict(dict(model=dict(bn_groups=4)))
  heads.check_bn_groups(config, 8, "test")  # groups of 2
  with pytest.raises(ValueError, match=r"config\.model\.bn_groups=4 must split the 4 rows of each pass"):
    heads.check_bn_groups(config, 4, "why")
