"""Context encoders: region areas, overlap bands and weights against numpy, the weighted L2 against numpy, the
adversarial stop-gradients, ViT and ResNet decoders, pictures, bad configs, recipes and a command-line run
that resumes exactly."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import contrastive_helpers as helpers
from sslx import checks
from sslx.methods import RunLength
from sslx.methods import inpainting
from sslx.pretext import regions
from test_configs import load_config

CONFIG = "inpainting_fashion_mnist"
BATCH, SIZE, BLOCK, OVERLAP = 4, 16, 4, 2
TINY = {"model.dtype": "float32", "data.image_size": SIZE, "method.block_size": BLOCK,
        "method.overlap": OVERLAP}


def _config(resnet=False, **overrides):
  """The :test config (one-block ViT of width 32, or a ResNet of width 8, 10 layers deep to compile faster) at
  16 px, unlocked."""
  config = load_config(CONFIG, "test,resnet" if resnet else "test")
  config.unlock()
  if resnet:
    config.model.variant = "10"
  for key, value in {**TINY, **overrides}.items():
    section, leaf = key.split(".")
    config[section][leaf] = value
  return config


def _images(seed=0, size=SIZE):
  return np.random.default_rng(seed).normal(size=(BATCH, size, size, 1)).astype(np.float32)


def _numpy_band(region, overlap):
  """Pixels outside ``region`` with a region pixel within Chebyshev distance ``overlap``, by brute force."""
  batch, height, width = region.shape
  band = np.zeros_like(region)
  for b in range(batch):
    rows, cols = np.nonzero(region[b])
    for y in range(height):
      for x in range(width):
        near = (np.abs(rows - y) <= overlap) & (np.abs(cols - x) <= overlap)
        band[b, y, x] = not region[b, y, x] and near.any()
  return band


@pytest.mark.parametrize("height, width", [(28, 28), (16, 24)])
def test_central_region_is_the_middle_quarter(height, width):
  region = np.asarray(regions.central_region(2, height, width))
  expected = np.zeros((height, width), bool)
  expected[height // 4:height // 4 + height // 2, width // 4:width // 4 + width // 2] = True
  np.testing.assert_array_equal(region, np.broadcast_to(expected, region.shape))
  assert region[0].sum() == height * width // 4


def test_random_blocks_are_a_quarter_of_a_shifted_block_grid():
  batch, size, block = 64, 28, 7
  region = np.asarray(regions.random_blocks(jax.random.PRNGKey(0), batch, size, size, block))
  assert (region.sum(axis=(1, 2)) == size * size // 4).all()
  shifts_seen = set()
  for mask in region:
    # Some shift in [0, b)^2 rolls the mask back onto the grid, where every block is all in or all out.
    matches = [(dy, dx) for dy in range(block) for dx in range(block)
               if _is_block_constant(np.roll(mask, (-dy, -dx), axis=(0, 1)), block)]
    assert matches, "not a shifted union of grid blocks"
    shifts_seen.update(matches[:1])
  assert len(shifts_seen) > 10
  assert len({mask.tobytes() for mask in region}) == batch


def _is_block_constant(mask, block):
  blocks = mask.reshape(mask.shape[0] // block, block, mask.shape[1] // block, block)
  return bool((blocks.all(axis=(1, 3)) == blocks.any(axis=(1, 3))).all())


def test_overlap_band_and_weights_against_numpy():
  key = jax.random.PRNGKey(1)
  region = np.asarray(regions.random_blocks(key, 3, 20, 20, 5))
  region = region | np.asarray(regions.central_region(3, 20, 20))
  for overlap in (0, 1, 4):
    band = _numpy_band(region, overlap)
    np.testing.assert_array_equal(regions.overlap_band(jnp.asarray(region), overlap), band)
    expected = np.where(region, 1.0, np.where(band, 10.0, 0.0))
    np.testing.assert_array_equal(regions.loss_weights(jnp.asarray(region), overlap, 10.0), expected)
  central = np.asarray(regions.central_region(1, 28, 28))
  assert _numpy_band(central, 4).sum() == 22 * 22 - 14 * 14  # a 4 px frame around the 14 x 14 square


def _numpy_region_l2(pred, target, weights):
  """``sum w (pred - target)^2 / (C * #{w > 0})`` in float64."""
  squared = ((pred.astype(np.float64) - target) ** 2).sum(axis=-1)
  return float((weights * squared).sum() / (target.shape[-1] * (weights > 0).sum()))


def test_region_l2_against_numpy_and_blind_outside_region_and_band():
  rng = np.random.default_rng(2)
  pred, target = (rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32) for _ in range(2))
  region = regions.random_blocks(jax.random.PRNGKey(3), BATCH, SIZE, SIZE, BLOCK)
  weights = np.asarray(regions.loss_weights(region, OVERLAP, 10.0))
  loss = float(regions.region_l2_loss(pred, target, weights))
  np.testing.assert_allclose(loss, _numpy_region_l2(pred, target, weights), rtol=1e-6)
  outside = tuple(np.argwhere(weights == 0)[0])
  changed_pred, changed_target = pred.copy(), target.copy()
  changed_pred[outside] += 5.0
  changed_target[outside] -= 5.0
  assert float(regions.region_l2_loss(changed_pred, target, weights)) == loss
  assert float(regions.region_l2_loss(pred, changed_target, weights)) == loss
  for weight in (1.0, 10.0):
    inside = tuple(np.argwhere(weights == weight)[0])
    changed = target.copy()
    changed[inside] += 1.0
    assert float(regions.region_l2_loss(pred, changed, weights)) != loss


