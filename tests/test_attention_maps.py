"""Attention maps: the last block's weights against numpy from its parameters (and, through V and the output
projection, against the block's own output), both block layouts, the PNG picture, and the command line on a
tiny MAE run."""
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from PIL import Image

from sslx import attention_maps
from sslx import train
from sslx import viz
from sslx.convert import scan_layout
from sslx.models import attention_weights
from sslx.models import vit
from train_helpers import tiny_run_config

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_EPS = 1e-6


def _tiny(**overrides):
  return vit.VisionTransformer(**{**dict(patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64), **overrides})


def _images(batch=3, size=32, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randn(batch, size, size, 3), jnp.float32)


def _moved_params(model):
  """Unrolled params of ``model``, with biases and norms moved off their init so each one counts, and relative
  position tables (zero at init) drawn from N(0, 1), so that their bias changes the weights clearly."""
  def init(key):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(
        nn.unbox(model.init({"params": key}, _images(), train=False))["params"])
    keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
    moved = [leaf + (1.0 if path[-1].key == "table" else 0.1) * jax.random.normal(k, leaf.shape)
             for (path, leaf), k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, moved)

  return jax.jit(init)(jax.random.key(0))


@pytest.fixture(scope="module")
def params():
  return _moved_params(_tiny())


def _maps(model, params, images):
  return jax.jit(functools.partial(attention_weights.cls_attention_maps, model))({"params": params}, images)


def _weights(model, params, images):
  return jax.jit(functools.partial(attention_weights.last_block_attention, model))({"params": params}, images)


def _layer_norm(x, p):
  return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + _EPS) * p["scale"] + p["bias"]


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _last_block_pass(model, params, images):
  """The last block's input (float64) and its attention's output, from the 2-block encoder's own pass."""
  wanted = {("block_0",), ("block_1", "attn")}
  _, state = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False, mutable=["intermediates"],
                                              capture_intermediates=lambda module, _: module.path in wanted))(
                                                  params, images)
  block_input = np.asarray(state["intermediates"]["block_0"]["__call__"][0], np.float64)
  return block_input, np.asarray(state["intermediates"]["block_1"]["attn"]["__call__"][0])


def _numpy_qkv(block_input, last):
  """numpy q, k, v ``(B, T, heads, head_dim)`` of the block with float64 params ``last``: qkv columns are
  (3, heads, head_dim), as sslx.models.vit.Attention lays them out."""
  qkv = _layer_norm(block_input, last["norm1"]) @ last["attn"]["qkv"]["kernel"] + last["attn"]["qkv"]["bias"]
  return np.moveaxis(qkv.reshape(*block_input.shape[:2], 3, 2, 16), 2, 0)


def _numpy_output(weights, v, last):
  """The attention's output for ``weights`` ``(B, heads, T, T)``: attended values through the projection."""
  attended = np.einsum("bnts,bsnh->btnh", weights, v).reshape(*v.shape[:2], -1)
  return attended @ last["attn"]["proj"]["kernel"] + last["attn"]["proj"]["bias"]


def test_weights_match_numpy_and_reproduce_the_blocks_attention_output(params):
  images = _images()
  model = _tiny()
  block_input, attn_output = _last_block_pass(model, params, images)
  last = jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), params["block_1"])
  q, k, v = _numpy_qkv(block_input, last)  # numpy, head by head
  weights = _softmax(np.einsum("btnh,bsnh->bnts", q, k) / 4.0)
  np.testing.assert_allclose(_numpy_output(weights, v, last), attn_output, atol=1e-5)
  explicit = _weights(model, params, images)
  assert explicit.shape == (3, 2, 17, 17) and explicit.dtype == jnp.float32
  np.testing.assert_allclose(explicit, weights, atol=1e-5)
  np.testing.assert_allclose(np.sum(explicit, -1), 1.0, atol=1e-6)  # each row: over the class token + 16 patches

  maps = _maps(model, params, images)
  assert maps.shape == (3, 2, 4, 4)
  np.testing.assert_allclose(maps, weights[:, :, 0, 1:].reshape(3, 2, 4, 4), atol=1e-5)
  # The class token's own weight is left out of its map.
  np.testing.assert_allclose(np.sum(maps, (2, 3)) + weights[:, :, 0, 0], 1.0, atol=1e-5)


