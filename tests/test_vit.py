import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from sslx.convert import scan_layout
from sslx.models import pos_embed
from sslx.models import relative_position
from sslx.models import vit
from sslx.models.patches import patchify

_ALLOWED_NAMES = {"embed", "mlp", "heads", "head_dim", "patch", None}


def _tiny(**overrides):
  kwargs = dict(patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64)
  kwargs.update(overrides)
  return vit.VisionTransformer(**kwargs)


def _images(batch=4, size=32, channels=3, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randn(batch, size, size, channels), jnp.float32)


def _abstract_init(model, images):
  return jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, images, train=False))["params"]


@pytest.fixture(scope="module")
def params():
  """Parameters of `_tiny()`; the variants tested below (pooling, drop path, dtype) share its shapes."""
  init = jax.jit(lambda key: _tiny().init({"params": key}, _images(), train=False))
  return init(jax.random.key(0))["params"]


def _boxes(tree):
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
  return jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_box)


# --- sincos position table -------------------------------------------------------------------------


def _reference_sincos(dim, rows, cols):
  """The MAE layout written out entry by entry: [sin(c w), cos(c w), sin(r w), cos(r w)]."""
  quarter = dim // 4
  table = np.zeros((rows * cols, dim))
  for index in range(rows * cols):
    r, c = divmod(index, cols)
    for k in range(quarter):
      omega = 1.0 / 10000 ** (k / quarter)
      table[index, k] = math.sin(c * omega)
      table[index, quarter + k] = math.cos(c * omega)
      table[index, 2 * quarter + k] = math.sin(r * omega)
      table[index, 3 * quarter + k] = math.cos(r * omega)
  return table


@pytest.mark.parametrize("dim,grid", [(16, 4), (32, (2, 3)), (8, 1)])
def test_sincos_matches_formula(dim, grid):
  rows, cols = (grid, grid) if isinstance(grid, int) else grid
  table = pos_embed.sincos_pos_embed_2d(dim, grid)
  assert table.dtype == np.float32
  np.testing.assert_allclose(table, _reference_sincos(dim, rows, cols), atol=1e-6)


def test_sincos_cls_row_is_zero():
  table = pos_embed.sincos_pos_embed_2d(16, 3, cls_token=True)
  assert table.shape == (10, 16)
  np.testing.assert_array_equal(table[0], 0)
  np.testing.assert_allclose(table[1:], pos_embed.sincos_pos_embed_2d(16, 3))


def test_sincos_rejects_width_not_multiple_of_4():
  with pytest.raises(ValueError, match="divisible by 4"):
    pos_embed.sincos_pos_embed_2d(30, 4)


# --- variants and dtypes ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant,expected", [
    ("Ti/16", (192, 12, 3, 16)), ("S/16", (384, 12, 6, 16)), ("B/16", (768, 12, 12, 16)),
    ("L/16", (1024, 24, 16, 16)), ("H/14", (1280, 32, 16, 14)), ("Ti/4", (192, 12, 3, 4))])
def test_parse_variant(variant, expected):
  dims = vit.parse_variant(variant)
  width, depth, heads, patch = expected
  assert dims == dict(width=width, depth=depth, num_heads=heads, mlp_dim=4 * width, patch_size=patch)


@pytest.mark.parametrize("bad", ["X/16", "B16", "B/0", "b/16", "B/", "B/16/2", ""])
def test_parse_variant_rejects_bad_strings(bad):
  with pytest.raises(ValueError) as info:
    vit.parse_variant(bad)
  assert repr(bad) in str(info.value) and "Ti" in str(info.value)


def test_resolve_dtype():
  assert vit.resolve_dtype("float32") == jnp.float32
  assert vit.resolve_dtype("bfloat16") == jnp.bfloat16
  assert vit.resolve_dtype("float16") == jnp.float16
  expected = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  assert vit.resolve_dtype("auto") == expected
  with pytest.raises(ValueError, match="bf16"):
    vit.resolve_dtype("bf16")


