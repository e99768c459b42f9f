"""Jigsaw puzzles: the permutation sets (greedy max-min, deterministic, cached, distances checked pairwise),
tiles against numpy slicing, per-tile normalisation, shuffling and un-shuffling, the loss against numpy, the
shared tile encoder and its concatenation order, build + loss + gradients with a ViT and a ResNet, bad
configs, the recipes, and a command-line run that resumes exactly."""
import functools
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import contrastive_helpers as helpers
from sslx import checks
from sslx import optim
from sslx.methods import RunLength
from sslx.methods import jigsaw as jigsaw_method
from sslx.pretext import jigsaw
from sslx.pretext import permutations
from test_configs import load_config

CONFIG = "jigsaw_fashion_mnist"
# 36 px images: 12 px cells, 8 px tiles (2 x 2 patches of the ViT's 4 px), offsets 0-4.
BATCH, SIZE, CELL, TILE, PERMS = 3, 36, 12, 8, 10
TINY = {"model.dtype": "float32", "data.image_size": SIZE, "method.tile_size": TILE,
        "method.num_permutations": PERMS, "method.hidden_dim": None}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
  """Each test reads and writes permutation files in its own cache folder, starting with cold memory."""
  monkeypatch.setenv("SSLX_CACHE_DIR", str(tmp_path / "cache"))
  permutations.permutation_set.cache_clear()


@functools.cache
def _all_permutations():
  return np.array(list(itertools.permutations(range(9))))


@functools.cache
def _ball_size(radius):
  """How many permutations of 9 lie within Hamming distance ``radius`` of the identity (counted)."""
  return int(np.sum(np.sum(_all_permutations() != np.arange(9), axis=1) <= radius))


@pytest.mark.parametrize("count", [64, 100, 1000])
def test_permutation_sets_are_distinct_and_their_minimum_distance_is_checked_pair_by_pair(count):
  chosen = permutations.permutation_set(count)
  perms = chosen.permutations
  assert perms.shape == (count, 9) and perms.dtype == np.int32
  assert all(sorted(row) == list(range(9)) for row in perms.tolist())
  assert len({tuple(row) for row in perms.tolist()}) == count
  if count <= 100:
    brute_force = min(sum(a != b for a, b in zip(p, q, strict=True)) for p, q in itertools.combinations(
        perms.tolist(), 2))
  else:  # 500k pairs: one numpy comparison of every pair instead of a Python loop
    distances = (perms[:, None, :] != perms[None, :, :]).sum(-1) + 10 * np.eye(count, dtype=int)
    brute_force = int(distances.min())
  assert chosen.min_distance == brute_force
  # The greedy guarantee: the N-th pick at distance d leaves every permutation within d of the N-1 before it.
  guaranteed = min(d for d in range(10) if (count - 1) * _ball_size(d) >= math.factorial(9))
  assert chosen.min_distance >= guaranteed


def test_each_pick_is_the_first_permutation_farthest_from_those_before_it():
  """The first 8 picks against the rule, checked over all 9! permutations: the identity first, then the
  lexicographically first permutation whose minimum distance to the chosen set is largest."""
  table = _all_permutations()
  perms = permutations.choose_permutations(8)
  np.testing.assert_array_equal(perms[0], np.arange(9))
  for n in range(1, 8):
    to_set = np.min([(table != p).sum(1) for p in perms[:n]], axis=0)
    np.testing.assert_array_equal(perms[n], table[np.argmax(to_set)])


def test_sets_are_the_same_from_memory_from_disk_and_computed_afresh(tmp_path):
  first = permutations.permutation_set(64)
  assert permutations.permutation_set(64) is first  # memory
  assert not first.permutations.flags.writeable
  files = list((tmp_path / "cache" / "permutations").iterdir())
  assert len(files) == 1 and not [p for p in files[0].parent.iterdir() if p.suffix == ".partial"]
  permutations.permutation_set.cache_clear()
  from_disk = permutations.permutation_set(64)
  np.testing.assert_array_equal(from_disk.permutations, first.permutations)
  np.testing.assert_array_equal(permutations.choose_permutations(64), first.permutations)  # cold: no cache


