"""Relative position: patch positions, gaps, jitter and labels against numpy, the colour guards against their
formulas, the loss against a numpy cross-entropy, ViT and ResNet gradients, bad configs, the recipes and a
command-line run that resumes exactly."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import contrastive_helpers as helpers
from sslx import checks
from sslx import methods
from sslx import models
from sslx.methods import RunLength
from sslx.methods import relpos
from sslx.pretext import context
from test_configs import load_config

CONFIG = "relpos_fashion_mnist"
BATCH, SIZE, PATCH, GAP, JITTER = 4, 40, 8, 4, 2  # the layout spans 3 x 8 + 2 x 4 + 2 x 2 = 36 of 40 px
TINY = {"model.dtype": "float32", "data.image_size": SIZE, "method.patch_size": PATCH, "method.gap": GAP,
        "method.jitter": JITTER}
# Where each label's neighbour sits around the centre ('.'), as the module docstring draws it.
LABEL_PICTURE = ("0 1 2", "3 . 4", "5 6 7")


def _config(**overrides):
  """The tiny ViT of the :test config at 40 px with `TINY`'s layout, unlocked."""
  return helpers.tiny_config(CONFIG, **{**TINY, **overrides})


def _resnet_config(**overrides):
  """The same with the :test ResNet of width 8, 10 layers deep (compiles in half ResNet-18's time)."""
  config = load_config(CONFIG, "test,resnet")
  config.unlock()
  config.model.variant = "10"
  for key, value in {**TINY, **overrides}.items():
    section, leaf = key.split(".")
    config[section][leaf] = value
  return config


def _images(seed=0, channels=1):
  return np.random.default_rng(seed).normal(size=(BATCH, SIZE, SIZE, channels)).astype(np.float32)


def test_each_label_is_its_neighbours_cell_in_the_3x3_picture():
  """With no jitter on an image exactly the layout's size, the 9 cells are fixed: paint cell (i, j) with
  3i + j and check that the neighbour patch of label k is the cell the picture puts k in."""
  patch, gap = 5, 3
  extent = context.layout_extent(patch, gap, 0)
  image = np.full((extent, extent, 1), -1.0, np.float32)
  for i in range(3):
    for j in range(3):
      top, left = i * (patch + gap), j * (patch + gap)
      image[top:top + patch, left:left + patch] = 3 * i + j
  images = np.repeat(image[None], 64, axis=0)
  pairs = context.sample_patch_pairs(jax.random.PRNGKey(0), images, patch_size=patch, gap=gap, jitter=0)
  cell_of_label = {int(k): 3 * i + j for i, row in enumerate(LABEL_PICTURE) for j, k in enumerate(row.split())
                   if k != "."}
  np.testing.assert_array_equal(pairs.centre, 4.0)
  expected = np.array([cell_of_label[int(k)] for k in pairs.label], np.float32)
  np.testing.assert_array_equal(pairs.neighbour,
                                np.broadcast_to(expected[:, None, None, None], pairs.neighbour.shape))
  assert set(np.asarray(pairs.label).tolist()) == set(range(8))


def test_positions_keep_the_gap_and_jitter_bounds_inside_the_image():
  batch = 4096
  label, centre, neighbour = map(np.asarray, context.sample_positions(
      jax.random.PRNGKey(1), batch, (SIZE, SIZE + 6), patch_size=PATCH, gap=GAP, jitter=JITTER))
  pitch = PATCH + GAP
  for corners in (centre, neighbour):
    assert corners.min() >= 0
    assert (corners[:, 0] <= SIZE - PATCH).all() and (corners[:, 1] <= SIZE + 6 - PATCH).all()
  offsets = np.array([(i - 1, j - 1) for i, row in enumerate(LABEL_PICTURE) for j, k in enumerate(row.split())
                      if k != "."])
  relative_jitter = neighbour - centre - offsets[label] * pitch
  # Two independent jitters in [-J, J]: their difference covers [-2J, 2J], and nothing beyond.
  assert relative_jitter.min() == -2 * JITTER and relative_jitter.max() == 2 * JITTER
  assert set(np.unique(relative_jitter)) == set(range(-2 * JITTER, 2 * JITTER + 1))
  # The centre's own jitter: it sits at origin + J + pitch + j with origin in [0, slack] and |j| <= J.
  slack = np.array([SIZE, SIZE + 6]) - context.layout_extent(PATCH, GAP, JITTER)
  assert (centre >= pitch).all() and (centre <= slack + 2 * JITTER + pitch).all()
  # The gap survives the jitter: patches on different cells are at least gap - 2J apart, and never overlap.
  apart = np.abs(neighbour - centre)
  assert (apart[offsets[label] != 0] >= PATCH + GAP - 2 * JITTER).all()
  assert np.bincount(label, minlength=8).min() > batch / 8 * 0.8