# --- the encoder ------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_output_shapes_and_aux(params, pooling):
  features, aux = _tiny(pooling=pooling).apply({"params": params}, _images(), train=False)
  assert set(aux) == {"pooled", "patch_tokens", "cls_token"}
  assert aux["patch_tokens"].shape == (4, 16, 32)
  assert aux["cls_token"].shape == features.shape == (4, 32)
  np.testing.assert_array_equal(aux["pooled"], features)
  expected = aux["cls_token"] if pooling == "cls" else jnp.mean(aux["patch_tokens"], axis=1)
  np.testing.assert_allclose(features, expected, rtol=1e-6)


def test_params_carry_only_known_logical_names():
  abstract = _abstract_init(_tiny(pos_embed="learned"), _images())
  boxes = _boxes(abstract)
  assert boxes and all(isinstance(leaf, nn.LogicallyPartitioned) for _, leaf in boxes)
  for path, leaf in boxes:
    assert len(leaf.names) == len(leaf.value.shape), path
    assert set(leaf.names) <= _ALLOWED_NAMES, path
  assert nn.unbox(abstract)["pos_embed"].shape == (16, 32)


def test_initialisation_follows_mae(params):
  width, p, c, mlp_dim = 32, 8, 3, 64
  params = nn.unbox(params)
  block = params["block_0"]
  # xavier-uniform bounds sqrt(6 / (fan_in + fan_out)); a fused (D, 3D) qkv and a (p*p*C, D) patch linear.
  for kernel, bound in [(block["attn"]["qkv"]["kernel"], math.sqrt(6 / (width + 3 * width))),
                        (params["patch_embed"]["kernel"], math.sqrt(6 / (p * p * c + width))),
                        (block["mlp"]["fc1"]["kernel"], math.sqrt(6 / (width + mlp_dim)))]:
    assert 0.9 * bound < float(jnp.max(jnp.abs(kernel))) <= bound
  assert block["attn"]["qkv"]["kernel"].shape == (width, 3 * width)
  assert abs(float(jnp.std(params["cls_token"])) - 0.02) < 0.01
  for leaf in (block["attn"]["qkv"]["bias"], block["mlp"]["fc2"]["bias"], block["norm1"]["bias"]):
    np.testing.assert_array_equal(leaf, 0)
  np.testing.assert_array_equal(params["norm"]["scale"], 1)


def test_patch_embedding_is_linear_map_of_patchified_pixels(params):
  images = _images()
  _, state = _tiny().apply({"params": params}, images, train=False, capture_intermediates=True,
                           mutable=["intermediates"])
  conv_out = state["intermediates"]["patch_embed"]["__call__"][0].reshape(4, 16, 32)
  kernel, bias = nn.unbox(params)["patch_embed"]["kernel"], nn.unbox(params)["patch_embed"]["bias"]
  np.testing.assert_allclose(conv_out, patchify(images, 8) @ kernel.reshape(-1, 32) + bias, atol=1e-5)


def test_eval_disables_drop_path_and_train_enables_it(params):
  images = _images()

  def run(model, train, seed):
    return model.apply({"params": params}, images, train=train, rngs={"dropout": jax.random.key(seed)})[0]

  dropping = _tiny(drop_path_rate=0.5)
  eval_a = run(dropping, False, 1)
  np.testing.assert_array_equal(eval_a, run(dropping, False, 2))
  np.testing.assert_array_equal(eval_a, run(_tiny(), False, 1))
  np.testing.assert_array_equal(run(_tiny(), True, 1), eval_a)
  assert not np.allclose(run(dropping, True, 1), run(dropping, True, 2))


def test_bfloat16_compute_keeps_float32_params(params):
  model = _tiny(dtype=jnp.bfloat16)
  abstract = _abstract_init(model, _images())
  assert all(leaf.value.dtype == jnp.float32 for _, leaf in _boxes(abstract))
  # Shapes and dtypes only: compiling a bfloat16 graph on CPU would slow the suite for no extra check.
  features, aux = jax.eval_shape(lambda p: model.apply({"params": p}, _images(), train=False), params)
  assert features.dtype == aux["patch_tokens"].dtype == aux["cls_token"].dtype == jnp.bfloat16


