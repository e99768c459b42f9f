"""SimMIM: the L1 loss on masked pixels (against numpy), the mask token inside the encoder, the progressive
ratio through one compilation, pictures, configs and recipes, and runs through the one loop (command line,
resume, 8 devices)."""
import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import contrastive_helpers as helpers
from multiprocess_helpers import REPO, cpu_env
from sslx import checks
from sslx import losses
from sslx import masking
from sslx import optim
from sslx.methods import RunLength
from sslx.methods import simmim
from sslx.models.patches import patchify
from sslx.models.patches import unpatchify
from test_configs import load_config
from test_configs import vit_param_formula

CONFIG = "simmim_fashion_mnist"
# 32 px grey images, patch 4 (an 8 x 8 grid) and mask cells of 8 px (4 x 4 cells of 2 x 2 patches); one block
# of width 32 and no drop path, so a training-mode pass is deterministic.
TINY = {"model.width": 32, "model.num_heads": 2, "model.mlp_dim": 64, "model.drop_path_rate": 0.0,
        "model.dtype": "float32", "data.image_size": 32, "method.mask_patch_size": 8}
BATCH, SIZE, PATCH, CELL = 4, 32, 4, 2
GRID = SIZE // PATCH


def _config(**overrides):
  return helpers.tiny_config(CONFIG, **{**TINY, **overrides})


def _mask(key, ratio=0.6):
  return masking.simmim_mask(key, BATCH, (GRID, GRID), CELL, ratio)


@pytest.fixture(scope="module")
def fresh():
  """A freshly initialised tiny SimMIM, a batch of noise images and a mask of 10 of the 16 cells."""
  config = _config()
  method = simmim.build(config, RunLength(10, 10))
  images = np.random.default_rng(0).normal(size=(BATCH, SIZE, SIZE, 1)).astype(np.float32)
  variables, method_state = nn.unbox(jax.jit(method.init)(jax.random.PRNGKey(0), {"image": images[:1]}))
  return dict(config=config, method=method, model=simmim.model_from_config(config), variables=variables,
              method_state=method_state, images=images, mask=np.asarray(_mask(jax.random.PRNGKey(5))))


def _pixel_mask(mask):
  """``(B, L)`` patch mask -> ``(B, H, W, 1)`` pixel mask, by numpy alone."""
  cells = mask.reshape(BATCH, GRID, GRID).astype(np.float32)
  return np.repeat(np.repeat(cells, PATCH, axis=1), PATCH, axis=2)[..., None]


def _reference_l1(images, reconstruction, mask):
  """The reference's ``(|x - x_rec| * m).sum() / m.sum() / C`` on pixel arrays."""
  pixels = _pixel_mask(mask)
  return float(np.sum(np.abs(images - reconstruction) * pixels) / pixels.sum() / images.shape[-1])


def test_loss_is_the_l1_of_masked_pixels_over_masked_pixels_and_channels():
  rng = np.random.default_rng(1)
  images, reconstruction = (rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32) for _ in range(2))
  mask = np.asarray(_mask(jax.random.PRNGKey(2)))
  loss = losses.masked_reconstruction_loss(patchify(reconstruction, PATCH), patchify(images, PATCH), mask,
                                           norm_pix=False, p=1)
  np.testing.assert_allclose(float(loss), _reference_l1(images, reconstruction, mask), rtol=1e-6)


def test_method_loss_is_that_l1_of_the_heads_prediction(fresh):
  """`loss_fn`'s loss and logged ratio against numpy, with the mask it draws (from its key's first half)."""
  method, images, rng = fresh["method"], fresh["images"], jax.random.PRNGKey(7)
  loss, (metrics, state, model_state) = jax.jit(method.loss_fn)(fresh["variables"], fresh["method_state"],
                                                                {"image": images}, rng)
  mask = np.asarray(_mask(jax.random.split(rng)[0]))
  pred = fresh["model"].apply(fresh["variables"], images, mask, train=True)
  assert pred.shape == (BATCH, GRID * GRID, PATCH * PATCH)
  np.testing.assert_allclose(float(loss), _reference_l1(images, np.asarray(unpatchify(pred, PATCH)), mask),
                             rtol=1e-5)
  assert float(metrics["mask_ratio"]) == 10 * 4 / 64  # ceil(16 * 0.6) cells of 4 patches
  assert int(state["step"]) == 0 and model_state == {}  # the step advances in `after_update` only


