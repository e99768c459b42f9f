"""Video colourisation: label propagation by attention (against numpy and hand-made embeddings), the loss
against numpy, the method with a ViT and a ResNet, its configs, and a command-line run that resumes exactly."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from skimage import color as skcolor

import contrastive_helpers as helpers
from sslx import checks
from sslx import models
from sslx.data import pipeline
from sslx.methods import RunLength
from sslx.methods import video_colorization as vc
from sslx.pretext import propagation
from test_configs import load_config

CONFIG = "video_colorization_synthetic"
H, W, K = 4, 5, 3  # a 4 x 5 grid, 3 label channels


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _numpy_propagate(target, reference, labels, temperature, top_k=None, mask=None, similarity="dot"):
  if similarity == "dot":
    logits = target @ reference.T / temperature
  else:
    logits = -((target[:, None] - reference[None]) ** 2).sum(-1) / temperature
  if mask is not None:
    logits = np.where(mask[None], logits, -np.inf)
  if top_k is not None:
    kth = np.sort(logits, axis=-1)[:, -top_k][:, None]
    logits = np.where(logits >= kth, logits, -np.inf)
  return _softmax(logits) @ labels


def _position_codes(ids):
  """One-hot of each pixel's content id: a pixel matches exactly the reference pixels showing the same id."""
  return np.eye(H * W, dtype=np.float32)[ids.reshape(-1)]


@pytest.mark.parametrize("top_k, masked, similarity", [
    (None, False, "dot"), (4, False, "dot"), (None, True, "dot"), (3, True, "dot"), (None, False, "neg_sq_dist"),
    (3, True, "neg_sq_dist")])
def test_propagation_is_the_attention_formula(top_k, masked, similarity):
  rng = np.random.default_rng(0)
  target, reference = rng.normal(size=(6, 5)), rng.normal(size=(9, 5))
  labels = rng.random((9, K))
  mask = rng.random(9) < 0.6 if masked else None
  out = propagation.propagate(jnp.asarray(target), jnp.asarray(reference), jnp.asarray(labels), temperature=0.7,
                              top_k=top_k, reference_mask=None if mask is None else jnp.asarray(mask),
                              similarity=similarity)
  np.testing.assert_allclose(out, _numpy_propagate(target, reference, labels, 0.7, top_k, mask, similarity),
                             rtol=1e-5, atol=1e-7)


def test_identical_frames_copy_labels_and_colours_exactly():
  """Each pixel embedded as a one-hot of its position, temperature 0.01: a pixel points at itself only."""
  rng = np.random.default_rng(1)
  features = _position_codes(np.arange(H * W))
  masks = np.eye(K, dtype=np.float32)[rng.integers(0, K, H * W)]
  colours = rng.normal(size=(H * W, 2)).astype(np.float32)
  for labels in (masks, colours):
    out = propagation.propagate(features, features, labels, temperature=0.01)
    np.testing.assert_allclose(out, labels, atol=1e-6)


def test_a_known_shift_moves_the_labels_by_that_shift():
  """The target frame is the reference rolled by (1, 2); features code what each pixel shows, so the
  propagated masks are the reference masks rolled alike."""
  ids = np.arange(H * W).reshape(H, W)
  shifted = np.roll(ids, (1, 2), axis=(0, 1))
  masks = np.eye(K, dtype=np.float32)[np.random.default_rng(2).integers(0, K, (H, W))]
  out = propagation.propagate(_position_codes(shifted), _position_codes(ids), masks.reshape(-1, K),
                              temperature=0.01)
  np.testing.assert_allclose(np.asarray(out).reshape(H, W, K), np.roll(masks, (1, 2), axis=(0, 1)), atol=1e-6)


def _numpy_propagate_video(embeddings, first, temperature, window, top_k):
  """Frame t from frame 0 (its given labels) and frames max(1, t - window) .. t - 1 (their predictions)."""
  flat = embeddings.reshape(len(embeddings), -1, embeddings.shape[-1])
  out = [first.reshape(-1, first.shape[-1])]
  for t in range(1, len(flat)):
    previous = list(range(max(1, t - window), t))
    reference = np.concatenate([flat[0]] + [flat[i] for i in previous])
    labels = np.concatenate([out[0]] + [out[i] for i in previous])
    out.append(_numpy_propagate(flat[t], reference, labels, temperature, top_k))
  return np.stack(out).reshape(*embeddings.shape[:-1], first.shape[-1])


