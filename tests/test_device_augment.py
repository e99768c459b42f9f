"""Device (batched JAX) augmentation ops against the host ops, their draws, the spec split, errors, and
loaders with config.data.augment_on='device'.

The host ops in color.py draw from a numpy generator in a documented order (an apply-or-not draw,
then the parameters); the parity tests replay those draws from a generator with the same seed and
feed them to the device op, so both sides compute the same augmentation of the same image.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslx.data import color
from sslx.data import device_augment
from sslx.data import pipeline
from sslx.data import transforms

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
SIMCLR_TAIL = "color_jitter(1.0, p=0.8)|grayscale(p=0.2)|blur(p=0.5)|solarize(p=0.2)"
NUM_IMAGES = 12


def random_images(height, width, channels, seed=0, n=NUM_IMAGES):
  """Smooth colour gradients plus noise: every op (blur, hue...) visibly changes them."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width] / max(height, width)
  base = rng.uniform(0, 255, (n, 1, 1, channels)) * (0.5 + 0.5 * np.sin(3 * x + 2 * y))[..., None]
  noise = rng.normal(0, 30, (n, height, width, channels))
  return np.clip(base + noise, 0, 255).astype(np.uint8)


def assert_within_one_level(device_out, host_out):
  """Whole uint8 levels on both sides; float32 sums in another order may flip a half-level value."""
  device_out = np.asarray(device_out)
  np.testing.assert_array_equal(device_out, np.round(device_out))
  difference = np.abs(device_out - np.asarray(host_out, np.float32))
  assert difference.max() <= 1 and (difference > 0).mean() < 0.01


def run_host(op, images, seeds, **kwargs):
  return np.stack([op(image, np.random.default_rng(seed), **kwargs)
                   for image, seed in zip(images, seeds, strict=True)])


# --- The pixel functions compute the host ops for the host's own draws ------------------------------


def replay_jitter(seed, p, strengths):
  """color.color_jitter's draws: apply, a permutation, then the factors of non-zero strengths."""
  rng = np.random.default_rng(seed)
  apply, order, factors = rng.random() < p, np.arange(4), np.zeros(4)
  if apply:
    order = rng.permutation(4)
    for i, strength in enumerate(strengths[:3]):
      if strength > 0:
        factors[i] = rng.uniform(max(0.0, 1 - strength), 1 + strength)
    if strengths[3] > 0:
      factors[3] = rng.uniform(-strengths[3], strengths[3])
  return apply, order, factors


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("strengths", [(0.8, 0.8, 0.8, 0.2), (0.4, 0.4, 0.2, 0.1), (0.0, 1.2, 0.0, 0.5)])
def test_jitter_matches_host_for_the_same_draws(strengths, channels):
  images = random_images(13, 11, channels)
  seeds = range(NUM_IMAGES)
  names = ("brightness", "contrast", "saturation", "hue")
  host = run_host(color.color_jitter, images, seeds, p=0.7, **dict(zip(names, strengths, strict=True)))
  apply, order, factors = map(np.stack, zip(*(replay_jitter(s, 0.7, strengths) for s in seeds), strict=True))
  assert apply.any() and not apply.all()
  device = device_augment.jitter_pixels(jnp.asarray(images, jnp.float32), apply, order,
                                        jnp.asarray(factors, jnp.float32),
                                        active=tuple(x > 0 for x in strengths))
  assert_within_one_level(device, host)
  assert not np.array_equal(host[apply], images[apply])


@pytest.mark.parametrize("shape, kernel_size", [((24, 30, 3), None), ((45, 41, 3), None),
                                                ((16, 16, 1), 7), ((12, 9, 3), 1)])
def test_blur_matches_host_for_the_same_draws(shape, kernel_size):
  images = random_images(*shape)
  seeds = range(NUM_IMAGES)
  host = run_host(color.random_gaussian_blur, images, seeds, p=0.6, sigma=(0.3, 2.5),
                  kernel_size=kernel_size)
  draws = [np.random.default_rng(s) for s in seeds]
  apply = np.array([rng.random() < 0.6 for rng in draws])
  sigma = np.array([rng.uniform(0.3, 2.5) if a else 1.0 for rng, a in zip(draws, apply, strict=True)])
  assert apply.any() and not apply.all()
  device = device_augment.blur_pixels(jnp.asarray(images, jnp.float32), apply,
                                      jnp.asarray(sigma, jnp.float32), kernel_size)
  assert_within_one_level(device, host)


