"""Sources: IDX (real Fashion-MNIST and files written here), TFDS array_record, arrays, synthetic.

The TFDS tests build a real two-split dataset in the array_record format with a tiny
``GeneratorBasedBuilder``: that runs without TensorFlow as long as images are handed to TFDS as PIL
images (TFDS encodes those with PIL; numpy images would need TensorFlow's PNG encoder). Unlike
``tfds.testing.mock_data``, which replaces the array_record reader and the data_dir with mocks, this
exercises the real files, decoding, split lookup and pickling.
"""
import gzip
import os
import pickle
import struct

import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from sslx.data import sources

FASHION_MNIST_DIR = sources.DEFAULT_IDX_DIR


def write_idx(path, array):
  """Writes a uint8 array in the IDX format (gzipped if the name ends in .gz)."""
  array = np.asarray(array, np.uint8)
  data = bytes((0, 0, 0x08, array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape)
  data += array.tobytes()
  with (gzip.open(path, "wb") if str(path).endswith(".gz") else open(path, "wb")) as f:
    f.write(data)


def write_idx_split(directory, prefix, images, labels, suffix=".gz"):
  write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte{suffix}"), images)
  write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte{suffix}"), labels)


def random_split(n, seed=0, height=5, width=4):
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (n, height, width), dtype=np.uint8),
          rng.integers(0, 10, (n,), dtype=np.uint8))


