import functools
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslx import masking


@pytest.mark.parametrize("num_patches,ratio", [(16, 0.75), (196, 0.75), (10, 0.33), (49, 0.6)])
def test_keeps_the_lowest_noise_patches(num_patches, ratio):
  noise = np.random.RandomState(num_patches).rand(3, num_patches).astype(np.float32)
  ids_keep, mask, ids_restore = jax.jit(masking.random_masking, static_argnums=1)(noise, ratio)
  len_keep = int(num_patches * (1 - ratio))
  assert ids_keep.shape == (3, len_keep)
  assert mask.shape == ids_restore.shape == (3, num_patches)
  np.testing.assert_array_equal(np.sum(mask, axis=1), num_patches - len_keep)
  for b in range(3):
    ids_shuffle = np.argsort(noise[b])
    np.testing.assert_array_equal(np.asarray(ids_keep[b]), ids_shuffle[:len_keep])
    expected_mask = np.ones(num_patches)
    expected_mask[ids_shuffle[:len_keep]] = 0
    np.testing.assert_array_equal(np.asarray(mask[b]), expected_mask)
    # ids_restore is the inverse permutation of the shuffle.
    np.testing.assert_array_equal(ids_shuffle[np.asarray(ids_restore[b])], np.arange(num_patches))


def test_uniform_noise():
  noise = masking.uniform_noise(jax.random.key(0), 4, 16)
  assert noise.shape == (4, 16) and noise.dtype == jnp.float32
  assert 0 <= float(noise.min()) and float(noise.max()) < 1
  assert not np.allclose(noise, masking.uniform_noise(jax.random.key(1), 4, 16))


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_rejects_ratio_outside_open_interval(ratio):
  with pytest.raises(ValueError, match="mask_ratio"):
    masking.random_masking(jnp.zeros((1, 16)), ratio)


def test_rejects_ratio_leaving_nothing_visible():
  with pytest.raises(ValueError, match="no visible patch"):
    masking.random_masking(jnp.zeros((1, 4)), 0.9)


def _jit_counting_traces(fn):
  """``jax.jit(fn)`` and a list that grows by one each time JAX traces (i.e. compiles) it."""
  traces = []

  def traced(*args):
    traces.append(None)
    return fn(*args)

  return jax.jit(traced), traces


def _ceil_exact(num, ratio, minus=Fraction(0)):
  """``ceil(num * ratio - minus)`` in exact rational arithmetic on the ratio's decimal spelling."""
  return math.ceil(num * Fraction(str(ratio)) - minus)


# ---------------------------------------------------------------------------------------------- SimMIM


def _simmim(key, ratio):
  return masking.simmim_mask(key, 3, (8, 12), 2, ratio)


def test_simmim_traced_ratio_counts_cells_and_compiles_once():
  simmim, traces = _jit_counting_traces(_simmim)
  for ratio in [0.1, 0.5, 0.6, 0.75, 0.9]:
    mask = simmim(jax.random.key(0), jnp.float32(ratio))
    assert mask.shape == (3, 96) and mask.dtype == jnp.bool_
    cells = np.asarray(mask).reshape(3, 4, 2, 6, 2)
    # Alignment: every 2x2 cell is all masked or all visible.
    assert (cells.min(axis=(2, 4)) == cells.max(axis=(2, 4))).all()
    np.testing.assert_array_equal(cells[:, :, 0, :, 0].sum(axis=(1, 2)), _ceil_exact(24, ratio))
  assert len(traces) == 1


@pytest.mark.parametrize("grid,mask_patch,ratio,expected", [((10, 10), 2, 0.6, 15), ((5, 5), 1, 0.28, 7)])
def test_simmim_count_survives_float_rounding(grid, mask_patch, ratio, expected):
  # The naive products overshoot: float32 25 * 0.6 > 15 and float64 25 * 0.28 > 7.
  assert math.ceil(np.float32(25) * np.float32(0.6)) == 16 and math.ceil(25 * 0.28) == 8
  patches_per_cell = mask_patch**2
  static = masking.simmim_mask(jax.random.key(0), 2, grid, mask_patch, ratio)
  traced = jax.jit(masking.simmim_mask, static_argnums=(1, 2, 3))(
      jax.random.key(0), 2, grid, mask_patch, jnp.float32(ratio))
  np.testing.assert_array_equal(static.sum(axis=1), expected * patches_per_cell)
  np.testing.assert_array_equal(traced, static)