def test_ids_keep_gathers_visible_patches(params):
  images = _images()
  # Jitted: eager dispatch would compile every op again for each new sequence length.
  apply = jax.jit(
      lambda x, ids: _tiny().apply({"params": params}, x, train=False, ids_keep=ids)[1]["patch_tokens"])
  full = apply(images, None)
  identity = jnp.tile(jnp.arange(16)[None], (4, 1))
  np.testing.assert_allclose(apply(images, identity), full, atol=1e-5)
  # Position is added before the gather, so a permutation of all patches permutes the outputs.
  perm = jnp.stack([jnp.asarray(np.random.RandomState(s).permutation(16)) for s in range(4)])
  np.testing.assert_allclose(apply(images, perm), jnp.take_along_axis(full, perm[..., None], 1), atol=1e-5)
  # A subset: each image is encoded from its own visible patches only.
  subset = perm[:, :4]
  tokens = apply(images, subset)
  assert tokens.shape == (4, 4, 32)
  np.testing.assert_allclose(apply(images[::-1], subset[::-1]), tokens[::-1], atol=1e-5)


def test_rejects_bad_settings():
  with pytest.raises(ValueError, match="pooling"):
    _abstract_init(_tiny(pooling="max"), _images())
  with pytest.raises(ValueError, match="pos_embed"):
    _abstract_init(_tiny(pos_embed="rope"), _images())
  with pytest.raises(ValueError, match="not divisible by patch size"):
    _abstract_init(_tiny(), _images(size=28))


# --- mask token ---------------------------------------------------------------------------------------


def _token_sequence(model, params, images, mask):
  """The token sequence the first block sees: (B, 1 + L, D), class token first."""
  captured = {}

  def grab(next_fun, args, kwargs, context):
    if context.module.name == "block_0" and context.method_name == "__call__":
      captured["tokens"] = args[0]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(grab):
    model.apply({"params": params}, images, train=False, mask=mask)
  return captured["tokens"]


def test_masked_positions_hold_the_mask_token_plus_position_embedding():
  model = _tiny(use_mask_token=True)
  images = _images()
  params = nn.unbox(jax.jit(lambda key: model.init({"params": key}, images, train=False))(jax.random.key(1)))["params"]
  assert params["mask_token"].shape == (1, 1, 32)
  mask = jnp.asarray(np.random.RandomState(0).rand(4, 16) < 0.5)
  tokens = _token_sequence(model, params, images, mask)
  plain = _token_sequence(model, params, images, None)
  pos = pos_embed.sincos_pos_embed_2d(32, 4)
  expected_masked = np.broadcast_to(np.asarray(params["mask_token"])[0] + pos, (4, 16, 32))
  m = np.asarray(mask)
  np.testing.assert_allclose(np.asarray(tokens)[:, 1:][m], expected_masked[m], atol=1e-6)
  # Visible patches and the class token are untouched by the mask.
  np.testing.assert_array_equal(np.asarray(tokens)[:, 1:][~m], np.asarray(plain)[:, 1:][~m])
  np.testing.assert_array_equal(tokens[:, 0], plain[:, 0])


def test_a_mask_needs_a_mask_token(params):
  with pytest.raises(ValueError, match="mask_token=True"):
    _tiny().apply({"params": params}, _images(), train=False, mask=jnp.zeros((4, 16), bool))


def test_config_validation_names_the_key():
  config = vit.default_config("Ti/8")
  vit.validate_config(config, 32)
  with pytest.raises(ValueError, match="config.data.image_size=30"):
    vit.validate_config(config, 30)
  config.pooling = "max"
  with pytest.raises(ValueError, match="config.model.pooling='max'"):
    vit.validate_config(config, 32)


# --- learned position table on other grids ------------------------------------------------------------


def _table(rows, cols, dim=8, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randn(rows * cols, dim), jnp.float32)


