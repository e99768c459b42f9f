"""Video sources: synthetic sprite videos, folders of frames and video files, clips and their batches."""
import os
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from sslx import config as config_lib
from sslx.data import pipeline
from sslx.data import sources
from sslx.data import video

T, STRIDE = 3, 2  # clips of 3 frames, 2 apart: a clip spans 5 frames


def _data_config(**overrides):
  data = pipeline.default_data_config(source="synthetic_video", dataset="sprites", image_size=16, channels=3,
                                      mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), synthetic_num_examples=16,
                                      eval_split=None)
  video.add_video_keys(data, clip_length=T, frame_stride=STRIDE, num_sprites=3)
  data.update(overrides)
  return data


def _video(seed, num_frames=6, size=24, num_sprites=4):
  return video.synthetic_video(np.random.default_rng(seed), num_frames, size, num_sprites)


def test_synthetic_videos_are_a_function_of_the_seed():
  first, again, other = _video(3), _video(3), _video(4)
  for a, b in zip(first, again, strict=True):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(first[0], other[0])
  frames, labels, colors = first
  assert frames.shape == (6, 24, 24, 3) and frames.dtype == np.uint8
  assert labels.shape == (6, 24, 24) and colors.shape == (4, 3)


def test_sprite_labels_mark_exactly_the_pixels_of_their_colour():
  """Every labelled pixel has its sprite's colour and every background pixel none of them, so the label maps
  agree with what is drawn, occlusions included; the sprites move."""
  for seed in range(5):
    frames, labels, colors = _video(seed, num_frames=8)
    assert len({tuple(color) for color in colors}) == len(colors)
    for k, color in enumerate(colors, start=1):
      np.testing.assert_array_equal(frames[labels == k], np.broadcast_to(color, frames[labels == k].shape))
      assert (labels == k).any()
    background = frames[labels == 0]
    assert not any(np.all(background == color, axis=-1).any() for color in colors)
    assert not np.array_equal(labels[0], labels[-1])


def test_synthetic_source_clips_take_every_stride_th_frame():
  data = _data_config()
  source = sources.make_source(data, "train")
  assert len(source) == 16
  example = source[5]
  span = (T - 1) * STRIDE + 1
  frames, labels, _ = video.synthetic_video(np.random.default_rng((zlib.crc32(b"train"), 5)), span, 16, 3)
  np.testing.assert_array_equal(example["frames"], frames[::STRIDE])
  np.testing.assert_array_equal(example["labels"], labels[::STRIDE])
  assert example["frames"].shape == (T, 16, 16, 3)
  assert not np.array_equal(sources.make_source(data, "test")[5]["frames"], example["frames"])


def _write_frames(directory, values, size=(10, 12)):
  """Frame ``i`` of a video: a uniform PNG of grey level ``values[i]``, named so sorting restores the order."""
  os.makedirs(directory, exist_ok=True)
  for i, value in enumerate(values):
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(os.path.join(directory, f"{i:05d}.png"))


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
  """``train/cls_a/long`` 11 frames (2 clips), ``train/short`` 4 (none), ``train/cls_b/exact`` 5 (1 clip)."""
  root = tmp_path_factory.mktemp("videos")
  _write_frames(root / "train" / "cls_a" / "long", [10 * i for i in range(11)])
  _write_frames(root / "train" / "short", [200, 201, 202, 203])
  _write_frames(root / "train" / "cls_b" / "exact", [100 + i for i in range(5)])
  return root


def test_folder_of_frame_folders_gives_the_non_overlapping_clips(video_folder):
  source = sources.make_source(_data_config(source="video_folder", data_dir=str(video_folder)), "train")
  levels = [tuple(int(frame[0, 0, 0]) for frame in source[i]["frames"]) for i in range(len(source))]
  assert levels == [(0, 20, 40), (50, 70, 90), (100, 102, 104)]
  assert source[0]["frames"].shape == (T, 10, 12, 3) and source[0]["label"] == -1


def test_clips_longer_than_every_video_are_refused(video_folder):
  with pytest.raises(ValueError, match=r"clip_length=7, frame_stride=2.*the longest has 11"):
    video.VideoFolderSource(str(video_folder), clip_length=7, frame_stride=2)


def test_an_undecodable_frame_is_a_bad_example_naming_it_and_is_skipped(tmp_path):
  _write_frames(tmp_path / "train" / "a", [0, 1, 2, 3, 4])
  _write_frames(tmp_path / "train" / "b", [50, 51, 52, 53, 54])
  broken = tmp_path / "train" / "b" / "00002.png"
  broken.write_bytes(b"not a png")
  data = _data_config(source="video_folder", data_dir=str(tmp_path), image_size=8)
  source = sources.make_source(data, "train")
  assert not sources.is_bad(source[0])
  bad = source[1]
  assert sources.is_bad(bad) and bad["path"] == str(broken) and "UnidentifiedImageError" in bad["error"]
  loader = pipeline.make_train_loader(data, global_batch_size=2, seed=0)
  batch = next(loader)
  assert batch["frames"].shape == (2, T, 8, 8, 3)
  assert loader.bad_files.keys() == {str(broken)}


