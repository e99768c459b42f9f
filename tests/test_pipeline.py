"""Train and eval loaders: shapes, determinism, process shards, exact resume, workers, padding.

Most tests read a small IDX dataset written here whose labels are the example indices (0..N-1), so
which examples a batch holds can be read off its labels.
"""
import gzip
import json
import os
import struct

import ml_collections
import numpy as np
import pytest

from sslx.data import pipeline
from sslx.data import sources
from sslx.data import transforms
from conftest import assert_same_batches

NUM_TRAIN = 200
NUM_TEST = 37


def write_idx(path, array):
  array = np.asarray(array, np.uint8)
  header = bytes((0, 0, 0x08, array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.tobytes())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("idx")
  rng = np.random.default_rng(0)
  for prefix, n in (("train", NUM_TRAIN), ("t10k", NUM_TEST)):
    write_idx(directory / f"{prefix}-images-idx3-ubyte.gz",
              rng.integers(0, 256, (n, 12, 12), dtype=np.uint8))
    write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n))
  return str(directory)


@pytest.fixture
def config(data_dir):
  return pipeline.default_data_config(data_dir=data_dir, image_size=8)


def take(loader, n):
  return [next(loader) for _ in range(n)]


def test_train_batch_shapes_and_dtypes(config):
  loader = pipeline.make_train_loader(config, global_batch_size=16, seed=0)
  assert loader.num_examples == NUM_TRAIN and loader.image_shape == (8, 8, 1)
  batch = next(loader)
  assert batch["image"].shape == (16, 8, 8, 1) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
  lo, hi = transforms.normalize(np.array([0, 255], np.uint8), config.mean, config.std)
  assert lo - 1e-5 <= batch["image"].min() and batch["image"].max() <= hi + 1e-5


def test_train_epochs_are_reshuffled_permutations(config):
  loader = pipeline.make_train_loader(config, global_batch_size=40, seed=0)
  per_epoch = NUM_TRAIN // 40
  epochs = [np.concatenate([b["label"] for b in take(loader, per_epoch)]) for _ in range(2)]
  for labels in epochs:
    np.testing.assert_array_equal(np.sort(labels), np.arange(NUM_TRAIN))
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[0], np.arange(NUM_TRAIN))


def test_same_seed_same_batches_other_seed_differs(config):
  def first(seed):
    return take(pipeline.make_train_loader(config, global_batch_size=16, seed=seed), 3)
  assert_same_batches(first(3), first(3))
  other = first(4)
  assert not np.array_equal(first(3)[0]["label"], other[0]["label"])


def test_each_epoch_augments_anew(config):
  # One batch per epoch; sorting by label lines up each example's two augmented views.
  loader = pipeline.make_train_loader(config, global_batch_size=NUM_TRAIN, seed=0)
  epoch0, epoch1 = take(loader, 2)
  images0 = epoch0["image"][np.argsort(epoch0["label"])]
  images1 = epoch1["image"][np.argsort(epoch1["label"])]
  differs = [not np.array_equal(a, b) for a, b in zip(images0, images1, strict=True)]
  assert np.mean(differs) > 0.9


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_are_disjoint_and_make_the_global_batch(config, process_count):
  global_batch = 40
  single = take(pipeline.make_train_loader(config, global_batch_size=global_batch, seed=1), 6)
  shards = [take(pipeline.make_train_loader(config, global_batch_size=global_batch, seed=1,
                                            process_index=p, process_count=process_count), 6)
            for p in range(process_count)]
  for step, whole in enumerate(single):
    parts = [shard[step] for shard in shards]
    labels = np.concatenate([part["label"] for part in parts])
    assert len(set(labels.tolist())) == global_batch  # disjoint
    # Process p holds the p-th block of rows of the single-process batch: same examples, same pixels.
    local = global_batch // process_count
    for p, part in enumerate(parts):
      assert part["image"].shape[0] == local
      for key in ("image", "label"):
        np.testing.assert_array_equal(part[key], whole[key][p * local:(p + 1) * local])
  first_epoch = np.concatenate([s[step]["label"] for s in shards for step in range(5)])
  np.testing.assert_array_equal(np.sort(first_epoch), np.arange(NUM_TRAIN))  # covering


def test_resume_yields_exactly_the_uninterrupted_batches(config):
  loader = pipeline.make_train_loader(config, global_batch_size=24, seed=7)
  take(loader, 5)
  state = json.loads(json.dumps(loader.get_state()))
  assert state == {"next_batch": 5, "seed": 7, "global_batch_size": 24, "num_examples": NUM_TRAIN}
  expected = take(loader, 12)  # crosses the first epoch boundary (200 / 24 = 8.3 batches)

  resumed = pipeline.make_train_loader(config, global_batch_size=24, seed=7)
  resumed.set_state(state)
  assert_same_batches(take(resumed, 12), expected)

  loader.set_state(state)  # rewinding a running loader works as well
  assert_same_batches(take(loader, 3), expected[:3])