def test_loss_counts_masked_patches_only():
  rng = np.random.default_rng(3)
  pred, target = (jnp.asarray(rng.normal(size=(BATCH, GRID * GRID, 16)), jnp.float32) for _ in range(2))
  mask = np.asarray(_mask(jax.random.PRNGKey(4)))
  loss = lambda p, t: losses.masked_reconstruction_loss(p, t, mask, norm_pix=False, p=1)
  base = float(loss(pred, target))
  (visible_row, visible_col), (masked_row, masked_col) = np.argwhere(~mask)[0], np.argwhere(mask)[0]
  assert float(loss(pred, target.at[visible_row, visible_col].add(5.0))) == base
  assert float(loss(pred.at[visible_row, visible_col].add(5.0), target)) == base
  assert float(loss(pred.at[masked_row, masked_col].add(5.0), target)) != base
  grads = np.asarray(jax.grad(loss)(pred, target))
  assert np.all(grads[~mask] == 0.0)
  assert np.all(grads[mask] != 0.0)


def test_encoder_replaces_masked_patch_embeddings_by_the_mask_token(fresh):
  """With the mask token set to the embedding of a black patch (the patch projection's bias), the masked
  pass equals an unmasked pass over the image with its masked patches blacked out; the masked pixels are never
  read, and the real token changes the output."""
  model, variables, images, mask = fresh["model"], fresh["variables"], fresh["images"], fresh["mask"]
  encoder = variables["params"]["encoder"]
  black_token = encoder["patch_embed"]["bias"].reshape(1, 1, -1)
  as_black = {"params": {**variables["params"], "encoder": {**encoder, "mask_token": black_token}}}
  blacked_out = images * (1.0 - _pixel_mask(mask))
  apply = jax.jit(lambda v, x, m: model.apply(v, x, m, train=False))
  masked = apply(as_black, images, mask)
  np.testing.assert_allclose(masked, apply(as_black, blacked_out, None), rtol=1e-5, atol=1e-5)
  scribbled = images + 3.0 * _pixel_mask(mask)
  np.testing.assert_array_equal(apply(as_black, scribbled, mask), masked)
  assert float(np.abs(apply(variables, images, mask) - masked).max()) > 1e-3


def test_embed_is_the_unmasked_encoder(fresh):
  method, variables, images, mask = fresh["method"], fresh["variables"], fresh["images"], fresh["mask"]
  features = method.embed(variables, fresh["method_state"], images)
  encoder = fresh["model"].encoder
  encoder_variables = method.encoder_variables(variables, fresh["method_state"])
  _, aux = encoder.apply(encoder_variables, images, train=False)
  assert features.shape == (BATCH, 32) and features.dtype == jnp.float32
  np.testing.assert_array_equal(features, aux["pooled"])
  _, masked_aux = encoder.apply(encoder_variables, images, train=False, mask=mask)
  assert float(np.abs(masked_aux["pooled"] - features).max()) > 1e-3
  params = variables["params"]
  moved_token = params["encoder"]["mask_token"] + 9.0
  moved = {"params": {**params, "encoder": {**params["encoder"], "mask_token": moved_token}}}
  np.testing.assert_array_equal(method.embed(moved, fresh["method_state"], images), features)