def test_resize_on_the_tables_own_grid_is_the_table_itself():
  table = _table(4, 4)
  assert pos_embed.resize_pos_table(table, (4, 4)) is table
  assert pos_embed.resize_pos_table(table, (4, 4), source_grid=(4, 4)) is table


@pytest.mark.parametrize("grid", [(2, 2), (3, 5), (7, 7)])
def test_resize_gives_one_row_per_patch_and_keeps_a_constant(grid):
  resized = pos_embed.resize_pos_table(jnp.full((16, 8), 0.37, jnp.float32), grid)
  assert resized.shape == (grid[0] * grid[1], 8) and resized.dtype == jnp.float32
  np.testing.assert_allclose(resized, 0.37, rtol=1e-6)


def test_resize_keeps_a_ramp_a_ramp():
  rows, cols = np.meshgrid(np.arange(6.0), np.arange(6.0), indexing="ij")
  table = jnp.asarray(np.stack([rows.reshape(-1), cols.reshape(-1)], axis=1), jnp.float32)
  resized = np.asarray(pos_embed.resize_pos_table(table, (4, 11))).reshape(4, 11, 2)
  row_ramp, col_ramp = resized[:, 0, 0], resized[0, :, 1]
  np.testing.assert_allclose(resized[..., 0], np.broadcast_to(row_ramp[:, None], (4, 11)), atol=1e-6)
  np.testing.assert_allclose(resized[..., 1], np.broadcast_to(col_ramp[None, :], (4, 11)), atol=1e-6)
  for ramp, size in ((row_ramp, 4), (col_ramp, 11)):
    assert np.all(np.diff(ramp) > 0)
    ideal = (np.arange(size) + 0.5) * 6 / size - 0.5  # where each output samples the 6-step input ramp
    inside = (np.floor(ideal) >= 1) & (np.floor(ideal) <= 3)  # all four taps on the grid
    # torch's a = -0.75 bends a ramp by up to ~5% of a step; taps clamped at the borders bend it more.
    np.testing.assert_allclose(ramp[inside], ideal[inside], atol=0.05)
    np.testing.assert_allclose(ramp, ideal, atol=0.15)


@pytest.mark.parametrize("source,grid", [((4, 4), (6, 6)), ((4, 4), (2, 3)), ((14, 14), (6, 6)), ((2, 3), (5, 4))])
def test_resize_matches_torch_bicubic(source, grid):
  torch = pytest.importorskip("torch")
  table = _table(*source)
  image = torch.from_numpy(np.array(table).reshape(*source, -1)).permute(2, 0, 1)[None]
  expected = torch.nn.functional.interpolate(image, size=grid, mode="bicubic", align_corners=False)
  expected = expected[0].permute(1, 2, 0).reshape(grid[0] * grid[1], -1).numpy()
  np.testing.assert_allclose(pos_embed.resize_pos_table(table, grid, source_grid=source), expected, atol=1e-5)


def test_resize_needs_the_grid_of_a_non_square_table():
  with pytest.raises(ValueError, match="not a square patch grid"):
    pos_embed.resize_pos_table(_table(2, 3), (4, 4))
  with pytest.raises(ValueError, match=r"source_grid \(3, 3\) does not hold the table's 6 rows"):
    pos_embed.resize_pos_table(_table(2, 3), (4, 4), source_grid=(3, 3))


def test_learned_table_keeps_its_shape_and_is_resized_for_other_image_sizes():
  model = _tiny(pos_embed="learned", depth=1)
  params = nn.unbox(jax.jit(lambda key: model.init({"params": key}, _images(), train=False))(jax.random.key(0)))
  table = params["params"]["pos_embed"]
  assert table.shape == (16, 32)  # the init images' 4 x 4 grid
  first_block_input = jax.jit(lambda images: _token_sequence(model, params["params"], images, None))
  for size, grid in ((32, (4, 4)), (48, (6, 6)), (16, (2, 2))):
    # Zero images: the patch embedding is its bias (0 at init), so the first block sees the position table.
    positions = first_block_input(jnp.zeros((1, size, size, 3)))[0, 1:]
    if grid == (4, 4):
      np.testing.assert_array_equal(positions, table)
    else:
      np.testing.assert_allclose(positions, pos_embed.resize_pos_table(table, grid), atol=1e-6)


