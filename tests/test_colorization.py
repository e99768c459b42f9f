"""Colorization: the in-gamut ab bins, soft encoding, class rebalancing and annealed mean against numpy and
scikit-image; the loss of the method against numpy on its own predictions (ViT and ResNet), grey images
masked, embed and pictures; bad configs; a command-line run on a folder of images this file writes, resumed
exactly."""
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from skimage import color

import contrastive_helpers as helpers
from sslx import checks
from sslx import methods
from sslx.methods import colorization
from sslx.pretext import ab_bins

CONFIG = "colorization_folder"
RNG = np.random.default_rng(0)


# --- bins, encoding, rebalancing, decoding -----------------------------------------------------------------

def test_bins_are_the_grid_cells_8_bit_srgb_colours_reach():
  """The set of `in_gamut_bins` is the nearest 10-grid centres of scikit-image's Lab of every 8-bit colour on
  the RGB cube's surface (float64), and random interior colours add none."""
  bins = ab_bins.in_gamut_bins()
  ab = color.rgb2lab(ab_bins._rgb_cube_faces().astype(np.float64))[:, 1:]
  expected = np.unique(np.round(ab / 10).astype(int), axis=0) * 10
  np.testing.assert_array_equal(bins, expected)
  interior = color.rgb2lab(RNG.integers(0, 256, (20000, 3)) / 255.0)[:, 1:]
  reached = {tuple(c) for c in np.round(interior / 10).astype(int) * 10}
  assert reached <= {tuple(c) for c in bins.astype(int)}
  assert len(bins) == ab_bins.num_bins() == 261  # the documented count (Zhang's set has 313; see ab_bins)


def _reference_soft_encoding(ab, k, sigma):
  centers = ab_bins.in_gamut_bins().astype(np.float64)
  d2 = np.sum((ab[:, None] - centers[None]) ** 2, axis=-1)
  out = np.zeros_like(d2)
  for i, row in enumerate(d2):
    nearest = np.argsort(row, kind="stable")[:k]
    weights = np.exp(-row[nearest] / (2 * sigma ** 2))
    out[i, nearest] = weights / weights.sum()
  return out


def test_soft_encoding_against_numpy():
  ab = RNG.uniform(-100, 100, (300, 2))
  encoded = np.asarray(ab_bins.soft_encode(ab.astype(np.float32)))
  np.testing.assert_allclose(encoded, _reference_soft_encoding(ab, 10, 5.0), atol=1e-5)  # float32
  np.testing.assert_allclose(encoded.sum(-1), 1.0, rtol=1e-6)
  assert np.all((encoded > 0).sum(-1) == 10)
  nearest = np.argmin(np.sum((ab[:, None] - ab_bins.in_gamut_bins()) ** 2, -1), -1)
  np.testing.assert_array_equal(encoded.argmax(-1), nearest)
  np.testing.assert_array_equal(np.asarray(ab_bins.nearest_bin(ab.astype(np.float32))), nearest)
  assert np.all(encoded.max(-1) > 0.2)  # the nearest bin holds a large share (1/10 would be uniform)


def test_rebalancing_weights_against_numpy():
  q = ab_bins.num_bins()
  prior = RNG.random(q) ** 4
  centers = ab_bins.in_gamut_bins().astype(np.float64)
  kernel = np.exp(-np.sum((centers[:, None] - centers[None]) ** 2, -1) / 50.0)
  smoothed = kernel @ (prior / prior.sum())
  smoothed /= smoothed.sum()
  expected = 1.0 / (0.5 * smoothed + 0.5 / q)
  expected /= np.sum(smoothed * expected)
  weights = ab_bins.rebalancing_weights(prior)
  np.testing.assert_allclose(weights, expected, rtol=1e-5)
  assert np.sum(weights * smoothed) == pytest.approx(1.0, rel=1e-5)
  np.testing.assert_array_equal(ab_bins.rebalancing_weights(None), np.ones(q, np.float32))
  with pytest.raises(ValueError, match="261 finite non-negative"):
    ab_bins.rebalancing_weights(-prior)