def test_progressive_ratio_follows_the_step_through_one_compilation(fresh):
  """r_k = 0.2 + 0.6 min(k / 10, 1) over 16 cells: ceil(16 r_k) cells of 4 patches, one trace for every step
  (the steps avoid counts that land on an integer, where float rounding decides)."""
  config = _config(**{"method.mask_ratio": 0.2, "method.mask_ratio_end": 0.8})
  method = simmim.build(config, RunLength(10, 10))
  traces = []

  def logged_ratio(variables, step):
    traces.append(step)
    _, (metrics, state, _) = method.loss_fn(variables, {"step": step}, {"image": fresh["images"]},
                                            jax.random.PRNGKey(1))
    return metrics["mask_ratio"], state["step"]

  logged_ratio = jax.jit(logged_ratio)
  for step in (0, 2, 7, 9, 12):
    ratio, state_step = logged_ratio(fresh["variables"], jnp.int32(step))
    cells = np.ceil(16 * (0.2 + 0.6 * min(step / 10, 1.0)))
    assert float(ratio) == cells * 4 / 64, step
    assert int(state_step) == step
  assert len(traces) == 1
  assert int(method.after_update(fresh["variables"], {"step": jnp.int32(4)}, jnp.int32(4))["step"]) == 5


def test_visualize_pastes_predictions_into_masked_patches(fresh):
  method, variables, images, rng = fresh["method"], fresh["variables"], fresh["images"], jax.random.PRNGKey(4)
  pictures = jax.jit(method.visualize)(variables, fresh["method_state"], {"image": images}, rng)
  assert list(pictures) == ["original", "masked", "reconstruction"]  # the PNG rows, top to bottom
  mask = np.asarray(_mask(rng))[..., None]
  pred = np.asarray(fresh["model"].apply(variables, images, mask[..., 0], train=False))
  target = np.asarray(patchify(images, PATCH))
  np.testing.assert_array_equal(pictures["original"], images)
  np.testing.assert_array_equal(patchify(pictures["masked"], PATCH), np.where(mask, 0.0, target))
  np.testing.assert_allclose(patchify(pictures["reconstruction"], PATCH), np.where(mask, pred, target),
                             atol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    ({"method.mask_patch_size": 6}, r"config\.method\.mask_patch_size=6 is not a multiple of the patch size"),
    ({"method.mask_patch_size": 12}, r"mask_patch_size=12 does not divide config\.data\.image_size=32"),
    ({"method.mask_patch_size": 0}, r"config\.method\.mask_patch_size=0 must be an int"),
    ({"method.mask_ratio": 1.0}, r"config\.method\.mask_ratio=1\.0 must be a number strictly between 0 and"),
    ({"method.mask_ratio": 0.95}, r"config\.method\.mask_ratio=0\.95 masks all 16 mask cells"),
    ({"method.mask_ratio_end": 0.0}, r"config\.method\.mask_ratio_end=0\.0 must be a number"),
    ({"method.mask_ratio_end": 1.5}, r"config\.method\.mask_ratio_end=1\.5 must be a number"),
    ({"method.decoder": {"width": 8}}, r"config\.method\.decoder is not a SimMIM key"),
    ({"model.mask_token": False}, r"config\.model\.mask_token=False: SimMIM replaces masked patches"),
    ({"schedule.milestone_epochs": (0.1,)},
     r"config\.schedule\.milestone_epochs=\(0\.1,\) must be .* >= config\.schedule\.warmup_epochs=0\.2"),
])
def test_bad_configs_name_the_key(overrides, message):
  with pytest.raises(checks.ConfigError, match=message):
    checks.validate_run_config(_config(**overrides))


def test_a_missing_method_key_is_named():
  config = _config()
  del config.method["mask_ratio_end"]
  with pytest.raises(checks.ConfigError, match=r"config\.method\.mask_ratio_end is missing"):
    checks.validate_run_config(config)


