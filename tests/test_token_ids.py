"""Precomputed token ids (sslx/token_ids.py): the pipeline delivers each example's ids aligned with its view
(shuffled, flipped, undecodable files replaced), bad files and views are refused by name before anything
compiles, and the chain tokenizer run -> `python -m sslx.token_ids` -> BEiT run trains on the tokenizer's ids:
the same losses as a BEiT run that tokenizes in its step."""
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest

import contrastive_helpers as helpers
from sslx import checks
from sslx import init_from
from sslx import parallel
from sslx import token_ids
from sslx.data import pipeline
from sslx.data import sources
from sslx.data import transforms
from sslx.methods import RunLength
from sslx.methods import beit
from sslx.methods import tokenizer as tokenizer_method
from sslx.models import tokenizer as tokenizer_lib
from test_beit import tokenizer_run  # noqa: F401  (the module-scoped tokenizer :test run, reused)
from test_configs import load_config
from test_pipeline import write_idx

NUM_TRAIN, NUM_TEST, SIZE, GRID = 64, 16, 28, 7
WHOLE_IMAGE = token_ids.whole_image_view(SIZE)


def _pixels(index):
  """Example ``index``: columns brighter left to right (so a flip shows), offset by the index (so it is
  recognisable)."""
  return np.tile(4 * np.arange(SIZE, dtype=np.uint8) + index, (SIZE, 1))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A small Fashion-MNIST-shaped IDX dataset whose labels are the example indices."""
  directory = tmp_path_factory.mktemp("idx")
  for prefix, count in (("train", NUM_TRAIN), ("t10k", NUM_TEST)):
    write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", np.stack([_pixels(i) for i in range(count)]))
    write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count))
  return str(directory)


def _ids_file(path, shape, dtype=np.int16, high=1000, seed=0):
  np.save(path, np.random.default_rng(seed).integers(0, high, shape).astype(dtype))
  return str(path)


def _data_config(data_dir, path, **overrides):
  return pipeline.default_data_config(data_dir=data_dir, token_ids_file=path,
                                      **{"augmentation": WHOLE_IMAGE, **overrides})


@pytest.mark.parametrize("mirrored", [False, True])
def test_batches_hold_each_examples_ids_through_shuffles_and_flips(data_dir, tmp_path, mirrored):
  """Two epochs of batches: each row's image is its example's, flipped or not, and its ids are that
  example's row of the file, mirrored with the image (or its second row with an (N, 2, h, w) file); the images
  and labels are those of the same loader without ids."""
  shape = (NUM_TRAIN, 2, GRID, GRID) if mirrored else (NUM_TRAIN, GRID, GRID)
  path = _ids_file(tmp_path / "ids.npy", shape)
  stored = np.load(path)
  config = _data_config(data_dir, path)
  loader = pipeline.make_train_loader(config, global_batch_size=16, seed=0)
  batches = [next(loader) for _ in range(2 * NUM_TRAIN // 16)]
  plain = pipeline.make_train_loader(_data_config(data_dir, None), global_batch_size=16, seed=0)
  flips = []
  for batch in batches:
    assert batch["token_ids"].shape == (16, GRID, GRID) and batch["token_ids"].dtype == np.int32
    other = next(plain)
    np.testing.assert_array_equal(batch["image"], other["image"])
    np.testing.assert_array_equal(batch["label"], other["label"])
    for image, index, ids in zip(batch["image"], batch["label"], batch["token_ids"], strict=True):
      unflipped = transforms.normalize(_pixels(index)[..., None], config.mean, config.std)
      flipped = bool(image[0, 0, 0] > image[0, -1, 0])
      np.testing.assert_array_equal(image, unflipped[:, ::-1] if flipped else unflipped)
      if mirrored:
        expected = stored[index, int(flipped)]
      else:
        expected = stored[index][:, ::-1] if flipped else stored[index]
      np.testing.assert_array_equal(ids, expected)
      flips.append(flipped)
  first_epoch = np.concatenate([batch["label"] for batch in batches[:NUM_TRAIN // 16]])
  assert sorted(first_epoch) == list(range(NUM_TRAIN)) and list(first_epoch) != sorted(first_epoch)
  assert 0.3 < np.mean(flips) < 0.7


class _OneBadFile:
  """Three examples; the second cannot be decoded."""

  def __len__(self):
    return 3

  def __getitem__(self, index):
    if index == 1:
      return {"image": None, "label": 1, "path": "b.png", "error": "truncated"}
    return {"image": _pixels(index)[..., None], "label": index}


def test_an_undecodable_example_is_replaced_with_its_neighbours_ids_and_the_map_is_not_pickled(tmp_path):
  path = _ids_file(tmp_path / "ids.npy", (3, GRID, GRID))
  with_ids = token_ids.WithTokenIds(_OneBadFile(), path, "train")
  example = sources.SkipBadExamples(with_ids)[1]
  assert (example["label"], example["bad_path"]) == (2, "b.png")
  np.testing.assert_array_equal(example["token_ids"], np.load(path)[2])
  assert isinstance(token_ids.open_ids(path), np.memmap)
  copy = pickle.loads(pickle.dumps(with_ids))  # after a read: the memory map stays behind
  assert len(pickle.dumps(with_ids)) < 1000
  np.testing.assert_array_equal(copy[0]["token_ids"], np.load(path)[0])
  view = token_ids.ViewWithTokenIds.of(transforms.build_augmentation(WHOLE_IMAGE))
  # grain sends it to worker processes: the copy makes the same view of an example from the same generator.
  example = {"image": _pixels(0)[..., None], "token_ids": np.load(path)[0]}
  for seed in range(4):
    copied = pickle.loads(pickle.dumps(view))
    ours, theirs = (v.random_map(example, np.random.default_rng(seed)) for v in (view, copied))
    assert all(np.array_equal(ours[key], theirs[key]) for key in ("image", "token_ids"))


def _garbage(path):
  path.write_bytes(b"not a numpy file")
  return str(path)


@pytest.mark.parametrize("make_file, overrides, error, message", [
    (lambda p: _ids_file(p, (NUM_TRAIN, GRID, GRID)), {"augmentation": None}, ValueError,
     r"config\.data\.token_ids_file='.*ids.npy': config\.data\.augmentation='None \(a random resized crop "
     r".*\)' must start with the fixed view the ids are of, center_crop"),
    (lambda p: _ids_file(p, (NUM_TRAIN, GRID, GRID)), {"augmentation": "random_resized_crop(28)|hflip"},
     ValueError, r"config\.data\.augmentation='random_resized_crop\(28\)\|hflip' must start with the fixed "
     r"view"),
    (lambda p: _ids_file(p, (NUM_TRAIN, GRID, GRID)),
     {"augmentation": "center_crop(28)|random_resized_crop(28)"}, ValueError,
     r"has 'random_resized_crop\(28\)' after its center_crop"),
    (lambda p: _ids_file(p, (NUM_TRAIN, GRID, GRID)),
     {"augmentation": "center_crop(28)|grayscale|hflip", "augment_on": "device"}, ValueError,
     r"flips after a pixel-wise op, so config\.data\.augment_on='device' flips in the step"),
    (lambda p: _ids_file(p, (NUM_TRAIN, GRID, GRID)), {"augmentation": None, "views": (WHOLE_IMAGE,)},
     ValueError, r"token ids go with one view, 'image', but config\.data\.views is set"),
    (lambda p: _ids_file(p, (NUM_TRAIN - 1, GRID, GRID)), {}, ValueError,
     r"config\.data\.token_ids_file='.*ids.npy' has shape \(63, 7, 7\), 63 rows, but the training split "
     r"config\.data\.split='train' has 64 examples"),
    (lambda p: _ids_file(p, (NUM_TRAIN, GRID, GRID), np.float32), {}, ValueError,
     r"token_ids_file='.*ids.npy' holds float32 values; token ids must be integers"),
    (lambda p: _ids_file(p, (NUM_TRAIN, GRID * GRID)), {}, ValueError,
     r"token_ids_file='.*ids.npy' has shape \(64, 49\); expected \(N, h, w\) ids, or \(N, 2, h, w\)"),
    (lambda p: _ids_file(p, (NUM_TRAIN, 3, GRID, GRID)), {}, ValueError,
     r"has shape \(64, 3, 7, 7\); expected"),
    (_garbage, {}, ValueError, r"token_ids_file='.*ids.npy' is not a readable \.npy array"),
    (str, {}, FileNotFoundError, r"token_ids_file='.*ids.npy': no such file"),
])
def test_bad_files_and_views_are_named(data_dir, tmp_path, make_file, overrides, error, message):
  """By the checks of a run (`pipeline.validate_data_config`) and by the loader itself."""
  config = _data_config(data_dir, make_file(tmp_path / "ids.npy"), **overrides)
  with pytest.raises(error, match=message):
    pipeline.validate_data_config(config)
  with pytest.raises(error, match=message):
    pipeline.make_train_loader(config, global_batch_size=16, seed=0)


# ---------------------------------------------------------------------------------------------------------
# BEiT's checks: the batch key, the grid, the vocabulary; all before anything compiles.

def _beit_config(data_dir, path, **overrides):
  config = helpers.tiny_config("beit_fashion_mnist", **{"model.width": 32, "model.num_heads": 2,
                                                        "model.mlp_dim": 64, "method.vocab_size": 16})
  token_ids.use_token_ids_file(config, path)
  config.data.data_dir = data_dir
  for key, value in overrides.items():
    section, leaf = key.split(".")
    config[section][leaf] = value
  return config


@pytest.mark.parametrize("shape, high, overrides, message", [
    ((NUM_TRAIN, 6, 6), 16, {}, r"config\.data\.token_ids_file='.*ids.npy' has shape \(64, 6, 6\), ids on "
     r"a 6x6 grid, but config\.model\.variant='Ti/4' at config\.data\.image_size=28 has a 7x7 patch grid"),
    ((NUM_TRAIN, GRID, GRID), 17, {}, r"token_ids_file='.*ids.npy' holds ids from 0 to 16, outside \[0, "
     r"config\.method\.vocab_size=16\)"),
    ((NUM_TRAIN, GRID, GRID), 16, {"method.token_ids_key": "ids"},
     r"config\.method\.token_ids_key='ids', but the data pipeline delivers the ids of "
     r"config\.data\.token_ids_file='.*' as 'token_ids'"),
    ((NUM_TRAIN, GRID, GRID), 16, {"method.token_ids_key": None, "method.tokenizer": "SECTION"},
     r"config\.data\.token_ids_file='.*', but BEiT reads its targets from config\.method\.tokenizer"),
])
def test_beit_names_a_file_that_does_not_fit_before_compiling(data_dir, tmp_path, monkeypatch, shape, high,
                                                              overrides, message):
  if overrides.get("method.tokenizer") == "SECTION":
    section = beit.tokenizer_section(load_config("tokenizer_fashion_mnist", "test"), "unused")
    overrides = {**overrides, "method.tokenizer": section}
  good = _beit_config(data_dir, _ids_file(tmp_path / "good.npy", (NUM_TRAIN, GRID, GRID), high=16))
  checks.validate_run_config(good)
  config = _beit_config(data_dir, _ids_file(tmp_path / "ids.npy", shape, high=high), **overrides)
  monkeypatch.setattr(jax, "jit", lambda *args, **kwargs: pytest.fail("compiled before the error"))
  with pytest.raises(checks.ConfigError, match=message):
    checks.validate_run_config(config)


def test_beit_without_the_ids_in_its_batch_says_which_key_to_set(data_dir, tmp_path):
  config = _beit_config(data_dir, None)
  method = beit.build(config, RunLength(1, 1))
  images = jax.ShapeDtypeStruct((2, SIZE, SIZE, 1), np.float32)
  variables, state = jax.eval_shape(method.init, jax.random.PRNGKey(0), {"image": images})
  with pytest.raises(ValueError, match=r"config\.method\.token_ids_key='token_ids', but the batch has only "
                                       r"\['image'\]: set config\.data\.token_ids_file"):
    jax.eval_shape(method.loss_fn, variables, state, {"image": images}, jax.random.PRNGKey(1))


def test_the_writer_refuses_views_and_configs_the_ids_cannot_serve(tokenizer_run, tmp_path):  # noqa: F811
  out = str(tmp_path / "ids.npy")
  with pytest.raises(checks.ConfigError, match=r"--out='.*ids.npy': config\.data\.augmentation='None \(a "
                                               r"random resized crop"):
    token_ids.tokenizer_config(load_config("beit_fashion_mnist", "test"), tokenizer_run, out)
  with pytest.raises(checks.ConfigError, match=r"config\.method\.name='mae': token ids are BEiT's targets"):
    token_ids.tokenizer_config(load_config("mae_fashion_mnist", "test"), tokenizer_run, out)


# ---------------------------------------------------------------------------------------------------------
# The chain on the command line.

def _run(*args):
  result = subprocess.run([sys.executable, *args], env=helpers.env(1), cwd=helpers.REPO, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def _beit_run(workdir, config_arg, data_dir, *flags):
  """3 steps of ``configs/beit_fashion_mnist.py:<config_arg>`` on the small dataset (2 steps per epoch)."""
  out = _run("-m", "sslx.main", f"--config=configs/beit_fashion_mnist.py:{config_arg}",
             f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", "--config.total_steps=3",
             *helpers.FLAGS, *flags)
  assert "done: step 3" in out
  return helpers.rows(workdir)


def test_ids_written_from_a_tokenizer_run_train_beit_as_the_tokenizer_would(
    tokenizer_run, data_dir, tmp_path):  # noqa: F811
  """The command writes the ids of every example and of its mirror image, as the tokenizer run's encoder and
  codebook give them; a BEiT run on the file logs the losses of a BEiT run that tokenizes the same views in
  its step (same seed, same images, same masks): so the file's ids are the step's."""
  ids_path = str(tmp_path / "ids.npy")
  out = _run("-m", "sslx.token_ids", f"--tokenizer_run={tokenizer_run}", f"--out={ids_path}",
             f"--config=configs/beit_fashion_mnist.py:test,token_ids={ids_path}",
             f"--config.data.data_dir={data_dir}", "--batch_size=24")
  assert "--config.method.vocab_size=64" in out
  stored = np.load(ids_path)
  assert stored.shape == (NUM_TRAIN, 2, GRID, GRID) and stored.dtype == np.int16

  reader = init_from.RunReader(tokenizer_run, parallel.create_mesh(1))
  variables = {"params": reader.state()["params"], **reader.state()["model_state"]}
  module = tokenizer_method.model_from_config(reader.config)
  reader.close()
  data = load_config("beit_fashion_mnist", "test").data
  pixels = np.stack([_pixels(i)[..., None] for i in range(NUM_TRAIN)])
  images = transforms.normalize(pixels, data.mean, data.std)
  for row, view in ((0, images), (1, images[:, :, ::-1])):
    expected = np.asarray(tokenizer_lib.token_ids(module, variables, view))
    np.testing.assert_array_equal(stored[:, row], expected)
  assert len(np.unique(stored)) > 1 and not np.array_equal(stored[:, 0], stored[:, 1])

  from_file = _beit_run(tmp_path / "from_file", f"test,token_ids={ids_path}", data_dir,
                        "--config.method.vocab_size=64")
  in_step = _beit_run(tmp_path / "in_step", f"test,tokenizer={tokenizer_run}", data_dir,
                      f"--config.data.augmentation={WHOLE_IMAGE}")
  for step in (1, 2, 3):
    np.testing.assert_allclose(from_file[step]["loss"], in_step[step]["loss"], rtol=1e-6,
                               err_msg=f"step {step}")
