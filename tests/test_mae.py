import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from conftest import tiny_mae_config
from sslx import models
from sslx.methods import RunLength, mae
from sslx.models.patches import patchify


def _batch(seed=0):
  return {"image": jnp.asarray(np.random.RandomState(seed).randn(4, 32, 32, 3), jnp.float32)}


@pytest.fixture(scope="module")
def method_and_params():
  method = mae.build(tiny_mae_config(), RunLength(1, 1))
  variables, state = jax.jit(method.init)(jax.random.key(0), _batch())
  assert set(variables) == {"params"}
  return method, variables["params"], state


def _loss_fn(method):
  """The loss as a function of params, as the loop differentiates it."""
  def loss_fn(params, state, batch, rng):
    loss, (metrics, state, model_state) = method.loss_fn({"params": params}, state, batch, rng)
    assert model_state == {}
    return loss, (metrics, state)
  return loss_fn


def test_init_returns_boxed_encoder_decoder_params(method_and_params):
  method, params, state = method_and_params
  assert (method.name, method.num_views, state) == ("mae", 1, {})
  assert set(params) == {"encoder", "decoder"}
  leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in leaves)
  assert nn.unbox(params)["decoder"]["pred"]["kernel"].shape == (16, 8 * 8 * 3)


def test_jitted_loss_and_grad(method_and_params):
  method, params, state = method_and_params
  batch, rng = _batch(), jax.random.key(1)
  # The training loop's call: value_and_grad of the jitted loss on unboxed params.
  value_and_grad = jax.jit(jax.value_and_grad(_loss_fn(method), has_aux=True))
  unboxed = nn.unbox(params)
  (loss, (metrics, new_state)), grads = value_and_grad(unboxed, state, batch, rng)
  assert loss.shape == () and loss.dtype == jnp.float32 and np.isfinite(float(loss))
  assert float(metrics["loss"]) == float(loss) and new_state == {}
  # Boxed params (as init returns them) are accepted too; tracing suffices to show it.
  assert jax.eval_shape(_loss_fn(method), params, state, batch, rng)[0].shape == ()
  assert float(value_and_grad(unboxed, state, batch, jax.random.key(2))[0][0]) != float(loss)

  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(unboxed)
  for path in (("encoder", "block_0", "attn", "qkv", "kernel"), ("encoder", "patch_embed", "kernel"),
               ("encoder", "cls_token"), ("decoder", "mask_token"), ("decoder", "pred", "kernel")):
    leaf = grads
    for key in path:
      leaf = leaf[key]
    assert float(jnp.abs(leaf).max()) > 0, path

  # A few steps of plain gradient descent on one batch and one mask must lower the loss.
  first = float(loss)
  for _ in range(5):
    unboxed = jax.tree_util.tree_map(lambda p, g: p - 1.0 * g, unboxed, grads)
    (loss, _), grads = value_and_grad(unboxed, state, batch, rng)
  assert float(loss) < 0.95 * first


def test_visualize_pastes_predictions_into_masked_patches(method_and_params):
  method, params, state = method_and_params
  batch, rng = _batch(), jax.random.key(4)
  pictures = jax.jit(method.visualize)({"params": params}, state, batch, rng)
  assert list(pictures) == ["original", "masked", "reconstruction"]  # the PNG rows, top to bottom
  assert all(v.shape == (4, 32, 32, 3) for v in pictures.values())
  model = mae.model_from_config(tiny_mae_config())
  out = jax.jit(lambda p: model.apply({"params": p}, batch["image"], train=False, rngs={"masking": rng}))(
      params)
  mask = np.asarray(out["mask"], bool)[..., None]
  target = np.asarray(patchify(batch["image"], 8))
  mean = target.mean(-1, keepdims=True)
  std = np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6)
  expected = np.where(mask, np.asarray(out["pred"]) * std + mean, target)
  np.testing.assert_allclose(patchify(pictures["reconstruction"], 8), expected, atol=1e-4)
  np.testing.assert_array_equal(patchify(pictures["masked"], 8), np.where(mask, 0.0, target))
  np.testing.assert_array_equal(pictures["original"], batch["image"])


def test_overrides_and_validation():
  config = tiny_mae_config()
  config.model.width = None
  config.model.num_heads = None
  model = mae.model_from_config(config)
  assert (model.encoder.width, model.encoder.num_heads, model.encoder.depth) == (192, 3, 2)
  assert model.decoder.patch_dim == 8 * 8 * 3
  config.model.dtype = "bfloat16"
  method = mae.build(config, RunLength(1, 1))
  variables, state = jax.eval_shape(method.init, jax.random.key(0), _batch())
  loss = jax.eval_shape(method.loss_fn, variables, state, _batch(), jax.random.key(1))[0]
  assert loss.dtype == jnp.float32
  with pytest.raises(ValueError, match="image_size=28"):
    models.validate_config(config.model, 28)
  config.method.mask_ratio = 1.0
  with pytest.raises(ValueError, match="config.method.mask_ratio=1.0"):
    mae.validate_config(config)


def test_embed_is_the_encoder_class_token_in_evaluation_mode(method_and_params):
  method, params, state = method_and_params
  images = _batch()["image"]
  features = method.embed({"params": nn.unbox(params)}, state, images)
  encoder = mae.model_from_config(tiny_mae_config()).encoder
  _, aux = encoder.apply({"params": nn.unbox(params)["encoder"]}, images, train=False)
  assert features.shape == (4, 32) and features.dtype == jnp.float32
  np.testing.assert_array_equal(features, aux["cls_token"])
  assert set(method.encoder_variables({"params": params}, state)) == {"params"}