def test_video_files_are_decoded_and_bad_ones_named(tmp_path):
  """An animated GIF (imageio's Pillow plugin decodes it) gives its clips; a file no decoder reads is a bad
  example that names it and what to install."""
  pytest.importorskip("imageio")
  levels = [0, 40, 80, 120, 160, 200]
  images = [Image.fromarray(np.full((8, 8, 3), level, np.uint8)) for level in levels]
  images[0].save(tmp_path / "clip.gif", save_all=True, append_images=images[1:], duration=40, loop=0)
  (tmp_path / "broken.mp4").write_bytes(b"\x00" * 64)
  source = video.VideoFolderSource(str(tmp_path), clip_length=T, frame_stride=STRIDE)
  assert len(source) == 2
  bad, good = source[0], source[1]
  assert sources.is_bad(bad) and bad["path"] == str(tmp_path / "broken.mp4") and "pip install av" in bad["error"]
  assert [int(frame[0, 0, 0]) for frame in good["frames"]] == [0, 80, 160]


def test_without_any_decoder_a_video_file_is_a_clear_error(tmp_path, monkeypatch):
  (tmp_path / "clip.mp4").write_bytes(b"\x00" * 64)
  for module in ("av", "imageio", "imageio.v3"):
    monkeypatch.setitem(sys.modules, module, None)
  with pytest.raises(ImportError, match=r"clip\.mp4: neither PyAV nor imageio is installed.*pip install av"):
    video.VideoFolderSource(str(tmp_path), clip_length=2, frame_stride=1)


def test_clip_view_crops_and_flips_every_frame_alike_and_labels_follow():
  """A 32 px clip cropped to a 16 px box (a quarter of the area at ratio 1, so no resampling): every frame
  gets the same box and flip, and the labels keep naming the colours drawn."""
  rng = np.random.default_rng(0)
  palette = rng.integers(0, 256, (5, 3), dtype=np.uint8)
  labels = np.repeat(rng.integers(0, 5, (1, 32, 32)).astype(np.int32), 3, axis=0)
  clip = {"frames": palette[labels], "labels": labels, "label": -1}
  view = video.ClipView(16, (0.25, 0.25), (1.0, 1.0), "bilinear", True)
  flips = set()
  for seed in range(8):
    out = view.random_map(clip, np.random.default_rng(seed))
    assert out["frames"].shape == (3, 16, 16, 3) and out["labels"].dtype == np.int32
    np.testing.assert_array_equal(out["frames"], palette[out["labels"]])
    assert all(np.array_equal(frame, out["frames"][0]) for frame in out["frames"])
    windows = [(top, left) for top in range(17) for left in range(17)
               if np.array_equal(labels[0, top:top + 16, left:left + 16], out["labels"][0])]
    flips.add(not windows)
  assert flips == {True, False}


def test_training_batches_hold_normalised_clips_and_their_labels():
  data = _data_config(augment=dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), interpolation="bilinear",
                                   hflip=True))
  batch = next(pipeline.make_train_loader(data, global_batch_size=4, seed=1))
  assert batch["frames"].shape == (4, T, 16, 16, 3) and batch["frames"].dtype == np.float32
  assert batch["labels"].shape == (4, T, 16, 16) and batch["labels"].dtype == np.int32
  pixels = np.round((batch["frames"] * 0.25 + 0.5) * 255).astype(np.uint8)
  for clip_pixels, clip_labels in zip(pixels, batch["labels"], strict=True):
    for k in range(1, 4):
      drawn = np.unique(clip_pixels[clip_labels == k], axis=0)
      assert len(drawn) == 1 and any(np.array_equal(drawn[0], color) for color in video.SPRITE_COLORS)


def test_evaluation_batches_show_the_first_frame_of_each_clip():
  data = _data_config()
  batch = next(iter(pipeline.make_eval_loader(data, split="train", batch_size=4)))
  first = sources.make_source(data, "train")[0]["frames"][0]
  np.testing.assert_allclose(batch["image"][0], (first / 255.0 - 0.5) / 0.25, atol=1e-5)
  assert list(batch["label"]) == [-1] * 4


@pytest.mark.parametrize("overrides, message", [
    ({"clip_length": 1}, r"config\.data\.clip_length=1 must be an int in \[2"),
    ({"frame_stride": 0}, r"config\.data\.frame_stride=0 must be an int"),
    ({"num_sprites": 9}, r"config\.data\.num_sprites=9 exceeds the 8 distinct sprite colours"),
    ({"channels": 1, "mean": (0.5,), "std": (0.25,)}, r"config\.data\.channels=1: synthetic videos are in colour"),
    ({"views": ("random_resized_crop(16)",)}, r"config\.data\.views=.*one clip per example"),
])
def test_bad_video_keys_are_named(overrides, message):
  with pytest.raises(ValueError, match=message):
    pipeline.validate_data_values(_data_config(**overrides))


def test_a_video_source_without_clip_keys_is_named():
  data = config_lib.base_config().data
  data.update(dict(source="synthetic_video", channels=3, mean=(0.5,) * 3, std=(0.25,) * 3))
  with pytest.raises(ValueError, match=r"config\.data\.clip_length is missing"):
    pipeline.validate_data_values(data)