@pytest.fixture(scope="module", params=["vit", "resnet"])
def fresh(request):
  """A freshly initialised tiny bundle on noise images, with the adversarial loss on at weight 0.5 (so both of
  the generator's terms weigh), and its loss and gradients from one compilation."""
  config = _config(resnet=request.param == "resnet", **{"method.adversarial_weight": 0.5})
  if request.param == "resnet":
    config.method.decoder_upsamples = 2
  method = inpainting.build(config, RunLength(10, 10))
  images = _images()
  variables, method_state = nn.unbox(jax.jit(method.init)(jax.random.PRNGKey(0), {"image": images[:1]}))
  rng = jax.random.PRNGKey(7)

  def loss_of(params):
    return method.loss_fn({**variables, "params": params}, method_state, {"image": images}, rng)

  (loss, aux), grads = jax.jit(jax.value_and_grad(loss_of, has_aux=True))(variables["params"])
  return dict(config=config, method=method, variables=variables, method_state=method_state, images=images,
              rng=rng, loss=loss, aux=aux, grads=grads, generator=inpainting.generator_from_config(config),
              critic=inpainting.Discriminator(config.method.discriminator_width))


def _generator_pass(fresh, params):
  """The region of `loss_fn`'s key, the loss weights, and the generator's prediction on the filled images."""
  images = fresh["images"]
  region = regions.random_blocks(jax.random.split(fresh["rng"])[0], BATCH, SIZE, SIZE, BLOCK)
  weights = regions.loss_weights(region, OVERLAP, 10.0)
  generator_params = {k: v for k, v in params.items() if k != "discriminator"}
  model_state = {k: v for k, v in fresh["variables"].items() if k != "params"}
  pred, _ = fresh["generator"].apply({"params": generator_params, **model_state},
                                     regions.fill_regions(jnp.asarray(images), region), train=True,
                                     mutable=["batch_stats"])
  return weights, pred


def _softplus(x):
  return np.logaddexp(0.0, np.asarray(x, np.float64))