def test_patches_are_the_numpy_slices_at_their_corners():
  images = _images(2, channels=3)
  pairs = context.sample_patch_pairs(jax.random.PRNGKey(3), images, patch_size=PATCH, gap=GAP, jitter=JITTER)
  for b in range(BATCH):
    (ct, cl), (nt, nl) = np.asarray(pairs.centre_corner[b]), np.asarray(pairs.neighbour_corner[b])
    np.testing.assert_array_equal(pairs.centre[b], images[b, ct:ct + PATCH, cl:cl + PATCH])
    np.testing.assert_array_equal(pairs.neighbour[b], images[b, nt:nt + PATCH, nl:nl + PATCH])


def test_colour_dropping_keeps_one_channel_and_fills_the_others_with_faint_noise():
  patches = np.random.default_rng(4).normal(size=(600, 32, 32, 3)).astype(np.float32) * np.float32(2.0)
  dropped = np.asarray(context.drop_colours(jax.random.PRNGKey(5), patches))
  same = np.all(dropped == patches, axis=(1, 2))
  assert (same.sum(axis=1) == 1).all()
  kept = same.argmax(axis=1)
  assert np.bincount(kept, minlength=3).min() > 150
  ratio = dropped.std(axis=(1, 2)) / patches[np.arange(600), :, :, kept].std(axis=(1, 2))[:, None]
  np.testing.assert_allclose(ratio[~same], 0.01, rtol=0.12)
  assert abs(dropped[~same[:, None, None, :].repeat(32, 1).repeat(32, 2)].mean()) < 1e-3


def test_projection_removes_the_green_magenta_component_of_raw_pixels():
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  patches = np.random.default_rng(6).normal(size=(5, 8, 8, 3)).astype(np.float32)
  raw = patches * np.array(std) + np.array(mean)
  axis = np.array([-1.0, 2.0, -1.0]) / np.sqrt(6.0)
  projected_raw = raw - np.outer(raw.reshape(-1, 3) @ axis, axis).reshape(raw.shape)
  expected = (projected_raw - np.array(mean)) / np.array(std)
  projected = np.asarray(context.project_green_magenta(patches, mean, std))
  np.testing.assert_allclose(projected, expected, atol=1e-5)
  np.testing.assert_allclose((projected * np.array(std) + np.array(mean)) @ axis, 0.0, atol=1e-5)


def test_patch_standardisation_is_per_channel_centring_then_rms():
  patches = np.random.default_rng(7).normal(2.0, 3.0, size=(5, 8, 8, 3)).astype(np.float32)
  centred = patches - patches.mean(axis=(1, 2), keepdims=True)
  expected = centred / np.sqrt((centred ** 2).mean(axis=(1, 2, 3), keepdims=True) + 1e-6)
  np.testing.assert_allclose(context.standardize_patches(patches), expected, rtol=1e-5, atol=1e-6)


