"""Image folders: layouts, labels, formats and modes, split lookup, and skipping undecodable files.

Images are written here with PIL in every format and mode the source must read; expected pixels
come from the arrays written (lossless formats) or from the conversion formulas, not from the
source's own code path.
"""
import os
import pickle

from absl import flags
import grain
import ml_collections
import numpy as np
from PIL import Image
import pytest

from sslx.data import folder
from sslx.data import sources

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (6, 5, 3), dtype=np.uint8)
ALPHA = RNG.integers(0, 256, (6, 5), dtype=np.uint8)
GRAY16 = RNG.integers(0, 65536, (6, 5), dtype=np.uint16)


def luma(rgb):
  """ITU-R 601-2 luma, as PIL's 'L' mode defines it."""
  return rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def write(path, image, **kwargs):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image.save(path, **kwargs)


def write_corrupt_files(directory):
  """A truncated JPEG, a text file named .jpg and an empty PNG; returns their paths."""
  os.makedirs(directory, exist_ok=True)
  whole = os.path.join(directory, "whole.jpg")
  Image.fromarray(RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(whole, quality=95)
  with open(whole, "rb") as f:
    data = f.read()
  os.remove(whole)
  paths = [os.path.join(directory, name) for name in ("truncated.jpg", "text.jpg", "empty.png")]
  for path, content in zip(paths, (data[:len(data) // 2], b"not an image\n", b""), strict=True):
    with open(path, "wb") as f:
      f.write(content)
  return paths


@pytest.fixture
def class_root(tmp_path):
  """Three classes; files of every mode and format, nested folders and files to be ignored."""
  root = tmp_path / "images"
  write(root / "cat" / "rgb.png", Image.fromarray(RGB))
  write(root / "cat" / "nested" / "deeper" / "gray.PNG", Image.fromarray(RGB[..., 0]))
  write(root / "cat" / "flat.jpg", Image.new("RGB", (8, 8), (200, 30, 90)), quality=100)
  write(root / "cat" / "notes.txt", Image.new("L", (1, 1)), format="PNG")  # wrong extension
  rgba = np.concatenate([RGB, ALPHA[..., None]], axis=-1)
  write(root / "dog" / "rgba.png", Image.fromarray(rgba))
  write(root / "dog" / "lossless.webp", Image.fromarray(RGB), lossless=True)
  write(root / "dog" / "gray16.png", Image.fromarray(GRAY16))
  write(root / "dog" / ".hidden.jpg", Image.fromarray(RGB))  # e.g. a macOS '._' fork
  write(root / "emu" / "cmyk.jpeg", Image.new("CMYK", (8, 8), (10, 20, 30, 40)), quality=100)
  palette = Image.fromarray(RGB).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
  palette.info["transparency"] = 0
  write(root / "emu" / "palette.png", palette)
  write(root / ".ipynb_checkpoints" / "copy.png", Image.fromarray(RGB))
  return str(root)


def by_name(source):
  """{file name: example} for every example of an ImageFolderSource."""
  return {os.path.basename(source.path(i)): source[i] for i in range(len(source))}


def test_class_layout_labels_and_files(class_root):
  source = folder.ImageFolderSource(class_root)
  assert source.classes == ("cat", "dog", "emu")
  examples = by_name(source)
  assert sorted(examples) == sorted(["rgb.png", "gray.PNG", "flat.jpg", "rgba.png",
                                     "lossless.webp", "gray16.png", "cmyk.jpeg", "palette.png"])
  labels = {name: example["label"] for name, example in examples.items()}
  assert labels == {"rgb.png": 0, "gray.PNG": 0, "flat.jpg": 0, "rgba.png": 1,
                    "lossless.webp": 1, "gray16.png": 1, "cmyk.jpeg": 2, "palette.png": 2}
  for example in examples.values():
    assert example["image"].dtype == np.uint8 and example["image"].shape[-1] == 3
    assert set(example) == {"image", "label"} and isinstance(example["label"], int)
  # The order is the sorted walk, the same in every process.
  assert [source[i]["label"] for i in range(len(source))] == sorted(labels.values())


def test_modes_become_rgb(class_root):
  examples = by_name(folder.ImageFolderSource(class_root))
  np.testing.assert_array_equal(examples["rgb.png"]["image"], RGB)
  np.testing.assert_array_equal(examples["lossless.webp"]["image"], RGB)
  np.testing.assert_array_equal(examples["gray.PNG"]["image"], np.repeat(RGB[..., :1], 3, -1))
  np.testing.assert_array_equal(examples["rgba.png"]["image"], RGB)  # alpha dropped
  np.testing.assert_array_equal(examples["gray16.png"]["image"],
                                np.repeat((GRAY16 >> 8).astype(np.uint8)[..., None], 3, -1))
  with Image.open(os.path.join(class_root, "emu", "palette.png")) as palette_image:
    indices = np.asarray(palette_image)
    colors = np.array(palette_image.getpalette()[:12]).reshape(4, 3)
  np.testing.assert_array_equal(examples["palette.png"]["image"], colors[indices])
  # CMYK -> RGB multiplies the complements: (255 - c) * (255 - k) / 255. JPEG is near-lossless on
  # a flat colour.
  expected = np.array([(255 - c) * (255 - 40) / 255 for c in (10, 20, 30)])
  assert np.abs(examples["cmyk.jpeg"]["image"] - expected).max() <= 3
  assert np.abs(examples["flat.jpg"]["image"].astype(int) - (200, 30, 90)).max() <= 3


def test_one_channel(class_root):
  examples = by_name(folder.ImageFolderSource(class_root, channels=1))
  for example in examples.values():
    assert example["image"].ndim == 3 and example["image"].shape[-1] == 1
  np.testing.assert_allclose(examples["rgb.png"]["image"][..., 0], luma(RGB), atol=1)
  np.testing.assert_allclose(examples["rgba.png"]["image"][..., 0], luma(RGB), atol=1)
  np.testing.assert_array_equal(examples["gray.PNG"]["image"][..., 0], RGB[..., 0])
  np.testing.assert_array_equal(examples["gray16.png"]["image"][..., 0], GRAY16 >> 8)
  cmyk_rgb = np.array([(255 - c) * (255 - 40) / 255 for c in (10, 20, 30)])
  assert abs(int(examples["cmyk.jpeg"]["image"][0, 0, 0]) - luma(cmyk_rgb)) <= 3


def test_flat_folder_is_unlabeled(tmp_path):
  for i in range(3):
    write(tmp_path / f"{i}.png", Image.fromarray(RGB))
  (tmp_path / "empty_subfolder").mkdir()
  source = folder.ImageFolderSource(str(tmp_path))
  assert len(source) == 3 and source.classes == ()
  assert [source[i]["label"] for i in range(3)] == [-1, -1, -1]


def test_pickles_paths_not_pixels(class_root):
  source = folder.ImageFolderSource(class_root)
  source[0]
  data = pickle.dumps(source)
  assert len(data) < 2000
  restored = pickle.loads(data)
  np.testing.assert_array_equal(restored[3]["image"], source[3]["image"])


@pytest.mark.parametrize("make,error,match", [
    (lambda root: root / "missing", FileNotFoundError, "missing does not exist"),
    (lambda root: root / "file.png", FileNotFoundError, "file.png is not a folder"),
    (lambda root: root / "empty", FileNotFoundError, r"empty holds no images.*0 other file"),
    (lambda root: root / "texts", FileNotFoundError, r"texts holds no images.*2 other file"),
    (lambda root: root / "mixed", ValueError, r"mixed holds both images \(x.png, ...\) and class "
                                              r"folders of images \(a, ...\)"),
])
def test_bad_roots_are_named(tmp_path, make, error, match):
  write(tmp_path / "file.png", Image.fromarray(RGB))
  (tmp_path / "empty" / "class_without_images").mkdir(parents=True)
  for name in ("a.txt", "b.csv"):
    (tmp_path / "texts" / name).parent.mkdir(exist_ok=True)
    (tmp_path / "texts" / name).write_text("x")
  write(tmp_path / "mixed" / "x.png", Image.fromarray(RGB))
  write(tmp_path / "mixed" / "a" / "y.png", Image.fromarray(RGB))
  root = str(make(tmp_path))
  with pytest.raises(error, match=match) as info:
    folder.ImageFolderSource(root)
  assert root in str(info.value)


def test_channels_must_be_1_or_3(class_root):
  with pytest.raises(ValueError, match="channels must be 1 or 3"):
    folder.ImageFolderSource(class_root, channels=4)


# --- splits and make_source -----------------------------------------------------------------------


def folder_config(data_dir, channels=3):
  return ml_collections.ConfigDict(dict(source="folder", dataset="my_images", data_dir=data_dir,
                                        channels=channels, image_size=8))


@pytest.fixture
def split_root(tmp_path):
  """train has classes a, b, c; val lacks b, so its c keeps label 2."""
  for split, classes in (("train", "abc"), ("val", "ac")):
    for name in classes:
      write(tmp_path / split / name / f"{split}_{name}.png", Image.fromarray(RGB))
  return str(tmp_path)


def test_make_source_reads_split_folders(split_root):
  train = sources.make_source(folder_config(split_root), "train")
  val = sources.make_source(folder_config(split_root, channels=1), "val")
  assert isinstance(train, folder.ImageFolderSource)
  assert train.root == os.path.join(split_root, "train") and len(train) == 3
  assert val.classes == ("a", "b", "c")
  assert [val[i]["label"] for i in range(2)] == [0, 2]
  assert val[0]["image"].shape == (6, 5, 1)


def test_make_source_without_split_folders_trains_on_the_root(class_root):
  source = sources.make_source(folder_config(class_root), "train")
  assert source.root == class_root and source.classes == ("cat", "dog", "emu")
  with pytest.raises(FileNotFoundError) as info:
    sources.make_source(folder_config(class_root), "test")
  message = str(info.value)
  assert f"split 'test' of image folder {class_root} not found" in message
  assert os.path.join(class_root, "test") in message and "['cat', 'dog', 'emu']" in message


def test_make_source_folder_errors(tmp_path, split_root):
  with pytest.raises(FileNotFoundError, match="needs config.data.data_dir"):
    sources.make_source(folder_config(None), "train")
  missing = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match=f"image folder {missing} .*does not exist"):
    sources.make_source(folder_config(missing), "train")
  write(os.path.join(split_root, "val", "zebra", "z.png"), Image.fromarray(RGB))
  with pytest.raises(ValueError, match=r"\['zebra'\] of .*val are not among the classes"):
    sources.make_source(folder_config(split_root), "val")


# --- undecodable files ----------------------------------------------------------------------------


@pytest.fixture
def corrupt_root(tmp_path):
  """Class 'a': good0.png, then the three corrupt files, then good1.png (in sorted order)."""
  root = tmp_path / "corrupt"
  write(root / "a" / "good0.png", Image.fromarray(RGB))
  write(root / "a" / "zgood1.png", Image.fromarray(255 - RGB))
  write_corrupt_files(str(root / "a"))
  return str(root)


def test_undecodable_files_give_markers_not_errors(corrupt_root):
  source = folder.ImageFolderSource(corrupt_root)
  names = [os.path.basename(source.path(i)) for i in range(len(source))]
  assert names == ["empty.png", "good0.png", "text.jpg", "truncated.jpg", "zgood1.png"]
  errors = {}
  for i, name in enumerate(names):
    example = source[i]
    assert sources.is_bad(example) == name.startswith(("empty", "text", "truncated"))
    if sources.is_bad(example):
      assert example["path"] == os.path.join(corrupt_root, "a", name) and example["label"] == 0
      errors[name] = example["error"]
  assert "truncated" in errors["truncated.jpg"] and errors["truncated.jpg"].startswith("OSError")
  assert errors["text.jpg"].startswith("UnidentifiedImageError")
  assert errors["empty.png"].startswith("UnidentifiedImageError")


def test_skip_bad_examples_substitutes_the_next_good_one(corrupt_root):
  source = sources.SkipBadExamples(folder.ImageFolderSource(corrupt_root))
  assert len(source) == 5
  examples = [source[i] for i in range(5)]
  # empty.png -> good0; text.jpg and truncated.jpg -> zgood1; each reports only its own path.
  for i, substitute in [(0, RGB), (1, RGB), (2, 255 - RGB), (3, 255 - RGB), (4, 255 - RGB)]:
    np.testing.assert_array_equal(examples[i]["image"], substitute)
  bad = [os.path.basename(e["bad_path"]) for e in examples]
  assert bad == ["empty.png", "", "text.jpg", "truncated.jpg", ""]
  assert examples[2]["bad_error"].startswith("UnidentifiedImageError")
  assert examples[1]["bad_error"] == ""


def test_skip_bad_examples_wraps_around_and_fails_when_nothing_decodes(tmp_path):
  write(tmp_path / "ok" / "b.png", Image.fromarray(RGB))
  write_corrupt_files(str(tmp_path / "ok"))  # sorted after b.png except empty.png
  source = sources.SkipBadExamples(folder.ImageFolderSource(str(tmp_path / "ok")))
  last = source[len(source) - 1]
  assert os.path.basename(last["bad_path"]) == "truncated.jpg"
  np.testing.assert_array_equal(last["image"], RGB)
  bad = folder.ImageFolderSource(str(tmp_path / "ok"))
  os.remove(os.path.join(bad.root, "b.png"))
  with pytest.raises(ValueError, match="can be decoded; e.g. .*b.png: FileNotFoundError"):
    sources.SkipBadExamples(bad)[0]


def test_bad_paths_flow_through_grain_batches_once_per_epoch(corrupt_root):
  """What the training pipeline does: shuffled, batched, collected from the batches."""
  source = sources.SkipBadExamples(folder.ImageFolderSource(corrupt_root))
  dataset = grain.MapDataset.source(source).seed(3).shuffle().repeat(2).batch(5)
  per_epoch = []
  for batch in dataset:
    bad = sources.pop_bad_files(batch)
    assert set(batch) == {"image", "label"} and batch["image"].shape == (5, 6, 5, 3)
    per_epoch.append(bad)
  expected = {os.path.join(corrupt_root, "a", name)
              for name in ("empty.png", "text.jpg", "truncated.jpg")}
  assert [set(bad) for bad in per_epoch] == [expected, expected]
  assert all(error for bad in per_epoch for error in bad.values())


def test_bad_paths_come_back_from_worker_processes(corrupt_root):
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # grain reads a flag when starting workers: google/grain#1355
  source = sources.SkipBadExamples(folder.ImageFolderSource(corrupt_root))
  dataset = grain.MapDataset.source(source).batch(5).to_iter_dataset()
  iterator = iter(dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=1)))
  (batch,) = list(iterator)
  assert sorted(map(os.path.basename, sources.pop_bad_files(batch))) == [
      "empty.png", "text.jpg", "truncated.jpg"]


def test_pop_bad_files_of_a_clean_batch():
  batch = {"image": np.zeros((2, 1, 1, 1)), "bad_path": np.array(["", ""]),
           "bad_error": np.array(["", ""])}
  assert sources.pop_bad_files(batch) == {} and set(batch) == {"image"}
