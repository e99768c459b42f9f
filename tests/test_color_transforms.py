"""Colour ops against independent references, and augmentations composed from a spec.

References: PIL's ImageEnhance / ImageOps / ImageFilter / convert('L'), Python's colorsys, and numpy
formulas written out here from torchvision's definitions (brightness = blend with black, contrast =
blend with the mean luma, saturation = blend with the luma image, hue = shift in HSV).
"""
import colorsys
import itertools
import pickle

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
import pytest

from sslx.data import color
from sslx.data import transforms

WEIGHTS = np.array([0.299, 0.587, 0.114])
SIMCLR = ("random_resized_crop(24, scale=(0.08, 1))|hflip|color_jitter(1.0, p=0.8)|"
          "grayscale(p=0.2)|blur(p=0.5)|solarize(p=0.2)")


def random_image(height, width, channels, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def to_pil(image):
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def from_pil(pil, channels):
  array = np.asarray(pil)
  return array.reshape(array.shape[0], array.shape[1], channels)


def blend(image, other, factor):
  """torchvision's _blend, in float64 and without rounding."""
  return np.clip(factor * image + (1 - factor) * other, 0, 255)


def gray64(image):
  image = image.astype(np.float64)
  return image if image.shape[-1] == 1 else (image @ WEIGHTS)[..., None]


def ref_adjust(kind, image, factor):
  image = image.astype(np.float64)
  if kind == "brightness":
    return blend(image, 0.0, factor)
  if kind == "contrast":
    return blend(image, gray64(image).mean(), factor)
  if kind == "saturation":
    return image if image.shape[-1] == 1 else blend(image, gray64(image), factor)
  return image if image.shape[-1] == 1 else ref_hue(image, factor)


def ref_hue(image, shift):
  """Pixel by pixel through colorsys, on [0, 1] values."""
  out = np.empty(image.shape)
  for index in np.ndindex(image.shape[:2]):
    h, s, v = colorsys.rgb_to_hsv(*(image[index] / 255))
    out[index] = np.array(colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)) * 255
  return out


def assert_close_to_pil(ours, pil_result, max_diff, mean_diff=0.6):
  """PIL rounds to uint8 (truncating in its blends) where we keep float: off by a level or two."""
  difference = np.abs(ours.astype(np.int64) - pil_result.astype(np.int64))
  assert difference.max() <= max_diff and difference.mean() < mean_diff


# --- single adjustments ---------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kind", ["brightness", "contrast", "saturation", "hue"])
def test_adjustments_match_formulas(kind, channels):
  image = random_image(9, 7, channels)
  adjust = getattr(color, f"adjust_{kind}")
  factors = (-0.5, -0.13, 0.0, 0.21, 0.5) if kind == "hue" else (0.0, 0.3, 1.0, 1.7)
  for factor in factors:
    out = adjust(image, factor)
    assert out.dtype == np.float32 and out.shape == image.shape
    np.testing.assert_allclose(out, ref_adjust(kind, image, factor), atol=2e-3)


@pytest.mark.parametrize("kind,enhancer,channels", [
    ("brightness", ImageEnhance.Brightness, 1), ("brightness", ImageEnhance.Brightness, 3),
    ("contrast", ImageEnhance.Contrast, 1), ("contrast", ImageEnhance.Contrast, 3),
    ("saturation", ImageEnhance.Color, 3),
])
def test_adjustments_match_pil_enhance(kind, enhancer, channels):
  image = random_image(40, 30, channels, seed=1)
  for factor in (0.0, 0.4, 1.0, 1.6):
    ours = np.rint(getattr(color, f"adjust_{kind}")(image, factor))
    theirs = from_pil(enhancer(to_pil(image)).enhance(factor), channels)
    # Contrast: PIL rounds the mean luma to an integer first, which moves every pixel a little.
    assert_close_to_pil(ours, theirs, max_diff=2 if kind == "contrast" else 1,
                        mean_diff=1.0 if kind == "contrast" else 0.6)


