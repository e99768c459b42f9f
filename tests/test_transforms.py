"""Image ops against PIL / numpy references and torchvision's crop-sampling rules."""
import math

import numpy as np
from PIL import Image
import pytest

from sslx.data import transforms


def random_image(height, width, channels, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def pil_reference(image, box, size, resample):
  """Crop (top, left, h, w) then resize with PIL directly."""
  top, left, h, w = box
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  out = np.asarray(pil.crop((left, top, left + w, top + h)).resize((size, size), resample=resample))
  return out.reshape(size, size, image.shape[-1])


class ScriptedRng:
  """Stands in for np.random.Generator: replays given draws and records the calls."""

  def __init__(self, uniforms, integers=()):
    self._uniforms = list(uniforms)
    self._integers = list(integers)
    self.calls = []

  def uniform(self, low, high):
    self.calls.append(("uniform", low, high))
    return self._uniforms.pop(0)

  def integers(self, low, high):
    self.calls.append(("integers", low, high))
    return self._integers.pop(0)


def test_crop_box_follows_torchvision_arithmetic():
  # Area fraction 0.5 of 100x80 at aspect ratio 1: w = h = round(sqrt(4000)) = 63; the offset range
  # is [0, H - h] inclusive, drawn as integers(0, H - h + 1), top first.
  rng = ScriptedRng(uniforms=[0.5, 0.0], integers=[7, 11])
  assert transforms.sample_crop_box(100, 80, rng, (0.2, 1.0), (3 / 4, 4 / 3)) == (7, 11, 63, 63)
  assert rng.calls == [("uniform", 0.2, 1.0), ("uniform", math.log(3 / 4), math.log(4 / 3)),
                       ("integers", 0, 38), ("integers", 0, 18)]


def test_crop_box_retries_then_takes_the_first_that_fits():
  # A full-area crop at ratio 4/3 of a square image is too wide; the next try fits.
  rng = ScriptedRng(uniforms=[1.0, math.log(4 / 3), 0.25, 0.0], integers=[0, 0])
  assert transforms.sample_crop_box(40, 40, rng, (0.2, 1.0), (3 / 4, 4 / 3)) == (0, 0, 20, 20)


@pytest.mark.parametrize("height,width,expected", [
    (10, 100, (0, 43, 10, 13)),   # too wide: full height, width = round(10 * 4/3), centred
    (100, 10, (43, 0, 13, 10)),   # too tall: full width, height = round(10 / (3/4))
    (30, 30, (0, 0, 30, 30)),     # ratio within range: the whole image
])
def test_crop_box_fallback_after_ten_failures(height, width, expected):
  # An area fraction above 1 never fits, so all 10 tries fail.
  rng = np.random.default_rng(0)
  assert transforms.sample_crop_box(height, width, rng, (2.0, 3.0), (3 / 4, 4 / 3)) == expected


def test_crop_boxes_stay_within_bounds():
  rng = np.random.default_rng(0)
  height, width = 120, 90
  fractions, log_ratios = [], []
  for _ in range(3000):
    top, left, h, w = transforms.sample_crop_box(height, width, rng, (0.2, 1.0), (3 / 4, 4 / 3))
    assert 0 <= top <= height - h and 0 <= left <= width - w and h > 0 and w > 0
    fractions.append(h * w / (height * width))
    log_ratios.append(math.log(w / h))
  fractions, log_ratios = np.array(fractions), np.array(log_ratios)
  # Rounding to whole pixels moves the area and ratio a little past the sampled ranges.
  assert fractions.min() > 0.19 and fractions.max() <= 1.0
  assert np.abs(log_ratios).max() < math.log(4 / 3) + 0.05
  assert fractions.min() < 0.21 and fractions.max() > 0.95
  assert log_ratios.min() < math.log(3 / 4) + 0.02 and log_ratios.max() > math.log(4 / 3) - 0.02


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("interpolation,resample", [("bicubic", Image.Resampling.BICUBIC),
                                                     ("bilinear", Image.Resampling.BILINEAR)])
def test_random_resized_crop_equals_pil_crop_and_resize(channels, interpolation, resample):
  image = random_image(47, 61, channels)
  for seed in range(20):
    out = transforms.random_resized_crop(image, np.random.default_rng(seed), 24,
                                         interpolation=interpolation)
    box = transforms.sample_crop_box(47, 61, np.random.default_rng(seed))
    assert out.shape == (24, 24, channels) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, pil_reference(image, box, 24, resample))


def test_random_resized_crop_is_deterministic_given_rng():
  image = random_image(32, 32, 3)
  a = transforms.random_resized_crop(image, np.random.default_rng(5), 16)
  b = transforms.random_resized_crop(image, np.random.default_rng(5), 16)
  c = transforms.random_resized_crop(image, np.random.default_rng(6), 16)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_resize_rejects_unknown_interpolation():
  with pytest.raises(ValueError, match="'nearest' is unknown"):
    transforms.resize(random_image(4, 4, 1), 2, 2, "nearest")


def test_horizontal_flip():
  image = random_image(3, 5, 1)
  rng = np.random.default_rng(0)
  np.testing.assert_array_equal(transforms.horizontal_flip(image, rng, p=1.0), image[:, ::-1])
  np.testing.assert_array_equal(transforms.horizontal_flip(image, rng, p=0.0), image)
  flipped = [not np.array_equal(transforms.horizontal_flip(image, rng), image) for _ in range(2000)]
  assert 0.45 < np.mean(flipped) < 0.55


def test_center_crop_is_identity_at_target_size():
  image = random_image(28, 28, 1)
  assert transforms.resize_shorter_and_center_crop(image, 28) is image


@pytest.mark.parametrize("height,width", [(300, 400), (400, 300), (256, 256)])
def test_center_crop_matches_pil(height, width):
  image = random_image(height, width, 3)
  out = transforms.resize_shorter_and_center_crop(image, 224)
  assert out.shape == (224, 224, 3)
  # The shorter side becomes 224 / 0.875 = 256, the longer one keeps the aspect ratio (truncated).
  new_h, new_w = (256, int(256 * width / height)) if height <= width else (
      int(256 * height / width), 256)
  resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC))
  top, left = round((new_h - 224) / 2), round((new_w - 224) / 2)
  np.testing.assert_array_equal(out, resized[top:top + 224, left:left + 224])


def test_center_crop_grayscale_upscale():
  out = transforms.resize_shorter_and_center_crop(random_image(28, 28, 1), 32)
  assert out.shape == (32, 32, 1) and out.dtype == np.uint8


@pytest.mark.parametrize("shape,mean,std", [
    ((4, 5, 1), (0.286,), (0.353,)),
    ((2, 4, 5, 3), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
])
def test_normalize_matches_formula(shape, mean, std):
  image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  out = transforms.normalize(image, mean, std)
  expected = (image.astype(np.float64) / 255 - np.array(mean)) / np.array(std)
  assert out.dtype == np.float32 and out.shape == shape
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