@pytest.mark.parametrize("channels", [1, 3])
def test_grayscale_solarize_flip_match_host_for_the_same_draws(channels):
  images = random_images(10, 14, channels)
  seeds = range(NUM_IMAGES)
  as_float = jnp.asarray(images, jnp.float32)
  apply = np.array([np.random.default_rng(s).random() < 0.5 for s in seeds])
  assert apply.any() and not apply.all()

  host = run_host(color.random_grayscale, images, seeds, p=0.5)
  assert_within_one_level(device_augment.grayscale_pixels(as_float, apply), host)
  host = run_host(color.random_solarize, images, seeds, p=0.5, threshold=90)
  np.testing.assert_array_equal(device_augment.solarize_pixels(as_float, apply, 90), host)
  host = run_host(transforms.horizontal_flip, images, seeds, p=0.5)
  np.testing.assert_array_equal(device_augment.flip_pixels(as_float, apply), host)


def test_normalize_matches_host():
  images = random_images(5, 6, 3)
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  np.testing.assert_allclose(device_augment.normalize_pixels(jnp.asarray(images), mean, std),
                             transforms.normalize(images, mean, std), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("spec", [
    "blur(p=1.0, sigma=(1.5, 1.5))|solarize(p=1.0, threshold=77)",
    "grayscale(p=1.0)|hflip(p=1.0)|blur(p=0.0)|normalize(mean=(0.1, 0.2, 0.3), std=(0.5, 0.4, 0.3))",
    "color_jitter(0.0, p=1.0)|solarize(p=0.0)",
])
def test_ops_built_from_a_spec_take_the_host_arguments(spec):
  """Specs whose draws do not matter: the whole device chain equals the host augmentation."""
  images = random_images(26, 21, 3)
  mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
  augmentation = transforms.build_augmentation(spec, mean=mean, std=std)
  host = np.stack([augmentation(image, np.random.default_rng(0)) for image in images])
  if not augmentation.normalizes:
    host = transforms.normalize(host, mean, std)
  ops = device_augment.build_device_ops(spec, mean=mean, std=std)
  device = jax.jit(device_augment.apply_ops, static_argnums=0)(ops, images, jax.random.key(1))
  assert device.dtype == jnp.float32
  np.testing.assert_allclose(device, host, atol=1.01 / (255 * 0.25) + 1e-5)


# --- Parameter draws ---------------------------------------------------------------------------------

N_DRAWS = 24_000


@pytest.mark.parametrize("p", [0.0, 0.2, 0.8, 1.0])
def test_each_op_applies_with_probability_p(p):
  spec = f"hflip(p={p})|color_jitter(0.5, p={p})|grayscale(p={p})|blur(p={p})|solarize(p={p})"
  ops = device_augment.build_device_ops(spec, mean=(0.5,), std=(0.5,))
  for op, key in zip(ops[:-1], jax.random.split(jax.random.key(0), 5), strict=True):
    params = op.sample(key, N_DRAWS)
    applied = params["flip"] if "flip" in params else params["apply"]
    # 4.5 standard deviations of a binomial frequency over N_DRAWS draws.
    assert abs(np.mean(applied) - p) <= 4.5 * np.sqrt(0.25 / N_DRAWS)


def test_jitter_draws_follow_the_strengths():
  (jitter, _) = device_augment.build_device_ops("color_jitter(0.5, p=0.8)", mean=(0.5,), std=(0.5,))
  params = jitter.sample(jax.random.key(3), N_DRAWS)
  factors, order = np.asarray(params["factors"]), np.asarray(params["order"])
  # SimCLR strength 0.5: brightness, contrast, saturation 0.4 -> [0.6, 1.4]; hue 0.1 -> [-0.1, 0.1].
  low, high = np.array([0.6, 0.6, 0.6, -0.1]), np.array([1.4, 1.4, 1.4, 0.1])
  assert (factors >= low - 1e-6).all() and (factors <= high + 1e-6).all()
  np.testing.assert_allclose(factors.min(0), low, atol=0.01)
  np.testing.assert_allclose(factors.max(0), high, atol=0.01)
  np.testing.assert_allclose(factors.mean(0), (low + high) / 2, atol=0.01)
  np.testing.assert_array_equal(np.sort(order, axis=1), np.tile(np.arange(4), (N_DRAWS, 1)))
  codes = order @ np.array([64, 16, 4, 1])
  counts = np.unique(codes, return_counts=True)[1]
  assert len(counts) == 24
  assert np.abs(counts / N_DRAWS - 1 / 24).max() < 4.5 * np.sqrt(1 / 24 / N_DRAWS)


def test_strength_zero_leaves_an_adjustment_out_and_large_strength_clamps_at_zero():
  (jitter, _) = device_augment.build_device_ops(
      "color_jitter(brightness=0.0, contrast=1.5, saturation=0.2, hue=0.0, p=1.0)",
      mean=(0.5,), std=(0.5,))
  factors = np.asarray(jitter.sample(jax.random.key(0), 4000)["factors"])
  assert factors[:, 1].min() >= 0 and factors[:, 1].min() < 0.01
  images = random_images(8, 8, 3)
  params = jitter.sample(jax.random.key(0), NUM_IMAGES)
  params["factors"] = params["factors"].at[:, 1:3].set(1.0)  # contrast and saturation: identity
  np.testing.assert_array_equal(jitter.apply(jnp.asarray(images, jnp.float32), params), images)


def test_blur_sigma_is_uniform_in_its_interval():
  (blur, _) = device_augment.build_device_ops("blur(sigma=(0.5, 3.0))", mean=(0.5,), std=(0.5,))
  sigma = np.asarray(blur.sample(jax.random.key(0), N_DRAWS)["sigma"])
  assert 0.5 <= sigma.min() < 0.51 and 2.99 < sigma.max() <= 3.0
  assert abs(sigma.mean() - 1.75) < 0.02 and abs(sigma.std() - 2.5 / np.sqrt(12)) < 0.02


# --- The split and the errors ------------------------------------------------------------------------


@pytest.mark.parametrize("spec, host, device", [
    (f"random_resized_crop(24, scale=(0.08, 1))|hflip|{SIMCLR_TAIL}",
     "random_resized_crop(24, scale=(0.08, 1))|hflip", SIMCLR_TAIL),
    ("hflip|center_crop(8)", "hflip|center_crop(8)", ""),
    ("random_resized_crop(8)|blur|hflip(p=0.3)|normalize", "random_resized_crop(8)",
     "blur|hflip(p=0.3)|normalize"),
])
def test_split_spec_keeps_leading_crops_and_flips_on_the_host(spec, host, device):
  assert device_augment.split_spec(spec) == (host, device)


@pytest.mark.parametrize("spec, message", [
    ("random_resized_crop(8)|blur|center_crop(8)", "'center_crop(8)' has no device version"),
    ("color_jitter|random_resized_crop(8)", "does not start with its crop"),
    ("hflip|blur", "does not start with its crop"),
    ("random_resized_crop(8)|fancy_op", "'fancy_op' has no device version"),
])
def test_split_spec_errors_name_the_op(spec, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    device_augment.split_spec(spec)


def synthetic_config(**overrides):
  defaults = dict(source="synthetic", image_size=16, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3,
                  synthetic_num_examples=64, synthetic_image_size=20)
  return pipeline.default_data_config(**{**defaults, **overrides})


@pytest.mark.parametrize("overrides, message", [
    (dict(augment_on="gpu"), r"config.data.augment_on='gpu' is invalid"),
    (dict(augment_on="device", views=("random_resized_crop(16)|blur(p=2)",)),
     r"config.data.views\[0\]=.* is invalid: augmentation op 'blur\(p=2\)': p=2"),
    (dict(augment_on="device", views=("random_resized_crop(16)", "center_crop(8)|blur|center_crop(8)")),
     r"config.data.views\[1\]=.* is invalid: augmentation op 'center_crop\(8\)' has no device"),
    (dict(augment_on="device", channels=1, mean=(0.5,), std=(0.25,),
          augmentation="random_resized_crop(16)|normalize(mean=(0.5, 0.5, 0.5), std=(1, 1, 1))"),
     r"config.data.augmentation=.* turns 1-channel images into shape \(16, 16, 3\) on the device"),
    (dict(augment_on="device", views=("random_resized_crop(16)", "random_resized_crop(8)|blur(kernel_size=17)")),
     r"config.data.views\[1\]=.* fails on the device .* kernel_size=17 is too large for 8x8 images"),
])
def test_bad_configs_fail_before_anything_runs_naming_the_key(overrides, message):
  config = synthetic_config(**overrides)
  with pytest.raises(ValueError, match=message):
    pipeline.validate_data_config(config)
  with pytest.raises(ValueError, match=message):
    device_augment.build_device_augmentation(config)


def test_host_mode_has_no_device_function():
  assert device_augment.build_device_augmentation(synthetic_config()) is None


# --- Loaders: device mode gives what host mode gives --------------------------------------------------


def take(config, num_batches, batch_size=64):
  loader = pipeline.make_train_loader(config, global_batch_size=batch_size, seed=0)
  try:
    return [next(loader) for _ in range(num_batches)]
  finally:
    loader.close()


def take_on_device(config, num_batches, batch_size=64):
  config.augment_on = "device"
  augment = jax.jit(device_augment.build_device_augmentation(config))
  batches = take(config, num_batches, batch_size)
  for batch in batches:
    assert all(batch[key].dtype == np.uint8 for key in batch if key != "label")
  return [jax.device_get(augment(batch, jax.random.key(i))) for i, batch in enumerate(batches)]


def fashion_mnist_config(spec):
  return pipeline.default_data_config(data_dir=FASHION_MNIST_DIR, augmentation=spec)


def rgb_views_config(spec):
  return synthetic_config(views=(spec, spec.replace("(16", "(8")), synthetic_num_examples=256)


@pytest.mark.parametrize("make_config, size", [(fashion_mnist_config, 28), (rgb_views_config, 16)])
def test_device_mode_equals_host_mode_when_the_draws_do_not_matter(make_config, size):
  # Same crops (the host part draws first on both sides); ops with p = 1 and a fixed sigma.
  spec = (f"random_resized_crop({size})|hflip|grayscale(p=1.0)|blur(p=1.0, sigma=(1.2, 1.2))|"
          "solarize(p=1.0, threshold=100)")
  host = take(make_config(spec), 2)
  device = take_on_device(make_config(spec), 2)
  std = min(make_config(spec).std)
  for host_batch, device_batch in zip(host, device, strict=True):
    assert host_batch.keys() == device_batch.keys()
    for key, value in host_batch.items():
      assert device_batch[key].shape == value.shape and device_batch[key].dtype == value.dtype
      np.testing.assert_allclose(device_batch[key], value, atol=1.01 / (255 * std) + 1e-5)


def gray_fraction(images):
  return np.mean([np.ptp(image, axis=-1).max() == 0 for image in images])


@pytest.mark.parametrize("make_config, size", [(fashion_mnist_config, 28), (rgb_views_config, 16)])
def test_device_mode_has_the_statistics_of_host_mode(make_config, size):
  spec = f"random_resized_crop({size}, scale=(0.08, 1))|hflip|{SIMCLR_TAIL}"
  host = take(make_config(spec), 16, batch_size=128)
  device = take_on_device(make_config(spec), 16, batch_size=128)
  for key in host[0]:
    if key == "label":
      continue
    host_images = np.concatenate([batch[key] for batch in host])
    device_images = np.concatenate([batch[key] for batch in device])
    assert device_images.shape == host_images.shape and device_images.dtype == np.float32
    # 2048 images with the same crops on both sides but other colour draws: the tolerances are
    # about 4 standard deviations of the differences over colour draws alone.
    assert abs(device_images.mean() - host_images.mean()) < 0.08
    assert abs(device_images.std() / host_images.std() - 1) < 0.06
    if host_images.shape[-1] == 3:
      # grayscale(p=0.2) makes the only gray images (jitter's saturation factor stays >= 0.2).
      assert abs(gray_fraction(host_images) - 0.2) < 0.04
      assert abs(gray_fraction(device_images) - 0.2) < 0.04


def test_each_view_draws_from_its_own_key():
  # Whole-image crops: both views leave the workers identical; only their device draws differ.
  config = synthetic_config(image_size=20, augment_on="device",
                            views=("center_crop(20)|solarize(p=0.5)",) * 2)
  (batch,) = take(config, 1)
  np.testing.assert_array_equal(batch["view_0"], batch["view_1"])
  out = device_augment.build_device_augmentation(config)(batch, jax.random.key(0))
  unchanged = transforms.normalize(batch["view_0"], config.mean, config.std)
  solarized = [np.abs(out[key] - unchanged).max(axis=(1, 2, 3)) > 1e-3 for key in ("view_0", "view_1")]
  assert 0.2 < solarized[0].mean() < 0.8 and 0.2 < solarized[1].mean() < 0.8
  assert np.any(solarized[0] != solarized[1])