# --- BEiT's options: layer scale and relative position bias ----------------------------------------------

def test_relative_position_index_of_a_3x3_grid():
  """Every pair of the 9 patches by its (row, column) offset, shifted to start at 0, written out by loops;
  the class token's three rows last: E - 3 from it, E - 2 to it, E - 1 itself (E = 5 * 5 + 3)."""
  expected = np.zeros((10, 10), np.int64)
  for i in range(9):
    for j in range(9):
      (ri, ci), (rj, cj) = divmod(i, 3), divmod(j, 3)
      expected[1 + i, 1 + j] = (ri - rj + 2) * 5 + (ci - cj + 2)
  expected[0, 1:], expected[1:, 0], expected[0, 0] = 25, 26, 27
  assert relative_position.num_entries((3, 3)) == 28
  index = relative_position.relative_position_index((3, 3))
  np.testing.assert_array_equal(index, expected)
  # Offsets are what counts: patch (0, 0) -> (1, 1) uses the row of patch (1, 1) -> (2, 2).
  assert index[1, 5] == index[5, 9] and index[1, 5] != index[5, 1]
  # A 2 x 3 grid: 3 * 5 offsets + 3, every entry used.
  assert sorted(set(relative_position.relative_position_index((2, 3)).reshape(-1))) == list(range(18))