def test_set_state_rejects_a_different_stream(config):
  state = pipeline.make_train_loader(config, global_batch_size=24, seed=7).get_state()
  other = pipeline.make_train_loader(config, global_batch_size=24, seed=8)
  with pytest.raises(ValueError, match="seed=7 but this loader has seed=8"):
    other.set_state(state)


def test_worker_processes_give_identical_batches_and_resume(config):
  reference = take(pipeline.make_train_loader(config, global_batch_size=32, seed=2), 9)
  config.num_workers = 2
  loader = pipeline.make_train_loader(config, global_batch_size=32, seed=2)
  try:
    assert_same_batches(take(loader, 4), reference[:4])
    state = loader.get_state()
    loader.set_state(state)  # restarts the workers mid-stream
    assert_same_batches(take(loader, 5), reference[4:])
  finally:
    loader.close()


@pytest.mark.parametrize("kwargs,match", [
    (dict(global_batch_size=30, process_count=4),
     "global_batch_size=30 must be positive and divisible by process_count=4"),
    (dict(process_index=2, process_count=2), r"process_index=2 must be in \[0, process_count=2\)"),
    (dict(seed=-1), "seed must be a non-negative int"),
])
def test_train_loader_rejects_bad_arguments(config, kwargs, match):
  with pytest.raises(ValueError, match=match):
    pipeline.make_train_loader(config, **{"global_batch_size": 8, "seed": 0, **kwargs})


