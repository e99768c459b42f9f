"""config.model.scan_blocks / remat / attention: the same function of the same numbers, however it compiles.

Exactness: the forward pass of a scanned encoder is bit-identical to the unrolled one given the converted
parameters. Gradients (and losses with drop path) agree to float32 rounding, not always bit for bit: XLA fuses
a loop body (or a rematerialised block) differently from straight-line code, which reorders a few float
additions. The tolerance below is a few float32 ulps of each gradient's largest entry.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from conftest import tiny_mae_config
from sslx import models
from sslx import trees
from sslx.convert import scan_layout
from sslx.methods import RunLength, mae
from sslx.models import attention
from sslx.models import vit

# Relative to the largest |entry| of the reference tree: float32 has 2^-24 ~ 6e-8 relative resolution.
_RTOL = 2e-6


def _tiny(**overrides):
  kwargs = dict(patch_size=8, width=32, depth=3, num_heads=2, mlp_dim=64)
  kwargs.update(overrides)
  return vit.VisionTransformer(**kwargs)


def _images(batch=4, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randn(batch, 32, 32, 3), jnp.float32)


@pytest.fixture(scope="module")
def unrolled_params():
  return nn.unbox(jax.jit(lambda key: _tiny().init({"params": key}, _images(), train=False))(jax.random.key(0)))["params"]


def _assert_trees_close(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for name, leaf in trees.leaves_by_name(want).items():
    scale = float(np.max(np.abs(leaf))) or 1.0
    np.testing.assert_allclose(trees.leaves_by_name(got)[name], leaf, rtol=0, atol=_RTOL * scale, err_msg=name)


def _encoder_loss_and_grads(model, params):
  """A loss of every output (patch tokens, class token, pooled) through a random projection, with drop path
  and a subset of patches (ids_keep), as MAE's encoder runs."""
  images = _images()
  ids_keep = jnp.asarray(np.argsort(np.random.RandomState(1).rand(4, 16), axis=1)[:, :5])

  def loss_fn(p):
    features, aux = model.apply({"params": p}, images, train=True, ids_keep=ids_keep,
                                rngs={"dropout": jax.random.key(3)})
    tokens = jnp.concatenate([aux["cls_token"][:, None], aux["patch_tokens"], features[:, None]], axis=1)
    return jnp.sum(tokens * jax.random.normal(jax.random.key(9), tokens.shape))

  return jax.jit(jax.value_and_grad(loss_fn))(params)


def test_scanned_params_are_the_stacked_unrolled_ones_with_a_layers_axis():
  init = lambda model: jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, _images(), train=False))
  boxed = init(_tiny(scan_blocks=True))["params"]
  assert not any(name.startswith("block_") for name in boxed)
  assert boxed["blocks"]["attn"]["qkv"]["kernel"].names == ("layers", "embed", None)
  zeros = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), nn.unbox(init(_tiny())["params"]))
  shapes = lambda tree: jax.tree.map(np.shape, tree)
  assert shapes(scan_layout.stack_blocks(zeros)) == shapes(nn.unbox(boxed))
  assert shapes(nn.unbox(boxed))["blocks"]["attn"]["qkv"]["kernel"] == (3, 32, 96)


def test_scanned_forward_pass_is_bit_identical(unrolled_params):
  images = _images()
  run = lambda model, p: jax.jit(lambda p: model.apply({"params": p}, images, train=False))(p)
  want_features, want_aux = run(_tiny(), unrolled_params)
  features, aux = run(_tiny(scan_blocks=True), scan_layout.stack_blocks(unrolled_params))
  np.testing.assert_array_equal(features, want_features)
  for key in ("patch_tokens", "cls_token", "pooled"):
    np.testing.assert_array_equal(aux[key], want_aux[key])


@pytest.mark.parametrize("scan,remat", [(True, "none"), (False, "matmuls"), (False, "full"), (True, "matmuls"),
                                        (True, "full")])
def test_encoder_loss_and_gradients_match_unrolled(unrolled_params, scan, remat):
  want_loss, want_grads = _encoder_loss_and_grads(_tiny(drop_path_rate=0.3), unrolled_params)
  params = scan_layout.to_layout(unrolled_params, scan_blocks=scan)
  loss, grads = _encoder_loss_and_grads(_tiny(drop_path_rate=0.3, scan_blocks=scan, remat=remat), params)
  np.testing.assert_allclose(loss, want_loss, rtol=_RTOL)
  _assert_trees_close(scan_layout.unstack_blocks(grads), want_grads)