def test_hue_against_pil_hsv_shift():
  """torchvision's PIL path: shift PIL's 8-bit H channel (wrapping); coarse, so a loose check."""
  image = random_image(30, 30, 3, seed=2)
  shift = 0.25
  h, s, v = Image.fromarray(image).convert("HSV").split()
  h = Image.fromarray((np.asarray(h).astype(np.int64) + round(shift * 255)).astype(np.uint8))
  theirs = np.asarray(Image.merge("HSV", (h, s, v)).convert("RGB")).astype(np.int64)
  ours = np.rint(color.adjust_hue(image, shift)).astype(np.int64)
  assert np.median(np.abs(ours - theirs)) <= 2


def test_hue_keeps_gray_and_turns_primaries():
  primaries = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [90, 90, 90]]], np.uint8)
  out = np.rint(color.adjust_hue(primaries, 1 / 3))
  np.testing.assert_array_equal(out, [[[0, 255, 0], [0, 0, 255], [255, 0, 0], [90, 90, 90]]])
  np.testing.assert_allclose(color.adjust_hue(primaries, 0.0), primaries, atol=1e-4)


# --- colour jitter --------------------------------------------------------------------------------


def ref_color_jitter(image, rng, strengths, p):
  """RandomApply + ColorJitter as torchvision orders it, each adjustment from the formulas above."""
  if rng.random() >= p:
    return image
  order = rng.permutation(4)
  kinds = ("brightness", "contrast", "saturation", "hue")
  factors = {}
  for kind in kinds[:3]:
    if strengths[kind] > 0:
      factors[kind] = rng.uniform(max(0, 1 - strengths[kind]), 1 + strengths[kind])
  if strengths["hue"] > 0:
    factors["hue"] = rng.uniform(-strengths["hue"], strengths["hue"])
  out = image.astype(np.float64)
  for i in order:
    if kinds[i] in factors:
      out = ref_adjust(kinds[i], out, factors[kinds[i]])
  return np.rint(out)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("strengths", [
    dict(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2),  # SimCLR, s = 1
    dict(brightness=0.4, contrast=0.0, saturation=0.2, hue=0.0),  # zero strengths draw nothing
    dict(brightness=1.5, contrast=1.2, saturation=2.0, hue=0.5),  # factors from max(0, 1 - x)
])
def test_color_jitter_follows_torchvision_order_and_draws(strengths, channels):
  image = random_image(6, 5, channels, seed=3)
  for seed in range(25):
    ours = color.color_jitter(image, np.random.default_rng(seed), p=0.8, **strengths)
    theirs = ref_color_jitter(image, np.random.default_rng(seed), strengths, p=0.8)
    assert ours.dtype == np.uint8 and ours.shape == image.shape
    assert np.abs(ours.astype(np.int64) - theirs).max() <= 1


def test_color_jitter_order_probability_and_seeding():
  image = random_image(4, 4, 3, seed=4)
  rng = np.random.default_rng(0)
  applied = [not np.array_equal(color.color_jitter(image, rng, brightness=0.5, p=0.3), image)
             for _ in range(2000)]
  assert 0.26 < np.mean(applied) < 0.34
  # Every order of the four adjustments occurs.
  orders = set()
  for seed in range(400):
    rng = np.random.default_rng(seed)
    rng.random()
    orders.add(tuple(rng.permutation(4)))
  assert orders == set(itertools.permutations(range(4)))
  a = color.color_jitter(image, np.random.default_rng(7), brightness=0.8, hue=0.2)
  b = color.color_jitter(image, np.random.default_rng(7), brightness=0.8, hue=0.2)
  np.testing.assert_array_equal(a, b)
  assert color.color_jitter(image, np.random.default_rng(7), brightness=0.8, p=0.0) is image


# --- grayscale, solarize, blur --------------------------------------------------------------------


def test_grayscale_matches_pil_and_weights():
  image = random_image(30, 20, 3, seed=5)
  out = color.to_grayscale(image)
  assert out.shape == image.shape and out.dtype == np.uint8
  assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])
  assert_close_to_pil(out[..., 0], np.asarray(Image.fromarray(image).convert("L")), max_diff=1,
                      mean_diff=0.01)
  np.testing.assert_allclose(out[..., 0], image @ WEIGHTS, atol=0.5 + 1e-4)
  gray = random_image(5, 5, 1)
  assert color.to_grayscale(gray) is gray
  rng = np.random.default_rng(0)
  hits = [color.random_grayscale(image, rng, p=0.2) is not image for _ in range(2000)]
  assert 0.17 < np.mean(hits) < 0.23