@pytest.mark.parametrize("mode", ["shared", "per_block"])
def test_weights_hold_the_relative_position_bias(mode):
  """BEiT's encoder (a relative position bias, layer scale, no absolute positions), its bias tables random:
  through V and the output projection the recomputed weights give the last block's own attention output,
  which the weights without the bias do not; the stacked layout gives the same maps."""
  images = _images()
  model = _tiny(rel_pos_bias=mode, layer_scale=0.1, pos_embed="none")
  params = _moved_params(model)
  block_input, attn_output = _last_block_pass(model, params, images)
  last = jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), params["block_1"])
  _, _, v = _numpy_qkv(block_input, last)
  explicit = _weights(model, params, images)
  np.testing.assert_allclose(np.sum(explicit, -1), 1.0, atol=1e-6)
  np.testing.assert_allclose(_numpy_output(np.asarray(explicit, np.float64), v, last), attn_output, atol=1e-5)
  unbiased = attention_weights.head_attention(_layer_norm(block_input, last["norm1"]),
                                              last["attn"]["qkv"]["kernel"], last["attn"]["qkv"]["bias"], 2)
  assert np.abs(_numpy_output(np.asarray(unbiased, np.float64), v, last) - attn_output).max() > 0.1
  maps = _maps(model, params, images)
  np.testing.assert_allclose(maps, np.asarray(explicit)[:, :, 0, 1:].reshape(3, 2, 4, 4), atol=1e-6)
  stacked = _tiny(rel_pos_bias=mode, layer_scale=0.1, pos_embed="none", scan_blocks=True)
  np.testing.assert_allclose(_maps(stacked, scan_layout.stack_blocks(params), images), maps, atol=1e-5)


def test_stacked_blocks_give_the_same_maps(params):
  images = _images()
  stacked = scan_layout.stack_blocks(params)
  assert "blocks" in stacked and "block_1" not in stacked
  np.testing.assert_allclose(_maps(_tiny(scan_blocks=True, remat="full"), stacked, images),
                             _maps(_tiny(), params, images), atol=1e-5)


def test_maps_follow_the_grid_of_any_image_size():
  model = _tiny(pos_embed="learned", depth=1)
  params = jax.jit(lambda key: model.init({"params": key}, _images(), train=False))(jax.random.key(0))["params"]
  maps = _maps(model, params, _images(batch=2, size=48))  # the 4 x 4 table resized to 6 x 6
  assert maps.shape == (2, 2, 6, 6) and np.all(np.asarray(maps) > 0)


def test_only_a_vit_has_attention_maps():
  with pytest.raises(ValueError, match="need a ViT encoder, not Dense"):
    attention_weights.last_block_attention(nn.Dense(3), {}, _images())


def test_picture_puts_each_heads_map_over_its_image(tmp_path):
  images = np.random.default_rng(0).uniform(size=(2, 8, 8, 1)).astype(np.float32)
  maps = np.zeros((2, 3, 2, 2), np.float32)
  maps[:, :, 0, 0] = 1.0  # all attention on the top-left patch
  path = viz.save_attention_grid(str(tmp_path / "a.png"), images, maps, min_tile=16, pad=1)
  grid = np.asarray(Image.open(path)).astype(np.float32) / 255
  assert grid.shape == (2 * (16 + 1) + 1, 4 * (16 + 1) + 1, 3)
  tile = lambda row, col: grid[1 + row * 17:17 + row * 17, 1 + col * 17:17 + col * 17]
  first = np.repeat(np.repeat(images[0], 2, 0), 2, 1).repeat(3, -1)  # 8 px grey enlarged to 16, as RGB
  np.testing.assert_allclose(tile(0, 0), first, atol=1 / 255)
  heat = tile(0, 1)
  # Top-left patch (8 x 8 pixels of the tile): white heat blended in; elsewhere black heat, the image dimmed.
  np.testing.assert_allclose(heat[:8, :8], 0.4 * first[:8, :8] + 0.6, atol=1 / 255)
  np.testing.assert_allclose(heat[8:, 8:], 0.4 * first[8:, 8:], atol=1 / 255)


# --- the command line --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory):
  """A one-step tiny MAE run (ViT Ti/7 at width 32, 2 heads, 28 px Fashion-MNIST: a 4 x 4 grid)."""
  workdir = str(tmp_path_factory.mktemp("mae_run"))
  train.train(tiny_run_config(total_steps=1, **{"monitor.every_steps": 0, "monitor.online_probe": False}), workdir)
  return workdir


def test_command_line_writes_the_png_of_a_runs_encoder(mae_run, tmp_path):
  out = tmp_path / "attn.png"
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([_REPO, os.environ.get("PYTHONPATH", "")]))
  result = subprocess.run([sys.executable, "-m", "sslx.attention_maps", f"--workdir={mae_run}", f"--out={out}",
                           "--num_images=3"], capture_output=True, text=True, env=env, cwd=_REPO, timeout=300)
  assert result.returncode == 0, result.stderr
  assert f"Attention maps written to {out}" in result.stdout
  # 3 rows (images) x (image + 2 heads); 28 px tiles enlarged 4x to reach 96 px, 2 px padding.
  assert np.asarray(Image.open(out)).shape == (3 * (112 + 2) + 2, 3 * (112 + 2) + 2, 3)


def test_a_run_without_a_vit_is_refused_by_name(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model": {"name": "resnet", "variant": "R10"}}))
  with pytest.raises(ValueError, match=r"config\.model\.name='resnet' \(variant 'R10'\), not a ViT"):
    attention_maps.write_attention_maps(str(tmp_path), str(tmp_path / "a.png"))
  assert not (tmp_path / "a.png").exists()
