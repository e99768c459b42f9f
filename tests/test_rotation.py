"""RotNet: quarter turns against numpy (np.rot90, RotNet's own formula), the 4B batch and its labels, the
cross-entropy against numpy, build + loss + gradients with a ViT and a ResNet, the evaluation features, bad
configs, the recipes, and a command-line run that resumes exactly."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import contrastive_helpers as helpers
from sslx import checks
from sslx import optim
from sslx.methods import RunLength
from sslx.methods import rotation as rotation_method
from sslx.pretext import rotation
from test_configs import load_config

CONFIG = "rotation_fashion_mnist"
BATCH, SIZE = 3, 16
TINY = {"model.dtype": "float32", "data.image_size": SIZE}


def _images(seed=0, size=SIZE, channels=1):
  return np.random.default_rng(seed).normal(size=(BATCH, size, size, channels)).astype(np.float32)


def _numpy_cross_entropy(logits, labels):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(axis=1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  return -log_probs[np.arange(len(labels)), labels].mean(), np.mean(logits.argmax(axis=1) == labels)


@pytest.mark.parametrize("k", [-1, 0, 1, 2, 3, 5])
def test_rotate_is_np_rot90_over_height_and_width(k):
  images = _images(channels=3)
  np.testing.assert_array_equal(rotation.rotate(images, k), np.rot90(images, k, axes=(1, 2)))


def test_one_quarter_turn_is_counter_clockwise_as_rotnet_turns_90_degrees():
  images = _images(1, channels=3)
  turned = np.asarray(rotation.rotate(images, 1))
  for image, result in zip(images, turned, strict=True):
    rotnet_90_degrees = np.flipud(np.transpose(image, (1, 0, 2)))  # RotNet's rotate_img(image, 90)
    np.testing.assert_array_equal(result, rotnet_90_degrees)
  marked = np.zeros((1, 4, 4, 1), np.float32)
  marked[0, 0, 3, 0] = 1.0  # top-right corner -> top-left: counter-clockwise on screen
  assert np.argwhere(np.asarray(rotation.rotate(marked, 1))[0, ..., 0]).tolist() == [[0, 0]]


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_turning_back_restores_the_images_bit_for_bit(k):
  images = _images(2, channels=3)
  back = jax.jit(lambda x: rotation.rotate(rotation.rotate(x, k), 4 - k))(images)
  np.testing.assert_array_equal(back, images)


def test_rotation_batch_holds_every_turn_of_every_image_with_its_label():
  images = _images(3, channels=2)
  inputs, labels = jax.jit(rotation.rotation_batch)(images)
  assert inputs.shape == (4 * BATCH, SIZE, SIZE, 2) and labels.dtype == jnp.int32
  for b in range(BATCH):
    for k in range(4):
      np.testing.assert_array_equal(inputs[4 * b + k], np.rot90(images[b], k, axes=(0, 1)))
      assert int(labels[4 * b + k]) == k


def test_rotations_need_square_images():
  with pytest.raises(ValueError, match="square images"):
    rotation.rotation_batch(np.zeros((2, 8, 6, 1), np.float32))


def test_classification_loss_is_numpys_cross_entropy():
  rng = np.random.default_rng(4)
  logits, labels = rng.normal(size=(12, 4)).astype(np.float32) * 3, rng.integers(0, 4, size=12)
  loss, top1 = rotation_method.classification_loss(logits, jnp.asarray(labels))
  expected_loss, expected_top1 = _numpy_cross_entropy(logits, labels)
  np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-6)
  assert float(top1) == pytest.approx(expected_top1)


def _numpy_rotation_batch(images):
  return np.concatenate([[np.rot90(image, k, axes=(0, 1)) for k in range(4)] for image in images])


def _fresh(encoder):
  """A tiny RotNet with ``encoder`` ('vit': one block of width 32; 'resnet': ResNet-18 of width 8): config,
  method, model, variables; the loss, metrics, BatchNorm state and gradients of one step; and, from the same
  compilation, the model's training-mode logits and statistics on the four turns built by numpy."""
  config = helpers.tiny_config(CONFIG, **TINY) if encoder == "vit" else load_config(CONFIG, "resnet,test")
  if encoder == "resnet":
    config.unlock()
    config.data.image_size = SIZE
  method = rotation_method.build(config, RunLength(10, 10))
  model = rotation_method.model_from_config(config)
  images = _images()
  variables = nn.unbox(jax.jit(method.init)(jax.random.PRNGKey(0), {"image": images[:1]})[0])

  def loss_of(params):
    return method.loss_fn({**variables, "params": params}, {}, {"image": images}, jax.random.PRNGKey(1))

  def step_and_reference(params):
    reference = model.apply({**variables, "params": params}, _numpy_rotation_batch(images), train=True,
                            mutable=["batch_stats"])
    return jax.value_and_grad(loss_of, has_aux=True)(params), reference

  ((loss, (metrics, _, model_state)), grads), (logits, stats) = jax.jit(step_and_reference)(
      variables["params"])
  return dict(config=config, method=method, model=model, images=images, variables=variables, loss=loss,
              metrics=metrics, model_state=model_state, grads=grads, logits=logits, stats=stats)


@pytest.fixture(scope="module")
def vit():
  return _fresh("vit")


@pytest.fixture(scope="module")
def resnet():
  return _fresh("resnet")


@pytest.mark.parametrize("encoder", ["vit", "resnet"])
def test_loss_is_the_cross_entropy_of_the_heads_logits_on_the_four_turns(encoder, request):
  fresh = request.getfixturevalue(encoder)
  assert fresh["logits"].shape == (4 * BATCH, 4)
  expected_loss, expected_top1 = _numpy_cross_entropy(fresh["logits"], np.tile(np.arange(4), BATCH))
  np.testing.assert_allclose(float(fresh["loss"]), expected_loss, rtol=1e-5)
  assert float(fresh["metrics"]["rotation_top1"]) == pytest.approx(expected_top1)


