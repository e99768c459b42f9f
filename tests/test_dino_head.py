"""DINO's head: layer shapes and names, the forward pass against numpy (GELU MLP, L2-normalised bottleneck,
weight-normalised prototypes), the trainable or fixed prototype norms, initialisation, and config validation."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from sslx import optim
from sslx.models import dino_head

_SMALL = dict(out_dim=24, hidden_dim=32, bottleneck_dim=16)


def _init(in_dim=16, rows=6, **overrides):
  head = dino_head.from_config(dino_head.dino_head_config(**{**_SMALL, **overrides}))
  x = np.random.default_rng(0).normal(size=(rows, in_dim)).astype(np.float32)
  variables = jax.jit(lambda key: head.init(key, x[:1], train=False))(jax.random.key(0))
  return head, jax.tree.map(np.asarray, dict(dino_head.nn.unbox(variables))), x


def _forward(head):
  """The head in evaluation mode, jitted (op by op, each small op would compile on its own)."""
  return jax.jit(lambda variables, x: head.apply(variables, x, train=False))


def _gelu(x):
  return 0.5 * x * (1 + special.erf(x / np.sqrt(2)))


def _numpy_head(params, x):
  """(logits, bottleneck z before normalisation) of a head without BatchNorm."""
  layers = sorted(name for name in params if name.startswith("layer_"))
  for name in layers[:-1]:
    x = _gelu(x @ params[name]["kernel"] + params[name]["bias"])
  z = x @ params[layers[-1]]["kernel"] + params[layers[-1]]["bias"]
  v = params["last_layer"]["kernel"]
  weight = v / np.linalg.norm(v, axis=0) * params["last_layer"].get("scale", 1.0)
  return (z / np.linalg.norm(z, axis=1, keepdims=True)) @ weight, z


def test_default_config_is_dinos():
  config = dino_head.dino_head_config()
  assert config.to_dict() == dict(out_dim=65536, hidden_dim=2048, bottleneck_dim=256, num_layers=3,
                                  batch_norm=False, norm_last_layer=True)
  head = dino_head.from_config(config)
  shapes = jax.eval_shape(lambda: head.init(jax.random.key(0), jnp.zeros((1, 384)), train=False))
  assert jax.tree.map(lambda leaf: leaf.shape, dino_head.nn.unbox(shapes))["params"] == {
      "layer_0": {"kernel": (384, 2048), "bias": (2048,)}, "layer_1": {"kernel": (2048, 2048), "bias": (2048,)},
      "layer_2": {"kernel": (2048, 256), "bias": (256,)}, "last_layer": {"kernel": (256, 65536)}}


def test_forward_matches_numpy_and_prototypes_have_unit_norm():
  head, variables, x = _init()
  params = variables["params"]
  assert set(params) == {"layer_0", "layer_1", "layer_2", "last_layer"} and set(variables) == {"params"}
  assert set(params["last_layer"]) == {"kernel"}  # norm_last_layer: g is fixed at 1, not a parameter
  forward = _forward(head)
  out = np.asarray(forward(variables, x))
  expected, z = _numpy_head(params, x)
  assert out.shape == (6, 24)
  np.testing.assert_allclose(out, expected, atol=1e-5)
  # Unit z and unit columns of W: every logit is a cosine, and a prototype along z scores exactly 1.
  assert np.abs(out).max() <= 1 + 1e-6
  along_z = dict(params, last_layer={"kernel": np.asarray(params["last_layer"]["kernel"]).copy()})
  along_z["last_layer"]["kernel"][:, 0] = 7.0 * z[0]
  np.testing.assert_allclose(forward({"params": along_z}, x)[0, 0], 1.0, atol=1e-5)


def test_output_ignores_the_scale_of_the_bottleneck_and_of_each_prototype():
  head, variables, x = _init()
  params = variables["params"]
  forward = _forward(head)
  scaled = dict(params, layer_2={name: 10.0 * leaf for name, leaf in params["layer_2"].items()},
                last_layer={"kernel": params["last_layer"]["kernel"] * np.linspace(0.1, 5, 24, dtype=np.float32)})
  np.testing.assert_allclose(forward({"params": scaled}, x), forward(variables, x), atol=1e-5)


def test_trainable_prototype_norms_start_at_one_and_scale_the_logits():
  head, variables, x = _init(norm_last_layer=False)
  last = variables["params"]["last_layer"]
  assert set(last) == {"kernel", "scale"} and last["scale"].shape == (24,)
  np.testing.assert_array_equal(last["scale"], 1.0)
  forward = _forward(head)
  out = forward(variables, x)
  np.testing.assert_allclose(out, _numpy_head(variables["params"], x)[0], atol=1e-5)
  scale = np.linspace(0.5, 3.0, 24).astype(np.float32)
  params = dict(variables["params"], last_layer=dict(last, scale=scale))
  np.testing.assert_allclose(forward({"params": params}, x), scale * out, rtol=1e-5, atol=1e-6)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(forward({"params": p}, x)[:, :3])))(variables["params"])
  assert np.all(np.asarray(grads["last_layer"]["scale"])[:3] != 0)


def test_batch_norm_sits_after_each_hidden_layer():
  head, variables, x = _init(batch_norm=True)
  assert set(variables["params"]) == {"layer_0", "bn_0", "layer_1", "bn_1", "layer_2", "last_layer"}
  assert set(variables["batch_stats"]) == {"bn_0", "bn_1"}
  out, state = jax.jit(lambda v: head.apply(v, x, train=True, mutable=["batch_stats"]))(variables)
  assert out.shape == (6, 24) and not np.allclose(state["batch_stats"]["bn_0"]["mean"], 0)
  params = variables["params"]
  hidden = x
  for i in range(2):
    pre = hidden @ params[f"layer_{i}"]["kernel"] + params[f"layer_{i}"]["bias"]
    normed = (pre - pre.mean(0)) / np.sqrt(pre.var(0) + 1e-5) * params[f"bn_{i}"]["scale"] + params[f"bn_{i}"]["bias"]
    hidden = _gelu(normed)
  np.testing.assert_allclose(out, _numpy_head({"layer_2": params["layer_2"], "last_layer": params["last_layer"]},
                                              hidden)[0], atol=1e-5)


def test_one_layer_maps_straight_to_the_bottleneck():
  _, variables, _ = _init(num_layers=1)
  assert jax.tree.map(np.shape, variables["params"]) == {"layer_0": {"kernel": (16, 16), "bias": (16,)},
                                                         "last_layer": {"kernel": (16, 24)}}


def test_initialisation_follows_dino():
  _, variables, _ = _init(in_dim=256, hidden_dim=512, bottleneck_dim=64)
  params = variables["params"]
  kernel = params["layer_1"]["kernel"]
  # DINO's trunc_normal_(std=0.02) cuts at +-2 (absolute): 100 std, so the std stays 0.02.
  assert abs(kernel.std() - 0.02) < 0.0005 and abs(kernel.mean()) < 0.0005 and 0.07 < np.abs(kernel).max() < 2
  for name in ("layer_0", "layer_1", "layer_2"):
    np.testing.assert_array_equal(params[name]["bias"], 0)
  prototypes = params["last_layer"]["kernel"]  # torch's nn.Linear default: uniform in +-1/sqrt(fan_in)
  assert 0.9 / 8 < np.abs(prototypes).max() <= 1 / 8


def test_last_layer_pattern_selects_the_last_layer_only():
  _, variables, _ = _init(norm_last_layer=False)
  paths = jax.tree.leaves(optim.map_paths(lambda path: path, {"student": {"head": variables["params"]}}))
  matched = sorted(path for path in paths if re.fullmatch(dino_head.LAST_LAYER_PATTERN, path))
  assert matched == ["student/head/last_layer/kernel", "student/head/last_layer/scale"]
  assert re.fullmatch(dino_head.LAST_LAYER_PATTERN, "last_layer/kernel")


@pytest.mark.parametrize("key, value", [("out_dim", 0), ("hidden_dim", -1), ("bottleneck_dim", -5),
                                        ("num_layers", 0), ("batch_norm", None), ("norm_last_layer", None)])
def test_bad_config_names_the_key(key, value):
  config = dino_head.dino_head_config()
  dino_head.validate_dino_head_config(config)
  config[key] = value
  with pytest.raises(ValueError, match=rf"config\.method\.dino_head\.{key}="):
    dino_head.validate_dino_head_config(config, "method.dino_head")