def test_drop_path_differs_per_layer_and_per_sample_under_scan(unrolled_params):
  """Rates 0, r/2, r by layer, fed to the scan as an input; each sample keeps or drops a whole branch."""
  images = _images(batch=16)
  params = scan_layout.stack_blocks(unrolled_params)
  apply = jax.jit(lambda p, key, rate, train: _tiny(drop_path_rate=rate, scan_blocks=True).apply(
      {"params": p}, images, train=train, rngs={"dropout": key})[0], static_argnums=(2, 3))
  evaluation = apply(params, jax.random.key(1), 0.5, False)
  np.testing.assert_array_equal(apply(params, jax.random.key(1), 0.0, True), evaluation)
  dropped = apply(params, jax.random.key(1), 0.5, True)
  assert not np.allclose(dropped, evaluation)
  assert not np.allclose(apply(params, jax.random.key(2), 0.5, True), dropped)
  keep_prob, keys = vit.drop_path_inputs(jax.random.key(0), 0.5, 3)
  np.testing.assert_allclose(keep_prob, [1.0, 0.75, 0.5])
  assert keys.shape[0] == 3
  # A sample's branch is zeroed or scaled by 1 / keep_prob, whole.
  branch = jnp.ones((64, 5, 2))
  out = np.asarray(vit.drop_path(branch, keep_prob[2], keys[0]))
  assert set(np.unique(out)) == {0.0, 2.0} and all(len(np.unique(sample)) == 1 for sample in out)


def _remat_policies(jaxpr) -> list:
  """The policies of the rematerialised regions in ``jaxpr`` and the jaxprs nested in it (a scan's body)."""
  found = []
  for eqn in jaxpr.eqns:
    if {"policy", "prevent_cse"} <= set(eqn.params):
      found.append(eqn.params["policy"])
    for value in eqn.params.values():
      inner = getattr(value, "jaxpr", value)
      if hasattr(inner, "eqns"):
        found += _remat_policies(inner)
  return found


@pytest.mark.parametrize("scan", [False, True])
def test_remat_wraps_each_block_with_its_policy(scan):
  """Equal numbers alone would not show remat is on: look for it in the traced program."""
  images = _images(batch=2)
  for remat, policy in [("none", None), ("matmuls", jax.checkpoint_policies.dots_with_no_batch_dims_saveable),
                        ("full", None)]:
    model = _tiny(scan_blocks=scan, remat=remat)
    params = jax.eval_shape(lambda m=model: m.init({"params": jax.random.key(0)}, images, train=False))
    found = _remat_policies(jax.make_jaxpr(lambda p, m=model: m.apply(p, images, train=False)[0])(params).jaxpr)
    expected_regions = 0 if remat == "none" else (1 if scan else 3)
    assert found == [policy] * expected_regions, remat


def _mae_method(scan=False, remat="none"):
  config = tiny_mae_config()
  config.model.update(dict(depth=3, scan_blocks=scan, remat=remat, drop_path_rate=0.3))
  config.method.decoder.depth = 2
  return mae.build(config, RunLength(1, 1))


def _mae_loss_and_grads(method, params):
  batch = {"image": _images()}
  loss_fn = lambda p: method.loss_fn({"params": p}, {}, batch, jax.random.key(5))[0]
  return jax.jit(jax.value_and_grad(loss_fn))(params)


@pytest.fixture(scope="module")
def mae_unrolled():
  method = _mae_method()
  variables, _ = jax.jit(method.init)(jax.random.key(0), {"image": _images()})
  params = nn.unbox(variables)["params"]
  return params, _mae_loss_and_grads(method, params)


@pytest.mark.parametrize("scan,remat", [(True, "none"), (False, "full"), (True, "matmuls")])
def test_mae_loss_and_gradients_match_unrolled(mae_unrolled, scan, remat):
  """Masking, drop path in the encoder, the decoder's mask tokens and blocks: all in the stacked layout."""
  params, (want_loss, want_grads) = mae_unrolled
  stacked = scan_layout.to_layout(params, scan_blocks=scan)
  if scan:
    assert "blocks" in stacked["encoder"] and "blocks" in stacked["decoder"]
  loss, grads = _mae_loss_and_grads(_mae_method(scan, remat), stacked)
  np.testing.assert_allclose(loss, want_loss, rtol=_RTOL)
  _assert_trees_close(scan_layout.unstack_blocks(grads), want_grads)