@pytest.mark.parametrize("window, top_k", [(0, None), (2, None), (3, 5)])
def test_video_propagation_uses_the_first_frame_and_a_window_of_predictions(window, top_k):
  rng = np.random.default_rng(3)
  embeddings = rng.normal(size=(6, H, W, 4)).astype(np.float32)
  first = rng.random((H, W, K)).astype(np.float32)
  out = propagation.propagate_video(jnp.asarray(embeddings), jnp.asarray(first), temperature=0.5, window=window,
                                    top_k=top_k)
  np.testing.assert_allclose(out, _numpy_propagate_video(embeddings, first, 0.5, window, top_k), rtol=2e-5,
                             atol=1e-6)


def test_video_propagation_tracks_a_steady_shift():
  ids = np.arange(H * W).reshape(H, W)
  embeddings = np.stack([_position_codes(np.roll(ids, t, axis=1)).reshape(H, W, -1) for t in range(5)])
  first = np.eye(K, dtype=np.float32)[np.random.default_rng(4).integers(0, K, (H, W))]
  out = propagation.propagate_video(jnp.asarray(embeddings), jnp.asarray(first), temperature=0.01, window=2)
  for t in range(5):
    np.testing.assert_allclose(out[t], np.roll(first, t, axis=1), atol=1e-5)


def test_cell_average_quantize_and_kmeans():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(2, 8, 12, 2)).astype(np.float32)
  expected = x.reshape(2, 4, 2, 3, 4, 2).mean(axis=(2, 4))
  np.testing.assert_allclose(propagation.cell_average(jnp.asarray(x), (4, 3)), expected, rtol=1e-5, atol=1e-6)
  centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], np.float32)
  np.testing.assert_array_equal(vc.quantize(jnp.asarray(x * 8), centres),
                                np.argmin(((x[..., None, :] * 8 - centres) ** 2).sum(-1), axis=-1))
  blobs = np.concatenate([c + 0.3 * rng.normal(size=(200, 2)) for c in centres])
  found = vc.kmeans(blobs, 3, seed=0)
  distances = np.linalg.norm(found[:, None] - centres[None], axis=-1)
  assert sorted(np.argmin(distances, axis=1)) == [0, 1, 2] and distances.min(axis=1).max() < 0.1


def _numpy_loss(target, reference, reference_colors, target_colors, temperature, num_colors):
  losses, correct = [], []
  for b in range(len(target)):
    weights = _softmax(target[b] @ reference[b].T / temperature)
    probabilities = weights @ np.eye(num_colors)[reference_colors[b]]
    for i, y in enumerate(target_colors[b]):
      if y in reference_colors[b]:
        losses.append(-np.log(probabilities[i, y]))
        correct.append(np.argmax(probabilities[i]) == y)
  return np.mean(losses), 100 * np.mean(correct), len(losses) / target_colors.size


def test_loss_is_the_cross_entropy_of_the_propagated_colours():
  """Against numpy's -log(sum_j A_ij [c_j = y_i]); a target colour absent from the references is left out."""
  rng = np.random.default_rng(6)
  target, reference = rng.normal(size=(2, 5, 3)), rng.normal(size=(2, 8, 3))
  reference_colors = rng.integers(0, 3, (2, 8))
  target_colors = rng.integers(0, 3, (2, 5))
  target_colors[0, 0] = 3  # no reference has colour 3
  loss, metrics = vc.colorization_loss(jnp.asarray(target), jnp.asarray(reference), jnp.asarray(reference_colors),
                                       jnp.asarray(target_colors), temperature=0.8, num_colors=4)
  expected_loss, expected_accuracy, matched = _numpy_loss(target, reference, reference_colors, target_colors, 0.8, 4)
  np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["color_accuracy"]), expected_accuracy, rtol=1e-5)
  assert float(metrics["matched_fraction"]) == pytest.approx(matched)
  grads = jax.grad(lambda t: vc.colorization_loss(t, jnp.asarray(reference), jnp.asarray(reference_colors),
                                                  jnp.asarray(target_colors), temperature=0.8, num_colors=4)[0])(
                                                      jnp.asarray(target))
  assert np.all(np.isfinite(grads)) and np.all(np.asarray(grads)[0, 0] == 0)