def test_loss_is_weighted_l2_plus_both_adversarial_terms(fresh):
  params, images = fresh["variables"]["params"], fresh["images"]
  weights, pred = _generator_pass(fresh, params)
  assert pred.shape == images.shape
  reconstruction = _numpy_region_l2(np.asarray(pred), images, np.asarray(weights))
  shown = np.asarray(weights)[..., None] > 0
  judge = lambda x: np.asarray(fresh["critic"].apply({"params": params["discriminator"]}, x))
  fake_logits, real_logits = judge(np.where(shown, pred, 0.0)), judge(np.where(shown, images, 0.0))
  adversarial = _softplus(-fake_logits).mean()
  critic_loss = _softplus(-real_logits).mean() + _softplus(fake_logits).mean()
  metrics, state, model_state = fresh["aux"]
  np.testing.assert_allclose(float(metrics["reconstruction"]), reconstruction, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["adversarial"]), adversarial, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["discriminator_loss"]), critic_loss, rtol=1e-5)
  np.testing.assert_allclose(float(fresh["loss"]), 0.5 * reconstruction + 0.5 * adversarial + critic_loss,
                             rtol=1e-5)
  assert state == {} and (set(model_state) == {"batch_stats"}) == (fresh["config"].model.name == "resnet")


def test_stop_gradients_give_each_player_only_its_own_loss(fresh):
  """The discriminator's gradient is that of L_D alone (the prediction held fixed); the encoder's and the
  decoder's are those of L_G alone (the discriminator held fixed), each computed here without the other."""
  params, images = fresh["variables"]["params"], fresh["images"]
  weights, pred = _generator_pass(fresh, params)
  shown = (weights > 0)[..., None]
  real, fake = jnp.where(shown, images, 0.0), jnp.where(shown, pred, 0.0)
  judge = lambda critic, x: fresh["critic"].apply({"params": critic}, x)

  def critic_loss(critic):
    return jnp.mean(jax.nn.softplus(-judge(critic, real))) + jnp.mean(jax.nn.softplus(judge(critic, fake)))

  def generator_loss(generator_params):
    weights, pred = _generator_pass(fresh, {**generator_params, "discriminator": params["discriminator"]})
    fake = jnp.where((weights > 0)[..., None], pred, 0.0)
    adversarial = jnp.mean(jax.nn.softplus(-judge(params["discriminator"], fake)))
    return 0.5 * regions.region_l2_loss(pred, images, weights) + 0.5 * adversarial

  expected_critic = jax.jit(jax.grad(critic_loss))(params["discriminator"])
  generator_params = {k: v for k, v in params.items() if k != "discriminator"}
  expected_generator = jax.jit(jax.grad(generator_loss))(generator_params)
  grads = fresh["grads"]
  assert set(grads) == {"encoder", "decoder", "discriminator"}
  for expected, actual in ((expected_critic, grads["discriminator"]),
                           (expected_generator, {k: grads[k] for k in generator_params})):
    for want, got in zip(jax.tree.leaves(expected), jax.tree.leaves(actual), strict=True):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))
  assert max(float(np.abs(leaf).max()) for leaf in jax.tree.leaves(grads["encoder"])) > 0


def test_without_the_adversary_there_is_no_discriminator():
  config = _config(resnet=False)
  method = inpainting.build(config, RunLength(1, 1))
  images = _images(1)
  variables, state = nn.unbox(method.init(jax.random.PRNGKey(0), {"image": images[:1]}))
  assert set(variables["params"]) == {"encoder", "decoder"}
  loss, (metrics, _, _) = jax.jit(method.loss_fn)(variables, state, {"image": images}, jax.random.PRNGKey(2))
  assert set(metrics) == {"loss", "reconstruction"} and float(loss) == float(metrics["reconstruction"])


def test_embed_is_the_encoder_on_whole_unmasked_images(fresh):
  method, variables, images = fresh["method"], fresh["variables"], fresh["images"]
  features = method.embed(variables, fresh["method_state"], images)
  encoder_variables = method.encoder_variables(variables, fresh["method_state"])
  _, aux = fresh["generator"].encoder.apply(encoder_variables, images, train=False)
  np.testing.assert_array_equal(features, aux["pooled"])