def test_simmim_keys_vmap_and_uniform_cells():
  simmim = jax.jit(_simmim, static_argnums=1)
  a, b = simmim(jax.random.key(1), 0.5), simmim(jax.random.key(2), 0.5)
  np.testing.assert_array_equal(a, simmim(jax.random.key(1), 0.5))
  assert not np.array_equal(a, b) and not np.array_equal(a[0], a[1])
  keys = jax.random.split(jax.random.key(3), 200)
  many = np.asarray(jax.vmap(simmim, in_axes=(0, None))(keys, 0.5))
  np.testing.assert_array_equal(many[7], simmim(keys[7], 0.5))
  # Every cell is masked about half the time: the choice is not biased to some cells.
  frequency = many.reshape(600, 96).mean(axis=0)
  assert 0.4 < frequency.min() and frequency.max() < 0.6


@pytest.mark.parametrize("grid,mask_patch,ratio,match", [
    ((8, 9), 2, 0.5, "divisible"), (8, 0, 0.5, "mask_patch"), ((8, 8, 8), 2, 0.5, "grid"),
    (8, 2, 0.0, "mask_ratio"), (8, 2, 1.0, "mask_ratio"), (8, 2, -0.2, "mask_ratio")])
def test_simmim_rejects_bad_arguments(grid, mask_patch, ratio, match):
  with pytest.raises(ValueError, match=match):
    masking.simmim_mask(jax.random.key(0), 1, grid, mask_patch, ratio)


# ------------------------------------------------------------------------- random + progressive ratio


def test_random_mask_traced_ratio_counts_and_compiles_once():
  random_mask, traces = _jit_counting_traces(lambda key, ratio: masking.random_mask(key, 4, 49, ratio))
  for ratio in [0.05, 0.3, 0.5, 0.6, 0.75, 0.95]:
    mask = random_mask(jax.random.key(0), jnp.float32(ratio))
    assert mask.shape == (4, 49) and mask.dtype == jnp.bool_
    np.testing.assert_array_equal(mask.sum(axis=1), _ceil_exact(49, ratio, Fraction(1, 2)))
  assert len(traces) == 1
  # Halves round down, static or traced.
  assert int(masking.random_mask(jax.random.key(0), 1, 10, 0.35).sum()) == 3
  assert int(random_mask(jax.random.key(0), jnp.float32(2 / 49 + 0.5 / 49)).sum(axis=1)[0]) == 2


def test_random_mask_keys():
  a = masking.random_mask(jax.random.key(0), 2, 16, 0.5)
  np.testing.assert_array_equal(a, masking.random_mask(jax.random.key(0), 2, 16, 0.5))
  assert not np.array_equal(a, masking.random_mask(jax.random.key(1), 2, 16, 0.5))
  assert not np.array_equal(a[0], a[1])


def test_progressive_ratio_drives_one_compiled_step():
  np.testing.assert_allclose(
      masking.progressive_mask_ratio(jnp.array([-5, 0, 25, 50, 100, 150]), 100, 0.4, 0.8),
      [0.4, 0.4, 0.5, 0.6, 0.8, 0.8], rtol=1e-6)

  def masked_count(step, key):
    ratio = masking.progressive_mask_ratio(step, 100, 0.25, 0.75)
    return masking.simmim_mask(key, 1, 8, 2, ratio).sum() // 4

  step_fn, traces = _jit_counting_traces(masked_count)
  counts = [int(step_fn(jnp.int32(step), jax.random.key(step))) for step in (0, 50, 100)]
  assert counts == [4, 8, 12] and len(traces) == 1


@pytest.mark.parametrize("call,match", [
    (lambda: masking.progressive_mask_ratio(0, 0, 0.2, 0.8), "total_steps"),
    (lambda: masking.progressive_mask_ratio(0, 10, 0.2, 1.2), "end"),
    (lambda: masking.random_mask(jax.random.key(0), 1, 10, 1.0), "mask_ratio"),
    (lambda: masking.random_mask(jax.random.key(0), 1, 10, 0.04), "masks none"),
    (lambda: masking.random_mask(jax.random.key(0), 1, 0, 0.5), "num_patches")])
