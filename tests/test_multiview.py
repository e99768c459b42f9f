"""Multi-view batches (config.data.views): keys, shapes, independence, determinism and resume."""
import numpy as np
import pytest

from sslx.data import pipeline
from conftest import assert_same_batches

SIMCLR = ("random_resized_crop(32, scale=(0.08, 1))|hflip|color_jitter(0.5, p=0.8)|grayscale(p=0.2)"
          "|blur")
DINO_GLOBAL = "random_resized_crop(32, scale=(0.4, 1))|hflip|color_jitter(0.5, p=0.8)|blur(p=1.0)"
DINO_LOCAL = "random_resized_crop(16, scale=(0.05, 0.4))|hflip|color_jitter(0.5, p=0.8)|blur"


@pytest.fixture
def config():
  return pipeline.default_data_config(
      source="synthetic", image_size=32, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3,
      synthetic_num_examples=40, synthetic_image_size=40)


def take(config, n, seed=0, state=None):
  loader = pipeline.make_train_loader(config, global_batch_size=8, seed=seed)
  if state is not None:
    loader.set_state(state)
  try:
    return [next(loader) for _ in range(n)]
  finally:
    loader.close()


def test_simclr_two_views_differ_but_are_reproducible(config):
  config.views = (SIMCLR, SIMCLR)
  batches = take(config, 2)
  for batch in batches:
    assert set(batch) == {"view_0", "view_1", "label"}
    for key in ("view_0", "view_1"):
      assert batch[key].shape == (8, 32, 32, 3) and batch[key].dtype == np.float32
    # The same spec, independent randomness: every row's two views differ.
    assert all(not np.array_equal(a, b) for a, b in zip(batch["view_0"], batch["view_1"], strict=True))
  assert_same_batches(take(config, 2), batches)
  other_seed = take(config, 1, seed=1)[0]
  assert not np.array_equal(other_seed["view_0"], batches[0]["view_0"])


def test_dino_global_and_local_views_have_their_own_sizes(config):
  config.views = (DINO_GLOBAL,) * 2 + (DINO_LOCAL,) * 4
  loader = pipeline.make_train_loader(config, global_batch_size=8, seed=0)
  shapes = {f"view_{i}": (32, 32, 3) if i < 2 else (16, 16, 3) for i in range(6)}
  assert loader.view_shapes == shapes and loader.image_shape == (32, 32, 3)
  batch = next(loader)
  assert set(batch) == {*shapes, "label"}
  for key, shape in shapes.items():
    assert batch[key].shape == (8, *shape) and np.isfinite(batch[key]).all()


def test_a_view_does_not_depend_on_the_other_views(config):
  config.views = (SIMCLR, DINO_LOCAL)
  first = take(config, 1)[0]
  config.views = (SIMCLR, DINO_GLOBAL, DINO_LOCAL)
  second = take(config, 1)[0]
  np.testing.assert_array_equal(first["view_0"], second["view_0"])
  np.testing.assert_array_equal(first["label"], second["label"])


def test_per_example_normalize_equals_the_batch_level_one(config):
  config.views = (SIMCLR, DINO_LOCAL)
  batch_level = take(config, 1)[0]
  config.views = (SIMCLR + "|normalize", DINO_LOCAL + "|normalize(mean=(0.5, 0.5, 0.5))")
  per_example = take(config, 1)[0]
  assert_same_batches([per_example], [batch_level])


def test_resume_with_views_and_workers_is_exact(config):
  config.views = (DINO_GLOBAL,) * 2 + (DINO_LOCAL,) * 2
  reference = take(config, 8)  # crosses the epoch end (40 examples = 5 batches)
  state = {"next_batch": 3, "seed": 0, "global_batch_size": 8, "num_examples": 40}
  assert_same_batches(take(config, 5, state=state), reference[3:])
  config.num_workers = 2
  assert_same_batches(take(config, 5, state=state), reference[3:])


@pytest.mark.parametrize("views,match", [
    ([], r"config\.data\.views=\(\) is invalid; expected None or a non-empty list"),
    ((SIMCLR, 3), r"config\.data\.views=.* is invalid; expected None or a non-empty list"),
    ((SIMCLR, "hflip|color_jitter"), r"config\.data\.views\[1\]='hflip\|color_jitter' has no crop"),
    ((DINO_LOCAL, SIMCLR), r"config\.data\.views\[0\]=.* makes 16x16 images but "
                           r"config\.data\.image_size=32"),
    ((SIMCLR, "random_resized_crop(16)|jitter"),
     r"config\.data\.views\[1\]=.* is invalid: augmentation op 'jitter': unknown op 'jitter'"),
    ((SIMCLR, "random_resized_crop(16)|normalize(mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))"),
     r"config\.data\.views\[1\]=.* turns a 1-channel image into shape \(16, 16, 3\)"),
])
def test_validate_names_the_bad_view(config, views, match):
  # One channel, so that a spec made for RGB fails.
  config.channels, config.mean, config.std = 1, (0.5,), (0.25,)
  config.views = views
  with pytest.raises(ValueError, match=match):
    pipeline.validate_data_config(config)


def test_views_and_augmentation_are_exclusive(config):
  config.views = (SIMCLR, SIMCLR)
  config.augmentation = SIMCLR
  with pytest.raises(ValueError, match="augmentation and config.data.views are both set"):
    pipeline.make_train_loader(config, global_batch_size=8, seed=0)