def _config(encoder):
  config = helpers.tiny_config(CONFIG)
  if encoder == "resnet":
    config.model = models.default_config("resnet", variant="18", small_images=True, width=8)
  return config


def _fresh(encoder):
  """A tiny method, its state and one step's loss, metrics and gradients on a batch of 2 synthetic clips."""
  config = _config(encoder)
  method = vc.build(config, RunLength(1, 1))
  batch = next(pipeline.make_train_loader(config.data, global_batch_size=2, seed=0))
  batch = {key: batch[key] for key in ("frames", "labels")}
  variables, method_state = nn.unbox(jax.jit(method.init)(jax.random.PRNGKey(0), {"image": batch["frames"][:1, 0]}))

  def objective(params):
    return method.loss_fn({**variables, "params": params}, method_state, batch, jax.random.PRNGKey(1))

  (loss, aux), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(variables["params"])
  return dict(encoder=encoder, config=config, method=method, batch=batch, variables=variables,
              method_state=method_state, loss=loss, aux=aux, grads=grads)


@pytest.fixture(scope="module")
def fresh():
  """``fresh(encoder)``: `_fresh` of 'vit' or 'resnet', made once per module."""
  made = {}

  def get(encoder):
    if encoder not in made:
      made[encoder] = _fresh(encoder)
    return made[encoder]

  return get


@pytest.mark.parametrize("encoder", ["vit", "resnet"])
def test_build_loss_and_gradients_for_both_encoders(fresh, encoder):
  fresh = fresh(encoder)
  metrics, state, model_state = fresh["aux"]
  assert np.isfinite(float(fresh["loss"])) and float(fresh["loss"]) > 0
  assert set(metrics) == {"loss", "color_accuracy", "matched_fraction"}
  for name in ("encoder", "projection"):
    leaves = jax.tree.leaves(fresh["grads"][name])
    assert all(np.all(np.isfinite(leaf)) for leaf in leaves) and any(np.abs(leaf).max() > 0 for leaf in leaves)
  assert state["color_centers"].shape == (16, 2)
  assert ("batch_stats" in model_state) == (fresh["encoder"] == "resnet")


def test_method_loss_is_the_loss_of_its_embeddings_and_skimage_colours(fresh):
  """The loss of `loss_fn` rebuilt by hand (ViT): embeddings of the grey frames (L from scikit-image), colours
  of each cell from scikit-image's ab averaged per cell, nearest centre, then the numpy loss."""
  fresh = fresh("vit")
  config, variables, frames = fresh["config"], fresh["variables"], np.asarray(fresh["batch"]["frames"])
  rgb = np.clip(frames * np.array(config.data.std) + np.array(config.data.mean), 0, 1)
  lab = skcolor.rgb2lab(rgb)
  grey = ((lab[..., :1] - 50) / 50).reshape(-1, *frames.shape[2:4], 1).astype(np.float32)
  model = vc.FrameEmbedding(models.encoder_from_config(config.model), config.method.embed_dim)
  embeddings = np.asarray(model.apply(variables, grey, train=True)).reshape(2, 4, -1, config.method.embed_dim)
  rows = int(np.sqrt(embeddings.shape[2]))
  cell = frames.shape[2] // rows
  ab = lab[..., 1:].reshape(2, 4, rows, cell, rows, cell, 2).mean(axis=(3, 5)).reshape(2, 4, -1, 2)
  centres = np.asarray(fresh["method_state"]["color_centers"])
  colours = np.argmin(((ab[..., None, :] - centres) ** 2).sum(-1), axis=-1)
  expected, _, _ = _numpy_loss(embeddings[:, -1], embeddings[:, :-1].reshape(2, -1, embeddings.shape[-1]),
                               colours[:, :-1].reshape(2, -1), colours[:, -1], 1.0, 16)
  np.testing.assert_allclose(float(fresh["loss"]), expected, rtol=1e-4)