def _layer_norm(x, scale, bias, eps=1e-6):
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def _numpy_block(p, x, bias, num_heads):
  """BEiT's block in numpy: x + g1 * attn(LN1 x), then + g2 * mlp(LN2 x); the bias joins every logit."""
  from scipy.special import erf, softmax  # pylint: disable=g-import-not-at-top
  batch, tokens, width = x.shape
  head = width // num_heads
  y = _layer_norm(x, p["norm1"]["scale"], p["norm1"]["bias"])
  qkv = (y @ p["attn"]["qkv"]["kernel"] + p["attn"]["qkv"]["bias"]).reshape(batch, tokens, 3, num_heads, head)
  q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
  weights = softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(head) + bias, axis=-1)
  attended = (weights @ v).transpose(0, 2, 1, 3).reshape(batch, tokens, width)
  x = x + p["gamma_1"] * (attended @ p["attn"]["proj"]["kernel"] + p["attn"]["proj"]["bias"])
  y = _layer_norm(x, p["norm2"]["scale"], p["norm2"]["bias"])
  hidden = y @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"]
  hidden = 0.5 * hidden * (1 + erf(hidden / np.sqrt(2)))
  return x + p["gamma_2"] * (hidden @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"])


def _randomised(params, seed=0):
  """Every parameter drawn afresh (gammas and bias tables start constant, which would hide a mix-up)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: np.asarray(rng.normal(size=a.shape) * 0.5, np.float32), nn.unbox(params))


def _init(model, images):
  return jax.jit(lambda key: model.init({"params": key}, images, train=False))(jax.random.key(0))["params"]


def test_block_with_layer_scale_and_its_own_bias_table_matches_numpy():
  grid, heads = (2, 3), 2
  block = vit.Block(num_heads=heads, mlp_dim=16, layer_scale=0.1, rel_pos_grid=grid)
  x = np.random.default_rng(1).normal(size=(2, 7, 8)).astype(np.float32)
  params = nn.unbox(block.init(jax.random.key(0), x)["params"])
  np.testing.assert_array_equal(params["gamma_1"], np.full(8, 0.1, np.float32))
  np.testing.assert_array_equal(params["attn"]["rel_pos_bias"]["table"], np.zeros((3 * 5 + 3, heads)))
  params = _randomised(params)
  table = params["attn"]["rel_pos_bias"]["table"]
  bias = table[relative_position.relative_position_index(grid)].transpose(2, 0, 1)
  np.testing.assert_allclose(block.apply({"params": params}, x), _numpy_block(params, x, bias, heads),
                             rtol=1e-5, atol=1e-5)


def test_shared_bias_reaches_every_block_and_scan_computes_the_same():
  """ViT-level: the shared table changes the output once it is not zero; the scanned blocks, with the bias
  broadcast into the loop, give the unrolled output; a per-block table lives in each block's attention."""
  images = _images(batch=2, size=24)  # a 3 x 3 grid
  model = _tiny(layer_scale=0.1, rel_pos_bias="shared", pos_embed="none")
  params = _randomised(_init(model, images))
  assert params["rel_pos_bias"]["table"].shape == (28, 2) and "rel_pos_bias" not in params["block_0"]["attn"]
  apply = lambda m, p: m.apply({"params": p}, images, train=False)[0]
  out = apply(model, params)
  unbiased = {**params, "rel_pos_bias": {"table": np.zeros((28, 2), np.float32)}}
  assert float(np.abs(out - apply(model, unbiased)).max()) > 1e-3
  scanned = model.clone(scan_blocks=True, remat="full")
  np.testing.assert_allclose(apply(scanned, scan_layout.stack_blocks(params)), out, rtol=1e-5, atol=1e-5)
  per_block = nn.unbox(_abstract_init(_tiny(rel_pos_bias="per_block"), images))
  assert per_block["block_1"]["attn"]["rel_pos_bias"]["table"].shape == (28, 2)
  assert "rel_pos_bias" not in per_block


def test_a_zero_bias_table_and_unit_layer_scale_change_nothing(params):
  """With gammas of 1 and zero tables the options compute the plain ViT."""
  plain = nn.unbox(params)
  extended = jax.tree_util.tree_map_with_path(
      lambda path, leaf: _option_value(path, leaf, plain),
      nn.unbox(_abstract_init(_tiny(layer_scale=1.0, rel_pos_bias="per_block"), _images())))
  model = _tiny(layer_scale=1.0, rel_pos_bias="per_block")
  expected = _tiny().apply({"params": plain}, _images(), train=False)[0]
  np.testing.assert_allclose(model.apply({"params": extended}, _images(), train=False)[0], expected,
                             rtol=1e-5, atol=1e-6)


def _option_value(path, leaf, plain):
  """The plain ViT's parameter at ``path``, or 1 for a gamma and 0 for a bias table."""
  names = [key.key for key in path]
  if names[-1].startswith("gamma"):
    return np.ones(leaf.shape, np.float32)
  if "rel_pos_bias" in names:
    return np.zeros(leaf.shape, np.float32)
  for name in names:
    plain = plain[name]
  return plain


def test_relative_position_options_are_checked():
  config = vit.default_config("Ti/8")
  config.update(dict(rel_pos_bias="shared", layer_scale=0.1, pos_embed="none"))
  vit.validate_config(config, 32)
  assert vit.attention_implementation(config) == "xla"  # 'auto' never picks cuDNN beside a bias
  config.attention = "cudnn"
  with pytest.raises(ValueError, match=r"attention='cudnn' cannot add config\.model\.rel_pos_bias='shared'"):
    vit.validate_config(config, 32)
  for key, value, message in (("rel_pos_bias", "both", "config.model.rel_pos_bias='both' is not one of"),
                              ("layer_scale", 0.0, r"config\.model\.layer_scale=0\.0 must be a number > 0")):
    bad = vit.default_config("Ti/8")
    bad[key] = value
    with pytest.raises(ValueError, match=message):
      vit.validate_config(bad, 32)
  model = _tiny(rel_pos_bias="shared")
  variables = {"params": _init(model, _images())}
  with pytest.raises(ValueError, match="belongs to another patch grid than 3x3"):
    model.apply(variables, _images(size=24), train=False)
  with pytest.raises(ValueError, match="ids_keep drops tokens"):
    model.apply(variables, _images(), train=False, ids_keep=jnp.zeros((4, 2), jnp.int32))