@pytest.mark.parametrize("channels", [1, 3])
def test_solarize_matches_pil(channels):
  image = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(channels, axis=-1)
  out = color.solarize(image)
  np.testing.assert_array_equal(out, from_pil(ImageOps.solarize(to_pil(image), 128), channels))
  flat = out[..., 0].ravel()
  assert flat[127] == 127 and flat[128] == 127 and flat[255] == 0  # 128 and above are inverted
  rng = np.random.default_rng(0)
  np.testing.assert_array_equal(color.random_solarize(image, rng, p=1.0), out)
  assert color.random_solarize(image, rng, p=0.0) is image


def ref_blur(image, sigma, kernel_size):
  """2-D correlation with the outer product of torchvision's 1-D kernel, 'reflect' borders."""
  half = (kernel_size - 1) / 2
  x = np.linspace(-half, half, kernel_size)
  kernel_1d = np.exp(-0.5 * (x / sigma) ** 2)
  kernel = np.outer(kernel_1d, kernel_1d) / kernel_1d.sum() ** 2
  r = kernel_size // 2
  padded = np.pad(image.astype(np.float64), ((r, r), (r, r), (0, 0)), mode="reflect")
  height, width = image.shape[:2]
  out = np.zeros(image.shape)
  for dy in range(kernel_size):
    for dx in range(kernel_size):
      out += kernel[dy, dx] * padded[dy:dy + height, dx:dx + width]
  return out


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("sigma,kernel_size", [(0.1, 3), (0.8, 3), (1.3, 5), (2.0, 7)])
def test_gaussian_blur_matches_2d_reference(channels, sigma, kernel_size):
  image = random_image(11, 9, channels, seed=6)
  out = color.gaussian_blur(image, sigma, kernel_size)
  assert out.dtype == np.uint8 and out.shape == image.shape
  assert np.abs(out - ref_blur(image, sigma, kernel_size)).max() <= 0.5 + 1e-3


def test_gaussian_blur_close_to_pil_away_from_borders():
  """PIL approximates the Gaussian with box filters and pads differently: a loose check."""
  smooth = np.asarray(Image.fromarray(random_image(8, 8, 3, seed=7)).resize(
      (64, 64), Image.Resampling.BICUBIC))
  ours = color.gaussian_blur(smooth, 1.5, 23).astype(np.int64)
  theirs = np.asarray(Image.fromarray(smooth).filter(ImageFilter.GaussianBlur(1.5))).astype(int)
  difference = np.abs(ours - theirs)[12:-12, 12:-12]
  assert difference.mean() < 1.0 and difference.max() <= 4


def test_random_gaussian_blur_draws_sigma_and_sizes_kernel():
  assert [color.blur_kernel_size(n, 500) for n in (224, 32, 28, 19)] == [23, 3, 3, 1]
  image = random_image(40, 44, 3, seed=8)
  for seed in range(5):
    rng = np.random.default_rng(seed)
    rng.random()
    sigma = rng.uniform(0.1, 2.0)
    np.testing.assert_array_equal(
        color.random_gaussian_blur(image, np.random.default_rng(seed), p=1.0),
        color.gaussian_blur(image, sigma, 5))
  assert color.random_gaussian_blur(image, np.random.default_rng(0), p=0.0) is image
  small = random_image(10, 10, 1)
  assert color.random_gaussian_blur(small, np.random.default_rng(0), p=1.0) is small
  with pytest.raises(ValueError, match="odd"):
    color.gaussian_blur(image, 1.0, 4)


# --- specs ----------------------------------------------------------------------------------------


def test_parse_ops():
  calls = transforms.parse_ops("random_resized_crop(224, scale=(0.08, 1))| hflip |"
                               "color_jitter(0.4, p=0.8)|normalize")
  assert [(c.name, c.args, c.kwargs) for c in calls] == [
      ("random_resized_crop", (224,), {"scale": (0.08, 1)}), ("hflip", (), {}),
      ("color_jitter", (0.4,), {"p": 0.8}), ("normalize", (), {})]
  assert calls[2].text == "color_jitter(0.4, p=0.8)"