# --- IDX ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split,size", [("train", 60000), ("test", 10000)])
def test_real_fashion_mnist(split, size):
  source = sources.IdxSource(FASHION_MNIST_DIR, split)
  assert len(source) == size
  labels = np.array([source[i]["label"] for i in range(size)])
  # Fashion-MNIST is balanced: every one of the 10 classes has a tenth of each split.
  np.testing.assert_array_equal(np.bincount(labels), [size // 10] * 10)
  for index in (0, size // 2, size - 1):
    image = source[index]["image"]
    assert image.shape == (28, 28, 1) and image.dtype == np.uint8
  assert 0 < source[0]["image"].mean() < 255


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_idx_round_trip(tmp_path, suffix):
  images, labels = random_split(7)
  write_idx_split(tmp_path, "t10k", images, labels, suffix)
  source = sources.IdxSource(str(tmp_path), "test")
  assert len(source) == 7 and source.image_shape == (5, 4, 1)
  for i in range(7):
    np.testing.assert_array_equal(source[i]["image"], images[i][..., None])
    assert source[i]["label"] == labels[i] and isinstance(source[i]["label"], int)


def test_idx_channels_and_pickle(tmp_path):
  images, labels = random_split(3)
  write_idx_split(tmp_path, "train", images, labels)
  source = sources.IdxSource(str(tmp_path), "train", channels=3)
  assert source[1]["image"].shape == (5, 4, 3)
  np.testing.assert_array_equal(source[1]["image"][..., 2], images[1])
  # Workers get paths, not pixels: the pickle stays small after the pixels were read.
  restored = pickle.loads(pickle.dumps(source))
  assert len(pickle.dumps(source)) < 1000
  np.testing.assert_array_equal(restored[2]["image"], source[2]["image"])


def test_idx_bad_magic_names_file(tmp_path):
  images, labels = random_split(3)
  write_idx_split(tmp_path, "train", images, labels, "")
  path = tmp_path / "train-images-idx3-ubyte"
  data = bytearray(path.read_bytes())
  data[2] = 0x0D  # the float32 type code
  path.write_bytes(bytes(data))
  with pytest.raises(ValueError, match="train-images-idx3-ubyte.*magic number is 0x00000d03"):
    sources.IdxSource(str(tmp_path), "train")


def test_idx_labels_file_in_images_place(tmp_path):
  images, labels = random_split(3)
  write_idx_split(tmp_path, "train", images, labels)
  os.replace(tmp_path / "train-labels-idx1-ubyte.gz", tmp_path / "train-images-idx3-ubyte.gz")
  write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
  with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz is not an IDX file"):
    sources.IdxSource(str(tmp_path), "train")


def test_idx_truncated_pixels_names_file(tmp_path):
  images, labels = random_split(3)
  write_idx_split(tmp_path, "train", images, labels, "")
  path = tmp_path / "train-images-idx3-ubyte"
  path.write_bytes(path.read_bytes()[:-5])
  source = sources.IdxSource(str(tmp_path), "train")  # headers are fine
  with pytest.raises(ValueError, match="train-images-idx3-ubyte holds 55 values"):
    source[0]


def test_idx_count_mismatch(tmp_path):
  images, labels = random_split(3)
  write_idx_split(tmp_path, "train", images, labels[:2])
  with pytest.raises(ValueError, match="3 images but .* 2 labels"):
    sources.IdxSource(str(tmp_path), "train")


def test_idx_missing_dir_lists_paths_and_hints(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(FileNotFoundError) as info:
    sources.IdxSource(str(missing), "train")
  message = str(info.value)
  assert f"the directory {missing} does not exist" in message
  for name in ("train-images-idx3-ubyte.gz", "train-images-idx3-ubyte"):
    assert os.path.join(str(missing), name) in message
  assert "apt-get install dataset-fashion-mnist" in message
  assert "--config.data.data_dir" in message


def test_idx_searches_directories_in_order(tmp_path):
  first, second = tmp_path / "first", tmp_path / "second"
  first.mkdir()
  second.mkdir()
  images, labels = random_split(3)
  write_idx(first / "train-images-idx3-ubyte.gz", images)  # no labels: skipped as a whole
  write_idx_split(second, "train", images[:2], labels[:2], "")
  source = sources.IdxSource([str(tmp_path / "missing"), str(first), str(second)], "train")
  assert len(source) == 2
  with pytest.raises(FileNotFoundError) as info:
    sources.IdxSource([str(tmp_path / "missing"), str(first)], "test")
  message = str(info.value)
  assert f"the directory {tmp_path / 'missing'} does not exist" in message
  assert f"{first} holds neither t10k-images-idx3-ubyte.gz nor t10k-images-idx3-ubyte" in message
  for directory in (tmp_path / "missing", first):
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
      assert os.path.join(str(directory), stem + ".gz") in message


def test_idx_missing_labels_file(tmp_path):
  images, _ = random_split(3)
  write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
  with pytest.raises(FileNotFoundError, match="neither t10k-labels-idx1-ubyte.gz nor t10k-labels"):
    sources.IdxSource(str(tmp_path), "test")


def test_idx_unknown_split(tmp_path):
  with pytest.raises(ValueError, match="'validation' is unknown"):
    sources.IdxSource(str(tmp_path), "validation")


# --- arrays and synthetic -------------------------------------------------------------------------


def test_array_source():
  images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  source = sources.ArraySource(images)
  assert len(source) == 2
  np.testing.assert_array_equal(source[1]["image"], images[1][..., None])
  assert source[1]["label"] == -1
  assert sources.ArraySource(images, [4, 7])[1]["label"] == 7
  with pytest.raises(ValueError, match="uint8"):
    sources.ArraySource(images.astype(np.float32))
  with pytest.raises(ValueError, match="labels must have shape"):
    sources.ArraySource(images, [1, 2, 3])


def test_synthetic_source_is_deterministic():
  a = sources.SyntheticSource(10, (6, 5, 3), seed=1)
  b = sources.SyntheticSource(10, (6, 5, 3), seed=1)
  assert a[3]["image"].shape == (6, 5, 3) and a[3]["image"].dtype == np.uint8
  np.testing.assert_array_equal(a[3]["image"], b[3]["image"])
  assert not np.array_equal(a[3]["image"], a[4]["image"])
  with pytest.raises(IndexError):
    a[10]


# --- TFDS -----------------------------------------------------------------------------------------


class SslxTinyImages(tfds.core.GeneratorBasedBuilder):
  """Grayscale 8x6 images: example i has every pixel = i and label i % 3."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(8, 6, 1)),
        "label": tfds.features.ClassLabel(num_classes=3),
    }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(5), "test": self._generate_examples(3)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"image": Image.fromarray(np.full((8, 6), i, np.uint8)), "label": i % 3}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  SslxTinyImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


def test_tfds_source_reads_array_record(tfds_dir):
  source = sources.TfdsSource("sslx_tiny_images", "train", tfds_dir)
  assert len(source) == 5
  seen = set()
  for i in range(5):
    example = source[i]
    image = example["image"]
    assert image.shape == (8, 6, 1) and image.dtype == np.uint8
    value = int(image[0, 0, 0])
    assert np.all(image == value) and example["label"] == value % 3
    seen.add(value)
  assert seen == set(range(5))


def test_tfds_source_grayscale_to_rgb_and_pickle(tfds_dir):
  source = sources.TfdsSource("sslx_tiny_images", "test", tfds_dir, channels=3)
  assert source[0]["image"].shape == (8, 6, 3)
  restored = pickle.loads(pickle.dumps(source))  # reopens the files lazily
  np.testing.assert_array_equal(restored[2]["image"], source[2]["image"])


def test_tfds_unknown_split(tfds_dir):
  with pytest.raises(ValueError, match=r"'sslx_tiny_images' \(split 'validation', data_dir "
                     f"{tfds_dir}\\): unknown split; this dataset has splits "
                     r"\['train', 'test'\]"):
    sources.TfdsSource("sslx_tiny_images", "validation", tfds_dir)


def test_tfds_unknown_dataset(tfds_dir):
  with pytest.raises(ValueError, match=r"'no_such_dataset' \(split 'train', data_dir .*"
                     "no such dataset"):
    sources.TfdsSource("no_such_dataset", "train", tfds_dir)


def test_tfds_unprepared(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"'sslx_tiny_images' \(split 'train', data_dir "
                     f"{tmp_path}\\) is not prepared.*tfds build sslx_tiny_images "
                     "--file_format=array_record"):
    sources.TfdsSource("sslx_tiny_images", "train", str(tmp_path))


# --- make_source ----------------------------------------------------------------------------------


def data_config(**values):
  base = dict(source="idx", dataset="fashion_mnist", data_dir=None, channels=1, image_size=8)
  return ml_collections.ConfigDict({**base, **values})


def test_make_source_idx(tmp_path):
  images, labels = random_split(4)
  write_idx_split(tmp_path, "train", images, labels)
  source = sources.make_source(data_config(data_dir=str(tmp_path), channels=3), "train")
  assert isinstance(source, sources.IdxSource) and source[0]["image"].shape == (5, 4, 3)


def test_make_source_idx_default_dir():
  assert len(sources.make_source(data_config(), "test")) == 10000


def test_make_source_tfds(tfds_dir):
  config = data_config(source="tfds", dataset="sslx_tiny_images", data_dir=tfds_dir)
  assert len(sources.make_source(config, "test")) == 3


def test_make_source_synthetic():
  config = data_config(source="synthetic", synthetic_num_examples=6, synthetic_image_size=10)
  train = sources.make_source(config, "train")
  test = sources.make_source(config, "test")
  assert len(train) == 6 and train[0]["image"].shape == (10, 10, 1)
  assert not np.array_equal(train[0]["image"], test[0]["image"])


@pytest.mark.parametrize("values,match", [
    (dict(source="lmdb"), r"config\.data\.source='lmdb' is unknown"),
    (dict(dataset="cifar10"), r"config\.data\.dataset='cifar10' is not an IDX dataset"),
])
def test_make_source_rejects_unknown(values, match):
  with pytest.raises(ValueError, match=match):
    sources.make_source(data_config(**values), "train")


def test_make_source_mnist_needs_data_dir():
  with pytest.raises(FileNotFoundError, match="'mnist' has no default location.*data_dir"):
    sources.make_source(data_config(dataset="mnist"), "train")