def test_random_and_progressive_reject_bad_arguments(call, match):
  with pytest.raises(ValueError, match=match):
    call()


# ------------------------------------------------------------------------------------------------ grid


@pytest.mark.parametrize("stride", [2, 3])
def test_grid_mask_fixed_lattice(stride):
  mask = masking.grid_mask(None, 2, (6, 12), stride)
  assert mask.shape == (2, 72) and mask.dtype == jnp.bool_
  # 1 - 1 / stride**2 of the 72 patches.
  np.testing.assert_array_equal(mask.sum(axis=1), 72 - 72 // stride**2)
  visible = ~np.asarray(mask[0]).reshape(6, 12)
  rows, cols = np.nonzero(visible)
  assert (rows % stride == 0).all() and (cols % stride == 0).all()


def test_grid_mask_random_offsets_form_shifted_lattices():
  grid_mask = jax.jit(masking.grid_mask, static_argnums=(1, 2, 3))
  mask = np.asarray(grid_mask(jax.random.key(0), 64, (6, 9), 3))
  np.testing.assert_array_equal(mask, grid_mask(jax.random.key(0), 64, (6, 9), 3))
  assert not np.array_equal(mask, grid_mask(jax.random.key(1), 64, (6, 9), 3))
  offsets = set()
  for image in mask:
    rows, cols = np.nonzero(~image.reshape(6, 9))
    offset = (rows[0] % 3, cols[0] % 3)
    expected = np.zeros((6, 9), bool)
    expected[offset[0]::3, offset[1]::3] = True
    np.testing.assert_array_equal(~image.reshape(6, 9), expected)
    offsets.add(offset)
  assert len(offsets) == 9


@pytest.mark.parametrize("grid,stride,match", [((6, 7), 2, "divisible"), (6, 1, "stride"), (0, 2, "grid")])
def test_grid_mask_rejects_bad_arguments(grid, stride, match):
  with pytest.raises(ValueError, match=match):
    masking.grid_mask(None, 1, grid, stride)


# ------------------------------------------------------------------------------------------ importance


def _tied_scores():
  # Integer scores in a small range: many ties, which must break by patch index.
  return np.random.RandomState(0).randint(0, 5, (4, 20)).astype(np.float32)


@pytest.mark.parametrize("highest", [True, False])
def test_importance_without_random_share_is_top_k(highest):
  scores = _tied_scores()
  mask = masking.importance_mask(jax.random.key(0), jnp.asarray(scores), 7, highest=highest)
  assert mask.shape == (4, 20) and mask.dtype == jnp.bool_
  order = np.argsort(-scores if highest else scores, axis=1, kind="stable")
  expected = np.zeros((4, 20), bool)
  np.put_along_axis(expected, order[:, :7], True, axis=1)
  np.testing.assert_array_equal(mask, expected)
  np.testing.assert_array_equal(mask, masking.importance_mask(jax.random.key(9), jnp.asarray(scores), 7,
                                                              highest=highest))


def test_importance_random_share_keeps_the_top_and_varies_the_rest():
  scores = _tied_scores()
  importance = jax.jit(functools.partial(masking.importance_mask, num_masked=8, random_share=0.5))
  top = np.zeros((4, 20), bool)
  np.put_along_axis(top, np.argsort(-scores, axis=1, kind="stable")[:, :4], True, axis=1)
  masks = np.stack([importance(jax.random.key(seed), jnp.asarray(scores)) for seed in range(5)])
  np.testing.assert_array_equal(masks.sum(axis=2), 8)
  assert (masks >= top).all()
  assert len({m.tobytes() for m in masks}) == 5
  np.testing.assert_array_equal(masks[0], importance(jax.random.key(0), jnp.asarray(scores)))


@pytest.mark.parametrize("scores,num_masked,share,match", [
    (np.zeros((2, 10)), 0, 0.0, "num_masked"), (np.zeros((2, 10)), 11, 0.0, "num_masked"),
    (np.zeros((2, 10)), 3, 1.5, "random_share"), (np.zeros(10), 3, 0.0, "scores")])
def test_importance_rejects_bad_arguments(scores, num_masked, share, match):
  with pytest.raises(ValueError, match=match):
    masking.importance_mask(jax.random.key(0), jnp.asarray(scores), num_masked, random_share=share)


# ------------------------------------------------------------------------------------------ block-wise


def test_sample_block_rounds_its_draws_and_spreads_them_evenly():
  keys = jax.random.split(jax.random.key(0), 4000)
  block = jax.jit(jax.vmap(lambda key: masking.sample_block(key, (14, 14), 16, 75, (0.3, 1 / 0.3))))(keys)
  top, left, height, width, area, aspect = (np.asarray(x, np.float64) for x in block)
  assert 16 <= area.min() and area.max() <= 75
  assert 0.3 - 1e-6 <= aspect.min() and aspect.max() <= 1 / 0.3 + 1e-6
  # Sides are the rounded square roots, so the block's area is within rounding of the drawn one.
  exact_height, exact_width = np.sqrt(area * aspect), np.sqrt(area / aspect)
  assert np.abs(height - exact_height).max() <= 0.5 + 1e-4
  assert np.abs(width - exact_width).max() <= 0.5 + 1e-4
  assert (np.abs(height * width - area) <= 0.5 * (exact_height + exact_width) + 0.25 + 1e-3).all()
  # The placement of fitting blocks spans the whole grid, both ends included.
  fits = (height < 14) & (width < 14)
  assert 0.5 < fits.mean() < 1
  assert top[fits].min() == 0 and (top + height)[fits].max() == 14
  assert left[fits].min() == 0 and (left + width)[fits].max() == 14
  assert ((top + height <= 14) & (left + width <= 14))[fits].all()
  # log(aspect) and area are uniform: 5 bins of 800 expected draws each (standard deviation about 25).
  for values, low, high in [(np.log(aspect), np.log(0.3), -np.log(0.3)), (area, 16, 75)]:
    counts, _ = np.histogram(values, bins=5, range=(low, high))
    assert np.abs(counts - 800).max() < 120, counts


@pytest.mark.parametrize("grid,aspect,shape", [(9, 4.0, (8, 2)), (8, 4.0, None), (5, 1.0, (4, 4)),
                                               (4, 1.0, None)])
def test_place_blocks_places_one_exact_block_only_where_it_fits_strictly(grid, aspect, shape):
  # min_block = num_masked = 16 makes the drawn area exactly 16: one block of fixed shape, or none
  # where a side would reach the grid's (the reference accepts only sides strictly below it).
  place = jax.jit(jax.vmap(lambda key: masking.place_blocks(
      key, grid, 16, min_block=16, aspect=(aspect, aspect)).reshape(grid, grid)))
  masks = np.asarray(place(jax.random.split(jax.random.key(0), 100)))
  if shape is None:
    assert not masks.any()
    return
  tops, lefts = set(), set()
  for mask in masks:
    rows, cols = np.nonzero(mask)
    expected = np.zeros_like(mask)
    expected[rows.min():rows.min() + shape[0], cols.min():cols.min() + shape[1]] = True
    np.testing.assert_array_equal(mask, expected)
    tops.add(rows.min())
    lefts.add(cols.min())
  assert tops == set(range(grid - shape[0] + 1)) and lefts == set(range(grid - shape[1] + 1))


def _reference_blocks(rng, height, width, num_masked, min_block, aspect):
  """BEiT's MaskingGenerator, restated in numpy (an independent reference for the statistics below)."""
  mask = np.zeros((height, width), bool)
  while mask.sum() < num_masked:
    max_new = num_masked - mask.sum()
    for _ in range(10):
      area = rng.uniform(min_block, max_new)
      ratio = np.exp(rng.uniform(np.log(aspect[0]), np.log(aspect[1])))
      h, w = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
      if h < height and w < width:
        top, left = rng.randint(0, height - h + 1), rng.randint(0, width - w + 1)
        new = h * w - mask[top:top + h, left:left + w].sum()
        if 0 < new <= max_new:
          mask[top:top + h, left:left + w] = True
          break
    else:
      break
  return mask


def _boundary_length(masks):
  """Per mask, the number of neighbouring patch pairs of which exactly one is masked."""
  return ((masks[:, 1:] != masks[:, :-1]).sum(axis=(1, 2)) + (masks[:, :, 1:] != masks[:, :, :-1]).sum(axis=(1, 2)))


def test_place_blocks_matches_the_reference_statistics():
  place = jax.jit(jax.vmap(lambda key: masking.place_blocks(key, 14, 75).reshape(14, 14)))
  masks = np.asarray(place(jax.random.split(jax.random.key(0), 1000)))
  rng = np.random.RandomState(0)
  reference = np.stack([_reference_blocks(rng, 14, 14, 75, 16, (0.3, 1 / 0.3)) for _ in range(2000)])
  counts, reference_counts = masks.sum(axis=(1, 2)), reference.sum(axis=(1, 2))
  assert counts.max() == 75
  # The reference reaches 75 for about two thirds of the images and averages about 74.5.
  assert abs(counts.mean() - reference_counts.mean()) < 0.3 and counts.mean() > 74
  assert abs((counts == 75).mean() - (reference_counts == 75).mean()) < 0.06
  # Same shapes: a few compact rectangles have a short boundary (random 75 of 196 patches: about 170).
  boundary, reference_boundary = _boundary_length(masks).mean(), _boundary_length(reference).mean()
  assert abs(boundary / reference_boundary - 1) < 0.08 and boundary < 85


def test_blockwise_mask_exact_count_keys_and_vmap():
  blockwise = jax.jit(masking.blockwise_mask, static_argnums=(1, 2, 3))
  mask = blockwise(jax.random.key(0), 8, (14, 14), 75)
  assert mask.shape == (8, 196) and mask.dtype == jnp.bool_
  np.testing.assert_array_equal(mask.sum(axis=1), 75)
  np.testing.assert_array_equal(mask, blockwise(jax.random.key(0), 8, (14, 14), 75))
  assert not np.array_equal(mask, blockwise(jax.random.key(1), 8, (14, 14), 75))
  keys = jax.random.split(jax.random.key(0), 3)
  # With a single attempt per block, nearly every image stops short of 20 and is topped up.
  stacked = jax.vmap(lambda key: masking.blockwise_mask(key, 2, (5, 5), 20, min_block=4, max_attempts=1))(keys)
  np.testing.assert_array_equal(stacked.sum(axis=2), 20)


def test_top_up_takes_neighbours_of_the_blocks_first():
  block = np.zeros((2, 5, 5), bool)
  block[:, :2, :2] = True
  neighbours = np.zeros((5, 5), bool)
  neighbours[[0, 1, 2, 2], [2, 2, 0, 1]] = True
  top_up = jax.jit(masking.top_up_mask, static_argnums=(2, 3))
  for num_masked, added_neighbours in [(6, 2), (10, 4)]:
    masks = np.asarray(top_up(jax.random.key(num_masked), jnp.asarray(block.reshape(2, 25)), (5, 5), num_masked))
    added = masks.reshape(2, 5, 5) & ~block
    np.testing.assert_array_equal(masks.sum(axis=1), num_masked)
    np.testing.assert_array_equal((added & neighbours).sum(axis=(1, 2)), added_neighbours)
  np.testing.assert_array_equal(top_up(jax.random.key(0), jnp.asarray(block.reshape(2, 25)), (5, 5), 4),
                                block.reshape(2, 25))


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_masked=0), "num_masked"), (dict(num_masked=197), "num_masked"),
    (dict(num_masked=10), "min_block"), (dict(max_block=8), "max_block"),
    (dict(aspect=(0.0, 2.0)), "aspect"), (dict(aspect=(3.0, 2.0)), "aspect"),
    (dict(max_attempts=0), "max_attempts"), (dict(grid=(14, -1)), "grid")])
def test_blockwise_rejects_bad_arguments(kwargs, match):
  arguments = dict(grid=(14, 14), num_masked=75) | kwargs
  with pytest.raises(ValueError, match=match):
    masking.blockwise_mask(jax.random.key(0), 1, **arguments)