def test_scanned_mae_init_gives_the_stacked_tree():
  method = _mae_method(scan=True)
  variables, _ = jax.eval_shape(method.init, jax.random.key(0), {"image": _images()})
  params = nn.unbox(variables)["params"]
  assert params["decoder"]["blocks"]["mlp"]["fc1"]["kernel"].shape == (2, 16, 32)
  assert params["encoder"]["blocks"]["norm1"]["scale"].shape == (3, 32)


# --- attention implementation -------------------------------------------------------------------------


def test_the_registry_reports_the_attention_for_the_run_line():
  assert models.attention_implementation(vit.default_config("Ti/8")) == "xla"
  assert models.attention_implementation(models.default_config("resnet")) is None


def test_attention_is_xla_on_this_cpu():
  config = vit.default_config("Ti/8")
  assert vit.attention_implementation(config) == "xla"
  config.dtype = "bfloat16"
  assert vit.attention_implementation(config) == "xla"  # a CPU, whatever the dtype
  assert vit.from_config(config).attention == "xla"
  config.attention = "cudnn"
  with pytest.raises(ValueError, match="config.model.attention='cudnn' cannot run here: the backend is 'cpu'"):
    vit.attention_implementation(config)


def _numpy_attention(qkv):
  """softmax(q k^T / sqrt(H)) v per head, float64, from (B, T, 3, N, H) to (B, T, N, H)."""
  q, k, v = (np.moveaxis(qkv[:, :, i].astype(np.float64), 2, 1) for i in range(3))  # (B, N, T, H)
  logits = q @ np.swapaxes(k, -1, -2) / np.sqrt(qkv.shape[-1])
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  return np.moveaxis((weights / weights.sum(-1, keepdims=True)) @ v, 1, 2)


def test_xla_self_attention_is_the_formula_and_jax_s_function_with_its_gradients():
  qkv = jax.random.normal(jax.random.PRNGKey(0), (3, 7, 3, 2, 8)) * 2.0
  out = attention.self_attention(qkv, "xla")
  np.testing.assert_allclose(out, _numpy_attention(np.asarray(qkv)), rtol=1e-5, atol=1e-6)

  def jax_reference(qkv):
    return jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], implementation="xla")

  cotangent = jax.random.normal(jax.random.PRNGKey(1), out.shape)
  grads = [jax.grad(lambda x, f=f: jnp.sum(f(x) * cotangent))(qkv)
           for f in (lambda x: attention.self_attention(x, "xla"), jax_reference)]
  np.testing.assert_allclose(grads[0], grads[1], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="'flash'"):
    attention.self_attention(qkv, "flash")


def _select(requested="auto", platform="cuda", dtype=jnp.bfloat16, head_dim=64, capability="9.0"):
  return attention.select_attention(requested, platform=platform, dtype=dtype, head_dim=head_dim,
                                    compute_capability=capability)


def test_cudnn_is_chosen_where_it_can_run():
  assert _select() == "cudnn"
  assert _select(dtype=jnp.float16, capability="8.0") == "cudnn"
  assert _select(head_dim=80) == "cudnn"  # ViT-H/14: 1280 / 16
  assert _select(head_dim=256) == "cudnn"  # Hopper takes up to 256
  assert _select(requested="xla") == "xla"


@pytest.mark.parametrize("overrides,reason", [
    (dict(platform="cpu", capability=None), "backend is 'cpu'"),
    (dict(platform="rocm", capability=None), "backend is 'rocm'"),
    (dict(dtype=jnp.float32), "float32"),
    (dict(capability="7.5"), "compute capability 7.5"),
    (dict(head_dim=60), "head dimension 60"),
    (dict(head_dim=256, capability="8.6"), "up to 128"),
])
def test_xla_is_chosen_where_cudnn_cannot_run(overrides, reason):
  assert _select(**overrides) == "xla"
  with pytest.raises(ValueError, match=reason):
    _select(requested="cudnn", **overrides)


# --- validation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("key,value", [("scan_blocks", 1), ("scan_blocks", None), ("remat", "dots"),
                                       ("remat", None), ("attention", "flash"),
                                       ("attention", "cudnn")])  # cudnn: not on this CPU
def test_bad_compilation_keys_name_the_key(key, value):
  config = vit.default_config("Ti/8")
  vit.validate_config(config, 32)
  # As a config.json read back would hold it (a ConfigDict refuses to retype a field).
  config = ml_collections.ConfigDict({**config.to_dict(), key: value})
  with pytest.raises(ValueError, match=f"config.model.{key}="):
    vit.validate_config(config, 32)