def test_eval_loader_fixed_order_and_padding(config):
  loader = pipeline.make_eval_loader(config, split="test", batch_size=8)
  assert len(loader) == 5 and loader.num_examples == NUM_TEST
  batches = list(loader)
  assert len(batches) == 5
  for batch in batches:
    assert batch["image"].shape == (8, 8, 8, 1) and batch["mask"].dtype == bool
  mask = np.concatenate([b["mask"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  np.testing.assert_array_equal(mask, np.arange(40) < NUM_TEST)
  np.testing.assert_array_equal(labels[mask], np.arange(NUM_TEST))
  np.testing.assert_array_equal(labels[~mask], -1)
  assert_same_batches(list(loader), batches)  # re-iterable, same order


def test_eval_loader_native_size_is_plain_normalization(config):
  config.image_size = 12  # the stored size: no resize, no crop
  source = sources.make_source(config, "test")
  batch = next(iter(pipeline.make_eval_loader(config, split="test", batch_size=4)))
  for i in range(4):
    expected = transforms.normalize(source[i]["image"], config.mean, config.std)
    np.testing.assert_array_equal(batch["image"][i], expected)


def test_eval_loader_shards_across_processes(config):
  loaders = [pipeline.make_eval_loader(config, split="test", batch_size=8, process_index=p,
                                       process_count=2) for p in range(2)]
  assert [len(loader) for loader in loaders] == [3, 3]  # ceil(19 / 8): equal counts for all
  real = [np.concatenate([b["label"][b["mask"]] for b in loader]) for loader in loaders]
  np.testing.assert_array_equal(real[0], np.arange(0, NUM_TEST, 2))
  np.testing.assert_array_equal(real[1], np.arange(1, NUM_TEST, 2))


def test_real_fashion_mnist_loaders():
  config = pipeline.default_data_config()
  pipeline.validate_data_config(config)
  loader = pipeline.make_train_loader(config, global_batch_size=256, seed=0)
  batch = next(loader)
  assert loader.num_examples == 60000
  assert batch["image"].shape == (256, 28, 28, 1) and set(batch["label"].tolist()) <= set(range(10))
  # Normalized with the training set's own mean/std: roughly zero mean, unit variance.
  assert abs(batch["image"].mean()) < 0.3 and 0.7 < batch["image"].std() < 1.3
  assert len(pipeline.make_eval_loader(config, split="test", batch_size=1000)) == 10


def test_synthetic_loader(config):
  config.source = "synthetic"
  config.channels = 3
  config.mean, config.std = (0.5,) * 3, (0.25,) * 3
  loader = pipeline.make_train_loader(config, global_batch_size=4, seed=0)
  assert next(loader)["image"].shape == (4, 8, 8, 3)


@pytest.mark.parametrize("key,value,match", [
    ("source", "lmdb", r"config\.data\.source='lmdb' is invalid"),
    ("dataset", "cifar10", r"config\.data\.dataset='cifar10' is invalid"),
    ("image_size", 0, r"config\.data\.image_size=0 is invalid"),
    ("channels", 2, r"config\.data\.channels=2 is invalid"),
    ("mean", (0.5, 0.5), r"config\.data\.mean=\(0\.5, 0\.5\) is invalid"),
    ("mean", (120.0,), r"config\.data\.mean=\(120\.0,\) is invalid.*\[0, 1\]"),
    ("std", (0.0,), r"config\.data\.std=\(0\.0,\) is invalid"),
    ("augment.crop_scale", (0.5, 0.2), r"config\.data\.augment\.crop_scale=\(0\.5, 0\.2\)"),
    ("augment.crop_scale", (0.0, 1.0), r"config\.data\.augment\.crop_scale"),
    ("augment.crop_scale", (0.5, 1.5), r"config\.data\.augment\.crop_scale"),
    ("augment.crop_ratio", (2.0, 1.0), r"config\.data\.augment\.crop_ratio"),
    ("augment.interpolation", "nearest", r"config\.data\.augment\.interpolation='nearest'"),
    ("num_workers", -1, r"config\.data\.num_workers=-1 is invalid"),
    ("prefetch", 0, r"config\.data\.prefetch=0 is invalid"),
])
def test_validate_names_the_bad_key(config, key, value, match):
  config.update_from_flattened_dict({key: value})
  with pytest.raises(ValueError, match=match):
    pipeline.validate_data_config(config)


def test_default_augmentation_is_the_augment_spec(config):
  """``augmentation=None`` is crop + flip from ``augment``: the same batches as that spec."""
  default = take(pipeline.make_train_loader(config, global_batch_size=16, seed=0), 2)
  config.augmentation = ("random_resized_crop(8, scale=(0.2, 1.0), "
                         "ratio=(0.75, 1.3333333333333333), interpolation='bicubic')|hflip")
  assert_same_batches(take(pipeline.make_train_loader(config, global_batch_size=16, seed=0), 2),
                      default)
  config.augmentation += "|normalize"  # per example instead of per batch: the same values
  assert_same_batches(take(pipeline.make_train_loader(config, global_batch_size=16, seed=0), 2),
                      default)


def test_augmentation_spec_from_the_config(config):
  config.augmentation = "random_resized_crop(8, scale=(0.5, 1))|color_jitter(0.5)|blur(p=1.0)"
  loader = pipeline.make_train_loader(config, global_batch_size=16, seed=0)
  batch = next(loader)
  assert set(batch) == {"image", "label"} and loader.view_shapes == {"image": (8, 8, 1)}
  assert batch["image"].shape == (16, 8, 8, 1) and batch["image"].dtype == np.float32
  config.augmentation = None
  assert not np.array_equal(next(pipeline.make_train_loader(config, global_batch_size=16,
                                                            seed=0))["image"], batch["image"])


@pytest.mark.parametrize("spec,match", [
    ("random_resized_crop(8)|sharpen", r"config\.data\.augmentation=.* is invalid: augmentation "
                                       r"op 'sharpen': unknown op 'sharpen'"),
    ("random_resized_crop(8)|hflip(p=2)", r"op 'hflip\(p=2\)': p=2 is invalid"),
    ("random_resized_crop(16)|hflip", r"makes 16x16 images but config\.data\.image_size=8"),
    ("hflip", r"config\.data\.augmentation='hflip' has no crop op"),
    ("center_crop(8)|normalize(mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))",
     r"turns a 1-channel image into shape \(8, 8, 3\)"),
])
def test_validate_names_the_bad_augmentation(config, spec, match):
  config.augmentation = spec
  with pytest.raises(ValueError, match=match):
    pipeline.validate_data_config(config)


def test_validate_wants_a_bool_hflip(config):
  # ConfigDict's type safety stops overriding a bool with an int, but a config may start with one.
  config.augment = ml_collections.ConfigDict({**config.augment.to_dict(), "hflip": 1})
  with pytest.raises(ValueError, match=r"config\.data\.augment\.hflip=1 is invalid"):
    pipeline.validate_data_config(config)


def test_validate_names_a_missing_key(config):
  del config["augment"]["hflip"]
  with pytest.raises(ValueError, match=r"config\.data\.augment\.hflip is missing"):
    pipeline.validate_data_config(config)


def test_validate_checks_both_splits_exist(config, data_dir, tmp_path):
  pipeline.validate_data_config(config)
  for name in os.listdir(data_dir):
    if name.startswith("train"):
      os.symlink(os.path.join(data_dir, name), tmp_path / name)
  config.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match=f"{tmp_path}/t10k-images-idx3-ubyte.gz"):
    pipeline.validate_data_config(config)