@pytest.mark.parametrize("damage", [b"not an npy file", b""])
def test_a_corrupt_cache_file_is_recomputed_and_replaced(tmp_path, damage):
  expected = permutations.permutation_set(64).permutations.copy()
  path = next((tmp_path / "cache" / "permutations").iterdir())
  path.write_bytes(damage)
  permutations.permutation_set.cache_clear()
  np.testing.assert_array_equal(permutations.permutation_set(64).permutations, expected)
  np.testing.assert_array_equal(np.load(path), expected)


def test_a_cache_file_of_wrong_permutations_is_recomputed(tmp_path):
  expected = permutations.permutation_set(64).permutations.copy()
  path = next((tmp_path / "cache" / "permutations").iterdir())
  np.save(path, np.zeros((64, 9), np.int32))
  permutations.permutation_set.cache_clear()
  np.testing.assert_array_equal(permutations.permutation_set(64).permutations, expected)


@pytest.mark.parametrize("count", [1, 0, 10_001, 2.5, True, "1000"])
def test_bad_permutation_counts_name_the_key(count):
  with pytest.raises(ValueError, match=r"config\.method\.num_permutations=.* must be an int in \[2, 10000\]"):
    permutations.permutation_set(count)


def _images(seed=0, channels=3):
  return np.random.default_rng(seed).normal(size=(BATCH, SIZE, SIZE, channels)).astype(np.float32)


@pytest.mark.parametrize("channel_jitter", [0, 2])
def test_tiles_are_the_cells_windows_at_the_drawn_offsets(channel_jitter):
  images = _images(1)
  offsets = np.asarray(jigsaw.draw_offsets(jax.random.PRNGKey(3), BATCH, cell=CELL, tile_size=TILE,
                                           channels=3, channel_jitter=channel_jitter))
  assert offsets.shape == (BATCH, 9, 3, 2) and offsets.min() >= 0 and offsets.max() <= CELL - TILE
  spread = offsets.max(axis=2) - offsets.min(axis=2)  # between the channels of one tile
  assert spread.max() == 0 if channel_jitter == 0 else 0 < spread.max() <= 2 * channel_jitter
  tiles = np.asarray(jax.jit(jigsaw.extract_tiles, static_argnums=2)(images, offsets, TILE))
  assert tiles.shape == (BATCH, 9, TILE, TILE, 3)
  for b, n, c in itertools.product(range(BATCH), range(9), range(3)):
    row, col = divmod(n, 3)
    y, x = offsets[b, n, c]
    window = images[b, row * CELL + y: row * CELL + y + TILE, col * CELL + x: col * CELL + x + TILE, c]
    np.testing.assert_array_equal(tiles[b, n, ..., c], window)


def test_each_tile_is_standardised_by_its_own_statistics():
  tiles = np.random.default_rng(2).normal(3.0, 2.0, size=(BATCH, 9, TILE, TILE, 3)).astype(np.float32)
  tiles[0, 4] = 7.0  # a blank tile: zeros, not NaNs
  expected = (tiles - tiles.mean(axis=(2, 3, 4), keepdims=True)) / np.sqrt(
      tiles.var(axis=(2, 3, 4), keepdims=True) + jigsaw.TILE_NORM_EPS)
  np.testing.assert_allclose(jigsaw.normalize_tiles(tiles), expected, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(jigsaw.normalize_tiles(tiles))[0, 4] == 0.0)