def test_vitb_recipe():
  config = load_config("simmim_vitb")
  assert (config.batch_size, config.num_epochs, config.data.image_size) == (2048, 800, 224)
  assert (config.model.variant, config.model.mask_token, config.model.drop_path_rate) == ("B/16", True, 0.1)
  mc = config.method
  assert (mc.mask_patch_size, mc.mask_ratio, mc.mask_ratio_end) == (32, 0.6, None)
  opt, schedule = config.optimizer, config.schedule
  assert (opt.name, opt.b1, opt.b2, opt.weight_decay, opt.grad_clip_norm) == ("adamw", 0.9, 0.999, 0.05, 5.0)
  assert (schedule.warmup_epochs, schedule.decay, schedule.milestone_epochs, schedule.gamma) == (
      10.0, "multistep", (700.0,), 0.1)
  augment = config.data.augment
  assert (augment.crop_scale, augment.interpolation, augment.hflip) == ((0.67, 1.0), "bilinear", True)
  # 4e-4 after the warm-up (1e-4 x 2048 / 512), a tenth of it from epoch 700 (ImageNet: 625 steps per epoch).
  lr = optim.learning_rate_schedule(config, steps_per_epoch=625, total_steps=800 * 625)
  assert [float(lr(epoch * 625)) for epoch in (5, 10, 699, 700, 799)] == pytest.approx(
      [2e-4, 4e-4, 4e-4, 4e-5, 4e-5])
  method = simmim.build(config, RunLength(625, 800 * 625))
  image = jax.ShapeDtypeStruct((1, 224, 224, 3), np.float32)
  init = lambda x: method.init(jax.random.PRNGKey(0), {"image": x})[0]["params"]
  params = nn.unbox(jax.eval_shape(init, image))
  count = lambda tree: sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))
  assert count(params["encoder"]) == vit_param_formula(768, 12, 16) + 768  # + the mask token
  assert jax.tree.map(np.shape, params["head"]) == {"kernel": (768, 16 * 16 * 3), "bias": (16 * 16 * 3,)}
  decays = optim.weight_decay_multipliers(params["encoder"], opt.wd_mults)
  assert (decays["mask_token"], decays["cls_token"], decays["block_0"]["attn"]["qkv"]["kernel"],
          decays["block_0"]["attn"]["qkv"]["bias"], decays["norm"]["scale"]) == (1.0, 0.0, 1.0, 0.0, 0.0)
  local = load_config("simmim_vitb", "local")
  assert (local.batch_size, local.data.image_size, local.model.depth) == (8, 64, 2)


def test_fashion_mnist_recipe_uses_the_quick_start_vit():
  config, quickstart = load_config(CONFIG), load_config("mae_fashion_mnist")
  assert {**config.model.to_dict(), "mask_token": False} == quickstart.model.to_dict()
  assert config.model.mask_token and config.data.image_size % config.method.mask_patch_size == 0
  assert (config.batch_size, config.num_epochs, config.eval.after_pretrain) == (256, 2, True)
  checks.validate_run_config(config)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
  """The :test config from the command line: 6 steps at batch 32, a checkpoint after every step."""
  return helpers.fresh_cli_run(CONFIG, tmp_path_factory)


def test_cli_run_writes_checkpoints_and_pictures_and_resumes_exactly(cli_run, tmp_path):
  assert sorted(int(p.name) for p in (cli_run / "checkpoints").iterdir()) == [1, 2, 3, 4, 5, 6]
  assert sorted(p.name for p in (cli_run / "pictures").iterdir()) == ["step_0000003.png", "step_0000006.png"]
  assert [int(helpers.read_state(cli_run, step)["['method_state']['step']"]) for step in (1, 6)] == [1, 6]
  # ceil(49 * 0.6) = 30 of the 7 x 7 cells of one patch each.
  assert all(row["mask_ratio"] == pytest.approx(30 / 49) for row in helpers.rows(cli_run).values())
  helpers.assert_resumes_exactly(CONFIG, cli_run, tmp_path)


# One batch's loss and gradients on 1 device, then with the batch (and with FSDP the parameters) split over 8
# fake CPU devices (`sharded_gradients.assert_devices_agree`); argv: the `TINY` overrides as JSON.
EIGHT_DEVICES = """
import json, sys
import jax, numpy as np
import contrastive_helpers as helpers
from sharded_gradients import assert_devices_agree
from sslx import methods
method = methods.build_method(helpers.tiny_config("simmim_fashion_mnist", **json.loads(sys.argv[1])))
images = np.random.default_rng(0).normal(size=(16, 32, 32, 1)).astype(np.float32)
assert_devices_agree(method, images, jax.random.PRNGKey(3), (1, 8))
"""


def test_eight_devices_give_the_loss_and_gradients_of_one():
  result = subprocess.run([sys.executable, "-c", EIGHT_DEVICES, json.dumps(TINY)], env=cpu_env(8), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "gradients match" in result.stdout