@pytest.mark.parametrize("encoder", ["vit", "resnet"])
def test_one_gradient_step_reaches_encoder_and_head(encoder, request):
  fresh = request.getfixturevalue(encoder)
  assert np.isfinite(float(fresh["loss"]))
  for part in ("encoder", "head"):
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(fresh["grads"][part])]
    assert all(np.isfinite(norms)) and max(norms) > 0, part
  width = jax.eval_shape(fresh["method"].embed, fresh["variables"], {}, fresh["images"]).shape[1]
  assert jax.tree.map(np.shape, fresh["grads"]["head"]) == {"logits": {"kernel": (width, 4), "bias": (4,)}}


def test_batch_statistics_come_from_one_pass_over_the_four_turns(vit, resnet):
  """The ResNet's statistics move as one training pass over the 4B inputs moves them; a ViT has none."""
  updated = jax.tree.leaves(resnet["model_state"]["batch_stats"])
  for got, want in zip(updated, jax.tree.leaves(resnet["stats"]["batch_stats"]), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  before = jax.tree.leaves(resnet["variables"]["batch_stats"])
  assert any(float(np.abs(a - b).max()) > 0 for a, b in zip(updated, before, strict=True))
  assert vit["model_state"] == {}


@pytest.mark.parametrize("encoder", ["vit", "resnet"])
def test_embed_is_the_encoders_pooled_features_of_the_upright_image(encoder, request):
  fresh = request.getfixturevalue(encoder)
  method, variables, images = fresh["method"], fresh["variables"], fresh["images"]
  features = method.embed(variables, {}, images)
  _, aux = fresh["model"].encoder.apply(method.encoder_variables(variables, {}), images, train=False)
  assert features.dtype == jnp.float32 and features.shape[0] == BATCH
  np.testing.assert_array_equal(features, aux["pooled"])
  turned = method.embed(variables, {}, np.asarray(rotation.rotate(images, 1)))
  assert float(np.abs(turned - features).max()) > 1e-4


@pytest.mark.parametrize("overrides, message", [
    ({"method.hidden_dim": 0}, r"config\.method\.hidden_dim=0 must be an int"),
    ({"method.num_permutations": 4}, r"config\.method\.num_permutations is not a RotNet key"),
])
def test_bad_configs_name_the_key(overrides, message):
  with pytest.raises(checks.ConfigError, match=message):
    checks.validate_run_config(helpers.tiny_config(CONFIG, **overrides))


def test_batchnorm_groups_must_split_the_four_turns():
  config = load_config(CONFIG, "resnet,test")
  config.unlock()
  config.model.bn_groups = 3
  with pytest.raises(checks.ConfigError, match=r"config\.model\.bn_groups=3 must split the 128 rows"):
    checks.validate_run_config(config)


def test_fashion_mnist_recipes():
  config, quickstart = load_config(CONFIG), load_config("mae_fashion_mnist")
  assert config.model.to_dict() == quickstart.model.to_dict()
  assert (config.batch_size, config.num_epochs, config.optimizer.name, config.data.image_size) == (
      256, 2, "adamw", 28)
  assert config.method.hidden_dim is None and config.eval.after_pretrain
  resnet = load_config(CONFIG, "resnet")
  assert (resnet.model.name, resnet.model.variant, resnet.model.width, resnet.model.small_images) == (
      "resnet", "18", 32, True)


def test_imagenet_recipe_follows_rotnets_released_schedule():
  config = load_config("rotation_imagenet")
  assert (config.batch_size, config.num_epochs, config.data.image_size, config.model.variant) == (
      192, 50, 224, "50")
  opt = config.optimizer
  assert (opt.name, opt.momentum, opt.nesterov, opt.weight_decay, opt.wd_mults) == (
      "sgd", 0.9, True, 5e-4, ((".*", 1.0),))
  augment = config.data.augment
  assert (augment.crop_scale, augment.interpolation, augment.hflip) == ((0.08, 1.0), "bilinear", True)
  steps = 1000  # a nominal epoch: the schedule is in epochs
  lr = optim.learning_rate_schedule(config, steps_per_epoch=steps, total_steps=50 * steps)
  assert [float(lr(epoch * steps)) for epoch in (0, 14, 15, 29, 30, 45, 49)] == pytest.approx(
      [1e-2, 1e-2, 1e-3, 1e-3, 1e-4, 1e-5, 1e-5])
  local = load_config("rotation_imagenet", "local")
  assert (local.batch_size, local.data.image_size, local.model.width, local.total_steps) == (8, 32, 8, 20)
  method = rotation_method.build(config, RunLength(1, 1))
  params = nn.unbox(jax.eval_shape(lambda x: method.init(jax.random.PRNGKey(0), {"image": x})[0]["params"],
                                   jax.ShapeDtypeStruct((2, 224, 224, 3), np.float32)))
  assert jax.tree.map(np.shape, params["head"]) == {"logits": {"kernel": (2048, 4), "bias": (4,)}}


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
  """The :test config from the command line: 6 steps at batch 32, a checkpoint after every step."""
  return helpers.fresh_cli_run(CONFIG, tmp_path_factory)


def test_cli_run_resumes_exactly(cli_run, tmp_path):
  assert sorted(int(p.name) for p in (cli_run / "checkpoints").iterdir()) == [1, 2, 3, 4, 5, 6]
  assert all(0.0 <= row["rotation_top1"] <= 1.0 for row in helpers.rows(cli_run).values())
  helpers.assert_resumes_exactly(CONFIG, cli_run, tmp_path)