def test_shuffling_places_tiles_by_the_permutation_and_unshuffling_restores_them_exactly():
  tiles = _images(3).reshape(BATCH, 9, 12, 12, 3)
  perms = permutations.permutation_set(PERMS).permutations[[3, 0, 9]]
  puzzles = np.asarray(jigsaw.shuffle_tiles(tiles, perms))
  for b, i in itertools.product(range(BATCH), range(9)):
    np.testing.assert_array_equal(puzzles[b, i], tiles[b, perms[b, i]])
  np.testing.assert_array_equal(jigsaw.unshuffle_tiles(puzzles, perms), tiles)
  np.testing.assert_array_equal(jigsaw.shuffle_tiles(jigsaw.unshuffle_tiles(tiles, perms), perms), tiles)


def test_puzzles_unshuffle_into_normalised_windows_of_their_own_cells():
  """Whatever offsets `make_puzzles` drew: un-shuffled by its label's permutation, tile n of image b is the
  normalised window of cell n at one of the (cell - tile + 1)^2 offsets."""
  images, perm_set = _images(4), permutations.permutation_set(PERMS).permutations
  puzzles, labels = jigsaw.make_puzzles(jax.random.PRNGKey(5), images, perm_set, tile_size=TILE)
  assert puzzles.shape == (BATCH, 9, TILE, TILE, 3) and labels.dtype == jnp.int32
  tiles = np.asarray(jigsaw.unshuffle_tiles(puzzles, perm_set[np.asarray(labels)]))
  for b, n in itertools.product(range(BATCH), range(9)):
    row, col = divmod(n, 3)
    cell = images[b, row * CELL:(row + 1) * CELL, col * CELL:(col + 1) * CELL]
    windows = [cell[y:y + TILE, x:x + TILE] for y in range(CELL - TILE + 1) for x in range(CELL - TILE + 1)]
    normalised = [(w - w.mean()) / np.sqrt(w.var() + jigsaw.TILE_NORM_EPS) for w in windows]
    assert min(np.abs(w - tiles[b, n]).max() for w in normalised) < 1e-4, (b, n)


def _numpy_cross_entropy(logits, labels):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(axis=1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  return -log_probs[np.arange(len(labels)), labels].mean()


def _config(encoder="vit", **overrides):
  """The :test config (with ``encoder``: 'vit' or 'resnet'), unlocked, with `TINY` and ``overrides``."""
  config = load_config(CONFIG, "test" if encoder == "vit" else "resnet,test")
  config.unlock()
  for key, value in {**TINY, **overrides}.items():
    section, leaf = key.split(".")
    config[section][leaf] = value
  return config


def _fresh(encoder):
  """A tiny jigsaw network ('vit': one block of width 32, a linear head; 'resnet': ResNet-18 of width 8, a
  16-unit hidden layer): one step's loss, metrics, BatchNorm state and gradients, and the training-mode logits
  of the puzzles that step drew (from the first half of its key), all from one compilation."""
  config = _config(encoder, **({"method.hidden_dim": 16} if encoder == "resnet" else {}))
  method = jigsaw_method.build(config, RunLength(10, 10))
  model = jigsaw_method.model_from_config(config)
  images, rng = _images(channels=1), jax.random.PRNGKey(1)
  perm_set = permutations.permutation_set(PERMS).permutations
  variables = nn.unbox(jax.jit(method.init)(jax.random.PRNGKey(0), {"image": images[:1]})[0])

  def loss_of(params):
    return method.loss_fn({**variables, "params": params}, {}, {"image": images}, rng)

  def step_and_reference(params):
    puzzles, labels = jigsaw.make_puzzles(jax.random.split(rng)[0], images, perm_set, tile_size=TILE)
    logits, _ = model.apply({**variables, "params": params}, puzzles, train=True, mutable=["batch_stats"])
    return jax.value_and_grad(loss_of, has_aux=True)(params), puzzles, labels, logits

  ((loss, (metrics, _, model_state)), grads), puzzles, labels, logits = jax.jit(step_and_reference)(
      variables["params"])
  return dict(config=config, method=method, model=model, images=images, variables=variables, loss=loss,
              metrics=metrics, model_state=model_state, grads=grads, puzzles=puzzles, labels=labels,
              logits=logits)


@pytest.fixture(scope="module")
def vit():
  return _fresh("vit")


@pytest.fixture(scope="module")
def resnet():
  return _fresh("resnet")


@pytest.mark.parametrize("encoder", ["vit", "resnet"])
def test_loss_is_the_cross_entropy_against_the_drawn_permutation(encoder, request):
  fresh = request.getfixturevalue(encoder)
  logits, labels = np.asarray(fresh["logits"]), np.asarray(fresh["labels"])
  assert logits.shape == (BATCH, PERMS) and labels.min() >= 0 and labels.max() < PERMS
  np.testing.assert_allclose(float(fresh["loss"]), _numpy_cross_entropy(logits, labels), rtol=1e-5)
  assert float(fresh["metrics"]["jigsaw_top1"]) == pytest.approx(np.mean(logits.argmax(1) == labels))


@pytest.mark.parametrize("encoder", ["vit", "resnet"])
def test_one_gradient_step_reaches_encoder_and_head(encoder, request):
  fresh = request.getfixturevalue(encoder)
  assert np.isfinite(float(fresh["loss"]))
  for part in ("encoder", "head"):
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(fresh["grads"][part])]
    assert all(np.isfinite(norms)) and max(norms) > 0, part
  if encoder == "resnet":
    stats, before = (jax.tree.leaves(tree) for tree in (fresh["model_state"]["batch_stats"],
                                                        fresh["variables"]["batch_stats"]))
    assert any(float(np.abs(a - b).max()) > 0 for a, b in zip(stats, before, strict=True))