def test_visualize_pastes_the_prediction_into_the_hole(fresh):
  method, variables, images, rng = fresh["method"], fresh["variables"], fresh["images"], jax.random.PRNGKey(4)
  pictures = jax.jit(method.visualize)(variables, fresh["method_state"], {"image": images}, rng)
  assert list(pictures) == ["masked", "inpainted", "original"]
  region = np.asarray(regions.random_blocks(rng, BATCH, SIZE, SIZE, BLOCK))[..., None]
  pred = fresh["generator"].apply({k: v for k, v in variables.items() if k != "params"}
                                  | {"params": {k: v for k, v in variables["params"].items()
                                                if k != "discriminator"}},
                                  np.where(region, 0.0, images), train=False)
  np.testing.assert_array_equal(pictures["original"], images)
  np.testing.assert_array_equal(pictures["masked"], np.where(region, 0.0, images))
  np.testing.assert_allclose(pictures["inpainted"], np.where(region, pred, images), atol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    ({"method.block_size": 3}, r"config\.method\.block_size=3 must divide config\.data\.image_size=16"),
    ({"method.block_size": 16}, r"config\.method\.block_size=16 must divide .* even number of blocks"),
    ({"method.region": "ring"}, r"config\.method\.region='ring' is not one of"),
    ({"method.adversarial_weight": 1.0},
     r"config\.method\.adversarial_weight=1\.0 must be a number in \[0, 1\)"),
    ({"method.overlap_weight": 0.0}, r"config\.method\.overlap_weight=0\.0 must be a number > 0"),
    ({"method.overlap": -1}, r"config\.method\.overlap=-1 must be an int"),
    ({"method.patch_size": 8}, r"config\.method\.patch_size is not a context encoder key"),
])
def test_bad_configs_name_the_key(overrides, message):
  with pytest.raises(checks.ConfigError, match=message):
    checks.validate_run_config(_config(**overrides))


@pytest.mark.parametrize("overrides, message", [
    ({"method.decoder_upsamples": 5}, r"config\.method\.decoder_upsamples=5: 2\^5 does not divide "
                                      r"config\.data\.image_size=16"),
    ({"method.region": "center", "data.image_size": 15}, r"config\.method\.region='center' needs an even "
                                                         r"config\.data\.image_size, not 15"),
])
def test_bad_resnet_configs_name_the_key(overrides, message):
  with pytest.raises(checks.ConfigError, match=message):
    checks.validate_run_config(_config(resnet=True, **overrides))


def test_batchnorm_groups_must_split_the_batch():
  with pytest.raises(checks.ConfigError, match=r"config\.model\.bn_groups=3 must split the 32 rows"):
    checks.validate_run_config(_config(resnet=True, **{"model.bn_groups": 3}))


def test_recipes():
  config = load_config(CONFIG)
  assert (config.batch_size, config.num_epochs, config.model.variant, config.method.region) == (
      256, 2, "Ti/4", "random_blocks")
  checks.validate_run_config(config)
  checks.validate_run_config(load_config(CONFIG, "resnet"))
  assert load_config(CONFIG, "region=center").method.region == "center"
  imagenet = load_config("inpainting_imagenet")
  assert (imagenet.data.image_size, imagenet.batch_size, imagenet.optimizer.b1, imagenet.method.overlap,
          imagenet.method.overlap_weight, imagenet.method.adversarial_weight) == (128, 64, 0.5, 4, 10.0, 0.0)
  adversarial = load_config("inpainting_imagenet", "adversarial")
  assert (adversarial.method.adversarial_weight, adversarial.optimizer.lr_mults) == (
      0.001, (("discriminator/.*", 0.1),))
  for variant in (imagenet, adversarial, load_config("inpainting_imagenet", "local,adversarial")):
    checks.validate_run_config(variant, open_data=False)  # ImageNet is not on this machine


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
  return helpers.fresh_cli_run(CONFIG, tmp_path_factory)


def test_cli_run_writes_checkpoints_and_pictures_and_resumes_exactly(cli_run, tmp_path):
  assert sorted(int(p.name) for p in (cli_run / "checkpoints").iterdir()) == [1, 2, 3, 4, 5, 6]
  assert sorted(p.name for p in (cli_run / "pictures").iterdir()) == ["step_0000003.png", "step_0000006.png"]
  helpers.assert_resumes_exactly(CONFIG, cli_run, tmp_path)