def test_simclr_spec_end_to_end():
  augment = transforms.build_augmentation(SIMCLR + "|normalize", mean=(0.5,) * 3, std=(0.25,) * 3)
  assert augment.output_size == 24 and augment.normalizes
  jitter = augment.ops[2]
  assert jitter.func is color.color_jitter
  assert jitter.keywords == dict(p=0.8, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2)
  image = random_image(50, 40, 3)
  out = augment(image, np.random.default_rng(1))
  assert out.shape == (24, 24, 3) and out.dtype == np.float32
  restored = pickle.loads(pickle.dumps(augment))  # grain sends it to worker processes
  np.testing.assert_array_equal(restored(image, np.random.default_rng(1)), out)
  assert not np.array_equal(augment(image, np.random.default_rng(2)), out)


def test_spec_applies_ops_in_order_with_one_generator():
  augment = transforms.build_augmentation("hflip(p=1.0)|solarize(p=1.0)|grayscale(p=1.0)")
  image = random_image(5, 6, 3)
  expected = color.to_grayscale(color.solarize(image[:, ::-1]))
  np.testing.assert_array_equal(augment(image, np.random.default_rng(0)), expected)
  assert augment.output_size is None and not augment.normalizes


def test_spec_on_one_channel_images():
  augment = transforms.build_augmentation(SIMCLR.replace("p=0.2", "p=1.0").replace("p=0.5",
                                                                                   "p=1.0"))
  out = augment(random_image(30, 30, 1), np.random.default_rng(0))
  assert out.shape == (24, 24, 1) and out.dtype == np.uint8


def test_jitter_keywords_override_strength():
  augment = transforms.build_augmentation(
      "color_jitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, p=0.8)|"
      "color_jitter(0.5, hue=0.0)|center_crop(16)")
  assert augment.ops[0].keywords == dict(p=0.8, brightness=0.4, contrast=0.4, saturation=0.2,
                                         hue=0.1)
  assert augment.ops[1].keywords == dict(p=0.8, brightness=0.4, contrast=0.4, saturation=0.4,
                                         hue=0.0)
  assert augment.output_size == 16


@pytest.mark.parametrize("spec,match", [
    ("hflip|sharpen(2)", r"op 'sharpen\(2\)': unknown op 'sharpen'; known ops: \["),
    ("grayscale(p=1.5)", r"op 'grayscale\(p=1.5\)': p=1.5 is invalid; expected a number in "
                         r"\[0, 1\]"),
    ("blur(q=1)", r"op 'blur\(q=1\)': got an unexpected keyword argument 'q'; its arguments are "
                  r"blur\(p=0.5, sigma=\(0.1, 2.0\), kernel_size=None\)"),
    ("hflip(0.5, 0.2)", r"op 'hflip\(0.5, 0.2\)': too many positional arguments"),
    ("blur(kernel_size=4)", r"kernel_size=4 is invalid; expected None .* or an odd int"),
    ("blur(sigma=(2, 1))", r"sigma=\(2, 1\) is invalid"),
    ("color_jitter(3)", r"op 'color_jitter\(3\)': hue=0.6.* is invalid; expected a number in "
                        r"\[0, 0.5\] \(hue = 0.2 \* strength\)"),
    ("random_resized_crop(0)", r"size=0 is invalid"),
    ("random_resized_crop(8, scale=(0, 1))", r"scale=\(0, 1\) is invalid"),
    ("center_crop(8, interpolation='nearest')", r"interpolation='nearest' is invalid"),
    ("solarize(threshold=300)", r"threshold=300 is invalid"),
    ("normalize|hflip", r"op 'normalize': normalize must be the last op"),
    ("normalize", r"op 'normalize': mean=None is invalid; expected 1 or 3 numbers"),
    ("normalize(mean=(0.5,), std=(0.0,))", r"std=\(0.0,\) is invalid"),
    ("blur(p=x)", r"op 'blur\(p=x\)': arguments must be Python literals"),
    ("hflip|1", r"op '1' is not of the form name or name\(args\)"),
    ("hflip||blur", r"augmentation spec 'hflip\|\|blur' is not of the form"),
    ("blur(sigma={[1]: 2})", r"arguments must be Python literals"),
    (["hflip"], r"an augmentation spec is a string"),
])
def test_bad_specs_name_the_op_and_argument(spec, match):
  with pytest.raises(ValueError, match=match):
    transforms.build_augmentation(spec)