def _log_softmax_cross_entropy(logits, labels):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(axis=1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  return float(-log_probs[np.arange(len(labels)), labels].mean())


@pytest.fixture(scope="module", params=["vit", "resnet"])
def fresh(request):
  """A freshly initialised tiny bundle (ViT of width 32 and one block, or ResNet-18 of width 8), its loss,
  metrics and gradients on a batch of noise."""
  config = _resnet_config() if request.param == "resnet" else _config()
  method = relpos.build(config, RunLength(10, 10))
  images = _images()
  variables, method_state = nn.unbox(jax.jit(method.init)(jax.random.PRNGKey(0), {"image": images[:1]}))
  rng = jax.random.PRNGKey(7)

  def loss_of(params):
    return method.loss_fn({**variables, "params": params}, method_state, {"image": images}, rng)

  (loss, aux), grads = jax.jit(jax.value_and_grad(loss_of, has_aux=True))(variables["params"])
  return dict(config=config, method=method, variables=variables, method_state=method_state, images=images,
              rng=rng, loss=loss, aux=aux, grads=grads)


def test_loss_is_the_cross_entropy_of_the_pair_heads_logits(fresh):
  """`loss_fn`'s loss against numpy, with the pairs it cuts from its key's first third."""
  config, images = fresh["config"], fresh["images"]
  pairs = context.sample_patch_pairs(jax.random.split(fresh["rng"], 3)[0], images, patch_size=PATCH, gap=GAP,
                                     jitter=JITTER)
  model = relpos.model_from_config(config)
  logits, _ = model.apply(fresh["variables"], pairs.centre, pairs.neighbour, train=True,
                          mutable=["batch_stats"])
  assert logits.shape == (BATCH, 8)
  labels = np.asarray(pairs.label)
  np.testing.assert_allclose(float(fresh["loss"]), _log_softmax_cross_entropy(logits, labels), rtol=1e-5)
  metrics, state, model_state = fresh["aux"]
  assert float(metrics["position_accuracy"]) == np.mean(np.argmax(logits, axis=1) == labels)
  assert state == {}
  assert (set(model_state) == {"batch_stats"}) == (config.model.name == "resnet")


def test_gradients_reach_encoder_and_head(fresh):
  grads = fresh["grads"]
  assert set(grads) == {"encoder", "head"}
  for name in ("encoder", "head"):
    leaves = jax.tree.leaves(grads[name])
    assert all(np.isfinite(leaf).all() for leaf in leaves)
    assert max(float(np.abs(leaf).max()) for leaf in leaves) > 0, name


def test_embed_is_the_encoder_on_whole_images(fresh):
  method, variables = fresh["method"], fresh["variables"]
  features = method.embed(variables, fresh["method_state"], fresh["images"])
  encoder = models.encoder_from_config(fresh["config"].model)
  encoder_variables = method.encoder_variables(variables, fresh["method_state"])
  _, aux = encoder.apply(encoder_variables, fresh["images"], train=False)
  assert features.dtype == jnp.float32 and features.shape[0] == BATCH
  np.testing.assert_array_equal(features, aux["pooled"])


def test_shortcut_guards_run_inside_the_loss_for_rgb_images():
  images = np.concatenate([_images(8)] * 3, axis=-1)
  for colour in ("drop", "project"):
    config = _config(**{"method.colour": colour, "method.normalize_patches": True, "data.channels": 3,
                        "data.mean": (0.5, 0.5, 0.5), "data.std": (0.25, 0.25, 0.25)})
    methods.validate_config(config)
    method = relpos.build(config, RunLength(1, 1))
    variables, state = nn.unbox(method.init(jax.random.PRNGKey(0), {"image": images[:1]}))
    loss, _ = jax.jit(method.loss_fn)(variables, state, {"image": images}, jax.random.PRNGKey(1))
    assert np.isfinite(float(loss)), colour


@pytest.mark.parametrize("overrides, message", [
    ({"method.patch_size": 12}, r"config\.method\.patch_size=12: the 3 x 3 layout .* = 48 px\) does not fit "
                                r"config\.data\.image_size=40"),
    ({"method.patch_size": 6}, r"config\.method\.patch_size=6 is not a multiple of the ViT's patch size 4"),
    ({"method.jitter": 3}, r"config\.method\.jitter=3 must be at most half config\.method\.gap=4"),
    ({"method.colour": "drop"}, r"config\.method\.colour='drop' needs RGB images"),
    ({"method.colour": "grey"}, r"config\.method\.colour='grey' is not one of"),
    ({"method.gap": -1}, r"config\.method\.gap=-1 must be an int"),
    ({"method.head_hidden_dims": (8, 0)}, r"config\.method\.head_hidden_dims=\(8, 0\) must be a tuple"),
    ({"method.mask_ratio": 0.5}, r"config\.method\.mask_ratio is not a relative position key"),
])
def test_bad_configs_name_the_key(overrides, message):
  with pytest.raises(checks.ConfigError, match=message):
    checks.validate_run_config(_config(**overrides))


def test_recipes():
  config = load_config(CONFIG)
  assert (config.batch_size, config.num_epochs, config.data.image_size, config.model.variant) == (
      256, 2, 56, "Ti/4")
  assert context.layout_extent(config.method.patch_size, config.method.gap, config.method.jitter) <= 56
  checks.validate_run_config(config)
  assert load_config(CONFIG, "resnet").model.name == "resnet"
  imagenet = load_config("relpos_imagenet")
  mc = imagenet.method
  assert (mc.patch_size, mc.gap, mc.jitter, mc.colour, mc.normalize_patches) == (96, 48, 7, "drop", True)
  assert (imagenet.model.variant, imagenet.data.image_size, imagenet.batch_size) == ("50", 400, 256)
  opt = imagenet.optimizer
  assert (opt.name, opt.momentum, opt.weight_decay) == ("sgd", 0.0, 0.0)
  for variant in (imagenet, load_config("relpos_imagenet", "local")):
    checks.validate_run_config(variant, open_data=False)  # ImageNet is not on this machine


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
  return helpers.fresh_cli_run(CONFIG, tmp_path_factory)


def test_cli_run_writes_checkpoints_and_resumes_exactly(cli_run, tmp_path):
  assert sorted(int(p.name) for p in (cli_run / "checkpoints").iterdir()) == [1, 2, 3, 4, 5, 6]
  assert all(0.0 <= row["position_accuracy"] <= 1.0 for row in helpers.rows(cli_run).values())
  helpers.assert_resumes_exactly(CONFIG, cli_run, tmp_path)