def test_annealed_mean_is_the_mean_at_t1_and_the_mode_near_0():
  logits = RNG.normal(size=(5, ab_bins.num_bins())) * 3
  centers = ab_bins.in_gamut_bins()
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  np.testing.assert_allclose(ab_bins.annealed_mean(logits, 1.0), probs @ centers, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(ab_bins.annealed_mean(logits, 1e-3), centers[logits.argmax(-1)], atol=1e-3)
  annealed = probs ** (1 / 0.38)
  annealed /= annealed.sum(-1, keepdims=True)
  np.testing.assert_allclose(ab_bins.annealed_mean(logits), annealed @ centers, rtol=1e-5, atol=1e-4)


def test_estimate_prior_counts_nearest_bins():
  images = [RNG.integers(0, 256, (2, 6, 5, 3), dtype=np.uint8) for _ in range(2)]
  pixels = np.concatenate([i.reshape(-1, 3) for i in images]) / 255.0
  nearest = np.argmin(np.sum((color.rgb2lab(pixels)[:, None, 1:] - ab_bins.in_gamut_bins()) ** 2, -1), -1)
  expected = np.bincount(nearest, minlength=ab_bins.num_bins()) / len(nearest)
  np.testing.assert_allclose(ab_bins.estimate_prior(images), expected)


# --- losses ------------------------------------------------------------------------------------------------

def test_rebalanced_cross_entropy_against_numpy_and_grey_mask():
  logits = RNG.normal(size=(3, 2, 2, ab_bins.num_bins()))
  targets = np.asarray(ab_bins.soft_encode(RNG.uniform(-80, 80, (3, 2, 2, 2)).astype(np.float32)))
  weights, mask = RNG.uniform(0.5, 2, (3, 2, 2)), np.array([1.0, 0.0, 1.0])
  log_probs = logits - np.log(np.sum(np.exp(logits), -1, keepdims=True))
  per_location = -np.sum(targets * log_probs, -1) * weights
  expected = (per_location[0].sum() + per_location[2].sum()) / 8
  loss = colorization.rebalanced_cross_entropy(jnp.asarray(logits), targets, weights, mask)
  assert float(loss) == pytest.approx(expected, rel=1e-5)
  assert float(colorization.rebalanced_cross_entropy(jnp.asarray(logits), targets, weights, 0 * mask)) == 0.0


@pytest.mark.parametrize("kind", ["l2", "smooth_l1"])
def test_ab_regression_loss_against_numpy(kind):
  pred, target = RNG.normal(size=(2, 3, 2, 2, 2), scale=2)
  mask = np.array([1.0, 1.0, 0.0])
  diff = (pred - target)[:2]
  rho = diff ** 2 if kind == "l2" else np.where(np.abs(diff) < 1, 0.5 * diff ** 2, np.abs(diff) - 0.5)
  loss = colorization.ab_regression_loss(jnp.asarray(pred), jnp.asarray(target), mask, kind)
  assert float(loss) == pytest.approx(rho.sum() / 16, rel=1e-5)


def test_pool_to_is_the_cell_mean():
  values = RNG.normal(size=(2, 8, 12, 2)).astype(np.float32)
  expected = values.reshape(2, 2, 4, 3, 4, 2).mean(axis=(2, 4))
  np.testing.assert_allclose(colorization.pool_to(jnp.asarray(values), 2, 3), expected, rtol=1e-5, atol=1e-6)


# --- the method
# ----------------------------------------------------------------------------------------------

def colour_images(count, size=32, seed=0, grey=()):
  """uint8 RGB images: a random colour gradient with a disc of another colour; those in ``grey`` grey."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[:size, :size] / (size - 1)
  images = []
  for i in range(count):
    start, end, disc = rng.uniform(0, 255, (3, 3))
    image = start + (end - start) * ((x + y) / 2)[..., None]
    cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
    image[(y - cy) ** 2 + (x - cx) ** 2 < r ** 2] = disc
    if i in grey:
      image = np.repeat(image.mean(-1, keepdims=True), 3, axis=-1)
    images.append(np.round(image).astype(np.uint8))
  return np.stack(images)


def normalised(images, config):
  return ((images / 255.0 - np.asarray(config.data.mean)) / np.asarray(config.data.std)).astype(np.float32)


def fresh(config_arg, **overrides):
  config = helpers.tiny_config(CONFIG, **{"data.data_dir": "unused", **overrides})
  if config_arg:
    config = helpers.load_config(CONFIG, config_arg)
    config.unlock()
    config.data.data_dir = "unused"
  method = methods.build_method(config)
  images = normalised(colour_images(4, grey=(3,)), config)
  variables, state = nn.unbox(method.init(jax.random.PRNGKey(0), {"image": images[:1]}))
  return config, method, variables, state, images


@pytest.mark.parametrize("config_arg", [None, "test,encoder=resnet"])
def test_loss_is_the_rebalanced_cross_entropy_of_the_head_and_has_gradients(config_arg):
  """ViT: 4 x 4 patch tokens; ResNet-18 (small-image stem): its 4 x 4 last map. The grey image is masked."""
  config, method, variables, state, images = fresh(config_arg)
  rng = jax.random.PRNGKey(1)
  (loss, (metrics, _, model_state)), grads = jax.jit(jax.value_and_grad(
      lambda p: method.loss_fn({**variables, "params": p}, state, {"image": images}, rng), has_aux=True))(
          variables["params"])
  model = colorization.ColourPredictor(colorization.models.encoder_from_config(config.model), 261)
  lab = color.rgb2lab(np.clip(images * np.asarray(config.data.std) + np.asarray(config.data.mean), 0, 1))
  inputs = ((lab[..., :1] - 50) / 50).astype(np.float32)
  logits, _ = colorization.apply_train(model, variables, inputs, rngs={"dropout": rng})
  logits = np.asarray(logits, np.float64)
  assert logits.shape == (4, 4, 4, 261)
  mean_ab = lab[..., 1:].reshape(4, 4, 8, 4, 8, 2).mean(axis=(2, 4))
  targets = _reference_soft_encoding(mean_ab.reshape(-1, 2), 10, 5.0).reshape(4, 4, 4, 261)
  log_probs = logits - np.log(np.sum(np.exp(logits), -1, keepdims=True))
  expected = -np.sum(targets * log_probs, -1)[:3].mean()  # the grey image 3 is left out
  assert float(loss) == pytest.approx(expected, rel=1e-4)
  assert float(metrics["colour_fraction"]) == 0.75
  assert (config.model.name == "resnet") == ("batch_stats" in model_state)
  leaves = jax.tree.leaves(grads)
  assert all(np.all(np.isfinite(g)) for g in leaves) and any(np.abs(g).max() > 0 for g in leaves)


def test_grey_batch_has_zero_loss_and_regression_variant_runs():
  config, method, variables, state, _ = fresh(None, **{"method.loss": "smooth_l1"})
  grey = normalised(colour_images(4, grey=range(4)), config)
  loss, (metrics, _, _) = method.loss_fn(variables, state, {"image": grey}, jax.random.PRNGKey(0))
  assert float(loss) == 0.0 and float(metrics["colour_fraction"]) == 0.0
  assert variables["params"]["head"]["kernel"].shape[-1] == 2


def test_embed_is_the_encoder_on_the_lightness_and_pictures_have_three_rows():
  config, method, variables, state, images = fresh(None)
  features = method.embed(variables, state, images)
  lab = color.rgb2lab(np.clip(images * np.asarray(config.data.std) + np.asarray(config.data.mean), 0, 1))
  encoder = colorization.models.encoder_from_config(config.model)
  lightness = ((lab[..., :1] - 50) / 50).astype(np.float32)
  _, aux = encoder.apply(method.encoder_variables(variables, state), lightness, train=False)
  np.testing.assert_allclose(features, aux["pooled"], rtol=1e-4, atol=1e-5)
  pictures = method.visualize(variables, state, {"image": images}, jax.random.PRNGKey(0))
  assert list(pictures) == ["grey", "prediction", "truth"]
  np.testing.assert_allclose(pictures["truth"], images, atol=1e-4)
  rgb = pictures["grey"] * np.asarray(config.data.std) + np.asarray(config.data.mean)
  np.testing.assert_allclose(rgb, np.repeat(rgb[..., :1], 3, -1), atol=1e-4)  # no colour


@pytest.mark.parametrize("overrides, message", [
    ({"method.loss": "l1"}, r"config\.method\.loss='l1' is not one of"),
    ({"method.neighbours": 400}, r"config\.method\.neighbours=400 exceeds the 261 ab bins"),
    ({"method.sigma": 0.0}, r"config\.method\.sigma=0\.0 must be"),
    ({"method.prior_mix": 0.0}, r"config\.method\.prior_mix=0\.0 must be"),
    ({"method.ab_prior": "/no/such/prior.npy"},
     r"config\.method\.ab_prior='/no/such/prior\.npy' is not a file"),
    ({"data.channels": 1, "data.mean": (0.5,), "data.std": (0.5,)},
     r"config\.data\.channels=1: colorization"),
])
def test_bad_configs_name_the_key(overrides, message):
  with pytest.raises(checks.ConfigError, match=message):
    checks.validate_run_config(helpers.tiny_config(CONFIG, **{"data.data_dir": "unused", **overrides}))


def test_batchnorm_groups_must_split_the_batch():
  config = helpers.load_config(CONFIG, "test,encoder=resnet")
  config.unlock()
  config.data.data_dir, config.model.bn_groups = "unused", 3
  with pytest.raises(checks.ConfigError, match=r"config\.model\.bn_groups=3 must split the 32 rows"):
    checks.validate_run_config(config)


def test_a_prior_file_of_the_wrong_size_is_named(tmp_path):
  path = tmp_path / "prior.npy"
  np.save(path, np.ones(313))
  config = helpers.tiny_config(CONFIG, **{"data.data_dir": "x", "method.ab_prior": str(path)})
  with pytest.raises(checks.ConfigError, match=r"config\.method\.ab_prior=.*not the 261 ab bin"):
    checks.validate_run_config(config)


# --- command line
# --------------------------------------------------------------------------------------------

def write_image_folder(root, count=40):
  """``count`` PNGs of `colour_images` at 40 px, five of them grey."""
  os.makedirs(root, exist_ok=True)
  for i, image in enumerate(colour_images(count, size=40, seed=3, grey=range(0, count, 8))):
    Image.fromarray(image).save(os.path.join(root, f"{i:03d}.png"))
  return str(root)


def folder_run(config_name, tmp_path_factory):
  """The ``:test`` config on a fresh image folder from the command line (6 steps, a checkpoint each)."""
  base = tmp_path_factory.mktemp(config_name)
  data_dir = write_image_folder(base / "images")
  workdir = base / "run"
  assert "done: step 6" in helpers.cli(config_name, workdir, f"--config.data.data_dir={data_dir}")
  return workdir, data_dir


def assert_folder_run_resumes_exactly(config_name, workdir, data_dir, tmp_path):
  """`contrastive_helpers.assert_resumes_exactly` with the folder flag: killed after step 3, steps 4-6 log the
  same losses and end in the same state, bit for bit."""
  expected_rows, expected_state = helpers.rows(workdir), helpers.read_state(workdir, 6)
  killed = tmp_path / "killed"
  shutil.copytree(workdir, killed)
  for step in (4, 5, 6):
    shutil.rmtree(killed / "checkpoints" / str(step))
  out = helpers.cli(config_name, killed, f"--config.data.data_dir={data_dir}")
  assert f"Resumed from {killed / 'checkpoints'}/3" in out
  resumed = helpers.rows(killed)
  assert [resumed[s]["loss"] for s in (4, 5, 6)] == [expected_rows[s]["loss"] for s in (4, 5, 6)]
  state = helpers.read_state(killed, 6)
  assert state.keys() == expected_state.keys()
  for name, value in expected_state.items():
    np.testing.assert_array_equal(state[name], value, err_msg=name)


def test_cli_run_on_an_image_folder_writes_pictures_and_resumes_exactly(tmp_path_factory, tmp_path):
  workdir, data_dir = folder_run(CONFIG, tmp_path_factory)
  assert sorted(p.name for p in (workdir / "pictures").iterdir()) == ["step_0000003.png", "step_0000006.png"]
  rows = helpers.rows(workdir)
  assert all(0 < row["colour_fraction"] < 1 for row in rows.values())  # 5 of 40 images are grey
  assert_folder_run_resumes_exactly(CONFIG, workdir, data_dir, tmp_path)