def test_one_encoder_reads_every_tile_and_the_head_reads_them_in_place_order(vit):
  """With a linear head the logits are ``concat(f(tile_0), ..., f(tile_8)) W + b``, ``f`` the one encoder
  applied to each place's tiles on its own."""
  model, variables, puzzles = vit["model"], vit["variables"], np.asarray(vit["puzzles"])
  encoder_variables = {"params": variables["params"]["encoder"]}
  apply = jax.jit(lambda x: model.encoder.apply(encoder_variables, x, train=True)[1]["pooled"])
  features = np.concatenate([np.asarray(apply(puzzles[:, i])) for i in range(9)], axis=1)
  head = variables["params"]["head"]["logits"]
  expected = features @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
  np.testing.assert_allclose(vit["logits"], expected, rtol=1e-4, atol=1e-5)


def test_embed_is_the_encoder_on_the_whole_untiled_image(vit):
  method, variables, images = vit["method"], vit["variables"], vit["images"]
  features = jax.jit(method.embed)(variables, {}, images)
  _, aux = jax.jit(lambda v, x: vit["model"].encoder.apply(v, x, train=False))(
      method.encoder_variables(variables, {}), images)
  assert features.shape == (BATCH, 32) and features.dtype == jnp.float32
  np.testing.assert_array_equal(features, aux["pooled"])


@pytest.mark.parametrize("overrides, message", [
    ({"method.num_permutations": 1}, r"config\.method\.num_permutations=1 must be an int in \[2, 10000\]"),
    ({"method.num_permutations": 20_000}, r"config\.method\.num_permutations=20000 must be an int"),
    ({"method.tile_size": 16}, r"config\.method\.tile_size=16 is larger than the 12 px cells of "
                               r"config\.data\.image_size=36"),
    ({"method.tile_size": 6}, r"config\.method\.tile_size=6: the encoder encodes each tile, and not at that "
                              r"size: .*patch size 4"),
    ({"data.image_size": 28}, r"config\.data\.image_size=28 does not split into 3 x 3 equal cells"),
    ({"method.channel_jitter": -1}, r"config\.method\.channel_jitter=-1 must be an int in \[0"),
    ({"method.dropout": 1.0}, r"config\.method\.dropout=1\.0 must be a number in \[0, 1\)"),
    ({"method.tile_dim": 0}, r"config\.method\.tile_dim=0 must be an int"),
    ({"method.mask_ratio": 0.5}, r"config\.method\.mask_ratio is not a Jigsaw key"),
])
def test_bad_configs_name_the_key(overrides, message):
  with pytest.raises(checks.ConfigError, match=message):
    checks.validate_run_config(_config(**overrides))