@pytest.mark.parametrize("encoder", ["vit", "resnet"])
def test_embed_is_the_pooled_encoder_of_the_grey_frame(fresh, encoder):
  fresh = fresh(encoder)
  config, variables, method = fresh["config"], fresh["variables"], fresh["method"]
  images = np.asarray(fresh["batch"]["frames"][:, 0])
  lab = skcolor.rgb2lab(np.clip(images * np.array(config.data.std) + np.array(config.data.mean), 0, 1))
  encoder = models.encoder_from_config(config.model)
  _, aux = encoder.apply(method.encoder_variables(variables, None), ((lab[..., :1] - 50) / 50).astype(np.float32),
                         train=False)
  np.testing.assert_allclose(method.embed(variables, fresh["method_state"], images), aux["pooled"], rtol=1e-4,
                             atol=1e-5)


@pytest.mark.parametrize("key, value, message", [
    ("method.temperature", 0.0, r"config\.method\.temperature=0\.0 must be a number > 0"),
    ("method.num_colors", 1, r"config\.method\.num_colors=1 must be an int"),
    ("method.embed_dim", 0, r"config\.method\.embed_dim=0 must be an int"),
    ("method.mask_ratio", 0.5, r"config\.method\.mask_ratio is not a video colourisation key"),
    ("data.image_size", 18, r"config\.data\.image_size=18 is not divisible by the patch size 4"),
])
def test_bad_configs_name_the_key(key, value, message):
  config = helpers.tiny_config(CONFIG, **{key: value})
  with pytest.raises(checks.ConfigError, match=message):
    checks.validate_run_config(config)


def test_frames_must_split_into_whole_feature_cells():
  config = _config("resnet")
  config.data.image_size = 20  # stride 8 with rounding up: a 3 x 3 map
  with pytest.raises(checks.ConfigError, match=r"image_size=20 is not a whole number of the encoder's 3x3"):
    checks.validate_run_config(config)


def test_image_data_is_refused():
  config = helpers.tiny_config(CONFIG, **{"data.source": "synthetic"})
  with pytest.raises(checks.ConfigError, match=r"config\.data\.source='synthetic': video colourisation learns"):
    checks.validate_run_config(config)


def test_folder_recipe_embeds_256_px_frames_on_a_32_by_32_grid(tmp_path):
  config = load_config("video_colorization_folder")
  assert (config.data.image_size, config.data.clip_length, config.method.num_colors) == (256, 4, 16)
  assert (config.method.temperature, config.method.embed_dim, config.optimizer.name) == (1.0, 64, "adamw")
  assert (config.optimizer.weight_decay, config.monitor.online_probe, config.monitor.every_steps) == (0.0, False, 0)
  assert vc.feature_grid(config) == (32, 32)
  local = load_config("video_colorization_folder", "local")
  for name in ("a", "b"):
    folder = tmp_path / "train" / name
    folder.mkdir(parents=True)
    for i in range(13):  # one clip: 4 frames, 4 apart
      Image.fromarray(np.full((40, 48, 3), 15 * i, np.uint8)).save(folder / f"{i:03d}.jpg")
  local.unlock()
  local.data.data_dir = str(tmp_path)
  checks.validate_run_config(local)
  assert vc.feature_grid(local) == (4, 4)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
  """The :test config from the command line: 6 steps at batch 8, a checkpoint after every step."""
  return helpers.fresh_cli_run(CONFIG, tmp_path_factory)


def test_cli_run_writes_checkpoints_and_resumes_exactly(cli_run, tmp_path):
  assert sorted(int(p.name) for p in (cli_run / "checkpoints").iterdir()) == [1, 2, 3, 4, 5, 6]
  first, last = (helpers.read_state(cli_run, step)["['method_state']['color_centers']"] for step in (1, 6))
  np.testing.assert_array_equal(first, last)
  assert all(0 < row["matched_fraction"] <= 1 for row in helpers.rows(cli_run).values())
  helpers.assert_resumes_exactly(CONFIG, cli_run, tmp_path)