def test_fashion_mnist_recipe_upsamples_to_tiles_of_three_by_three_patches():
  config, quickstart = load_config(CONFIG), load_config("mae_fashion_mnist")
  assert config.model.to_dict() == quickstart.model.to_dict()
  cell = config.data.image_size // 3
  assert (config.data.image_size, cell, config.method.tile_size) == (48, 16, 12)
  assert config.method.tile_size == 3 * 4 and config.data.image_size % 4 == 0  # ViT-Ti/4 patches
  assert (config.batch_size, config.num_epochs, config.optimizer.name, config.method.num_permutations) == (
      256, 2, "adamw", 100)
  resnet = load_config(CONFIG, "resnet")
  assert (resnet.model.name, resnet.model.width, resnet.model.small_images) == ("resnet", 32, True)


def test_imagenet_recipe_has_the_papers_sizes_and_schedule():
  config = load_config("jigsaw_imagenet")
  method = config.method
  assert (config.data.image_size, method.tile_size, method.num_permutations, method.channel_jitter) == (
      225, 64, 1000, 2)
  assert (method.tile_dim, method.hidden_dim, method.dropout) == (1024, 4096, 0.5)
  assert config.data.augmentation.startswith("random_resized_crop(225,") and "grayscale(p=0.3)" in \
      config.data.augmentation
  opt = config.optimizer
  assert (opt.name, opt.momentum, opt.nesterov, opt.weight_decay, config.batch_size, config.num_epochs) == (
      "sgd", 0.9, False, 5e-4, 256, 70)
  steps = 1000
  lr = optim.learning_rate_schedule(config, steps_per_epoch=steps, total_steps=70 * steps)
  assert [float(lr(epoch * steps)) for epoch in (0, 19, 20, 40, 60, 69)] == pytest.approx(
      [1e-2, 1e-2, 1e-3, 1e-4, 1e-5, 1e-5])
  local = load_config("jigsaw_imagenet", "local")
  assert (local.batch_size, local.data.image_size, local.method.tile_size, local.model.width) == (
      8, 48, 12, 8)
  # The context-free network's sizes around ResNet-50's 2048 features: fc6 per tile, fc7 on the 9 x 1024
  # concatenation, 1000 logits; a 225 px batch traces through the whole loss.
  method = jigsaw_method.build(config, RunLength(1, 1))
  image = jax.ShapeDtypeStruct((2, 225, 225, 3), np.float32)
  init = lambda x: method.init(jax.random.PRNGKey(0), {"image": x})[0]
  params = nn.unbox(jax.eval_shape(init, image)["params"])
  assert jax.tree.map(np.shape, {name: params[name] for name in ("tile_fc", "head")}) == {
      "tile_fc": {"kernel": (2048, 1024), "bias": (1024,)},
      "head": {"hidden_0": {"kernel": (9 * 1024, 4096), "bias": (4096,)},
               "logits": {"kernel": (4096, 1000), "bias": (1000,)}}}
  loss = jax.eval_shape(lambda x: method.loss_fn(init(x), {}, {"image": x}, jax.random.PRNGKey(1))[0], image)
  assert loss.shape == () and loss.dtype == jnp.float32


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
  """The :test config from the command line: 6 steps at batch 32, a checkpoint after every step."""
  return helpers.fresh_cli_run(CONFIG, tmp_path_factory)


def test_cli_run_resumes_exactly(cli_run, tmp_path):
  assert sorted(int(p.name) for p in (cli_run / "checkpoints").iterdir()) == [1, 2, 3, 4, 5, 6]
  assert all(0.0 <= row["jigsaw_top1"] <= 1.0 for row in helpers.rows(cli_run).values())
  helpers.assert_resumes_exactly(CONFIG, cli_run, tmp_path)
