"""The masking selector (`sslx.mask_policy`) in MAE, SimMIM and BEiT: every strategy through one jitted loss
call, whose loss is the loss of a mask drawn here (by `sslx.masking`, or from the encoder's own attention) with
the count and shape the strategy promises; MAE's restore order; progressive counts in-graph; bad masking keys
named before anything compiles."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import contrastive_helpers as helpers
from sslx import checks
from sslx import losses
from sslx import mask_policy
from sslx import masking
from sslx import methods
from sslx.methods import RunLength
from sslx.methods import beit
from sslx.models import attention_weights
from sslx.models.patches import patchify

BATCH, SIZE, PATCH, VOCAB = 4, 32, 4, 16
GRID = SIZE // PATCH  # 8 x 8 patches
L = GRID * GRID
CONFIGS = {"mae": "mae_fashion_mnist", "simmim": "simmim_fashion_mnist", "beit": "beit_fashion_mnist"}
# One block of width 32, no drop path, 32 px grey images; BEiT reads random token ids from the batch.
TINY = {"model.width": 32, "model.num_heads": 2, "model.mlp_dim": 64, "model.drop_path_rate": 0.0,
        "model.dtype": "float32", "data.image_size": SIZE}
METHOD_TINY = {"mae": {"method.decoder.width": 32, "method.decoder.num_heads": 2, "method.decoder.mlp_dim": 64},
               "simmim": {},
               "beit": {"method.token_ids_key": "token_ids", "method.vocab_size": VOCAB}}
# Each strategy's keys and masked count per image on the 8 x 8 grid: random 64 - int(64 * 0.4) for MAE (the
# reference's rule), round(64 * 0.6) otherwise; simmim ceil(16 * 0.6) cells of 2 x 2 patches; block and
# importance round(64 r); grid 3 of every 2 x 2 cell.
STRATEGIES = {
    "random": ({"method.mask_ratio": 0.6}, {"mae": 39, "simmim": 38, "beit": 38}),
    "simmim": ({"method.mask_ratio": 0.6, "method.mask_patch_size": 8}, 40),
    "block": ({"method.mask_ratio": 0.4}, 26),
    "grid": ({"method.grid_stride": 2}, 48),
    "importance": ({"method.mask_ratio": 0.5, "method.importance_random_share": 0.0}, 32),
}


def _config(name, **overrides):
  return helpers.tiny_config(CONFIGS[name], **{**TINY, **METHOD_TINY[name], **overrides})


@pytest.fixture(scope="module")
def fresh():
  """Per method, a freshly initialised tiny model's variables and state (the same for every strategy); a batch."""
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(BATCH, SIZE, SIZE, 1)).astype(np.float32),
           "token_ids": rng.integers(0, VOCAB, size=(BATCH, GRID, GRID)).astype(np.int32)}
  initialised = {}
  for name in CONFIGS:
    method = methods.build_method(_config(name), RunLength(10, 10))
    initialised[name] = nn.unbox(jax.jit(method.init)(jax.random.PRNGKey(0), {"image": batch["image"][:1]}))
  return initialised, batch


def _reference_mask(strategy, ratio, count, masking_rng, attention):
  """The mask the strategy promises, drawn without `sslx.mask_policy`: by `sslx.masking` from the loss's
  masking key, or (importance without a random share) the top ``count`` patches by mean attention."""
  if strategy == "random":
    return masking.random_mask(masking_rng, BATCH, L, ratio)
  if strategy == "simmim":
    return masking.simmim_mask(masking_rng, BATCH, GRID, 2, ratio)
  if strategy == "block":
    return masking.blockwise_mask(masking_rng, BATCH, GRID, count, min_block=5)  # round(16 * 64 / 196)
  if strategy == "grid":
    return masking.grid_mask(masking_rng, BATCH, GRID, 2)
  _, top = jax.lax.top_k(attention, count)
  return jnp.zeros((BATCH, L), bool).at[jnp.arange(BATCH)[:, None], top].set(True)


def _reference_loss(name, config, model, variables, batch, mask, count, dropout_rng):
  """The method's loss with ``mask``, from its model alone."""
  images, rngs = batch["image"], {"dropout": dropout_rng}
  if name == "mae":
    out = model.apply(variables, images, train=True, keep=mask_policy.token_dropping(mask, count), rngs=rngs)
    return losses.masked_reconstruction_loss(out["pred"], patchify(images, PATCH), mask.astype(jnp.float32),
                                             norm_pix=config.method.norm_pix_loss)
  if name == "simmim":
    pred = model.apply(variables, images, mask, train=True, rngs=rngs)
    return losses.masked_reconstruction_loss(pred, patchify(images, PATCH), mask, norm_pix=False, p=1)
  positions = beit.masked_positions(mask, count)
  logits = model.apply(variables, images, mask, positions, train=True, rngs=rngs)
  targets = jnp.take_along_axis(batch["token_ids"].reshape(BATCH, L), positions, axis=1)
  return beit.masked_token_loss(logits, targets)[0]


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_loss_uses_the_strategys_mask(fresh, name, strategy):
  """One jitted call of `loss_fn` beside the loss of the mask drawn here: they agree, and that mask has the
  promised count per image and shape (cells, a lattice, the most attended patches)."""
  keys, count = STRATEGIES[strategy]
  count = count[name] if isinstance(count, dict) else count
  config = _config(name, **{"method.mask_strategy": strategy, **keys})
  methods.validate_config(config)
  method = methods.build_method(config, RunLength(10, 10))
  model = methods.method_module(name).model_from_config(config)
  initialised, batch = fresh
  variables, state = initialised[name]
  rng = jax.random.PRNGKey(3)

  def losses_and_mask(variables, state, batch):
    loss = method.loss_fn(variables, state, batch, rng)[0]
    masking_rng, dropout_rng = jax.random.split(rng)
    encoder = {"params": variables["params"]["encoder"]}
    maps = attention_weights.cls_attention_maps(model.encoder, encoder, batch["image"])
    attention = jnp.mean(maps, axis=1).reshape(BATCH, L)
    if name == "mae" and strategy == "random":  # drawn inside the model from the 'masking' rng, as before
      out = model.apply(variables, batch["image"], train=True, rngs={"masking": masking_rng})
      mask = out["mask"] > 0
    else:
      mask = _reference_mask(strategy, config.method.mask_ratio, count, masking_rng, attention)
    reference = _reference_loss(name, config, model, variables, batch, mask, count, dropout_rng)
    return loss, reference, mask, attention

  loss, reference, mask, attention = jax.jit(losses_and_mask)(variables, state, batch)
  np.testing.assert_allclose(float(loss), float(reference), rtol=2e-5)
  mask = np.asarray(mask)
  assert list(mask.sum(axis=1)) == [count] * BATCH
  patches = mask.reshape(BATCH, GRID, GRID)
  if strategy == "simmim":  # whole 2 x 2 cells
    np.testing.assert_array_equal(patches, np.repeat(np.repeat(patches[:, ::2, ::2], 2, 1), 2, 2))
  if strategy == "grid":  # the visible patches: one per 2 x 2 cell, all at the same offset
    for visible in ~patches:
      rows, cols = np.nonzero(visible)
      assert len(rows) == 16 and len(set(rows % 2)) == 1 and len(set(cols % 2)) == 1
  if strategy == "importance":
    most_attended = np.argsort(-np.asarray(attention), axis=1)[:, :count]
    np.testing.assert_array_equal(np.sort(np.nonzero(mask)[1].reshape(BATCH, count)), np.sort(most_attended))


def test_token_dropping_restores_patch_order():
  """The decoder's unshuffle (visible tokens, then mask tokens, gathered by ids_restore) puts each patch back."""
  mask = np.asarray(masking.blockwise_mask(jax.random.PRNGKey(0), BATCH, GRID, 26, min_block=5))
  ids_keep, float_mask, ids_restore = mask_policy.token_dropping(jnp.asarray(mask), 26)
  assert ids_keep.shape == (BATCH, L - 26)
  patches = np.tile(np.arange(L), (BATCH, 1))
  for b in range(BATCH):
    np.testing.assert_array_equal(ids_keep[b], np.nonzero(~mask[b])[0])  # visible patches in patch order
    shuffled = np.concatenate([patches[b, np.asarray(ids_keep[b])], np.full(26, -1)])
    np.testing.assert_array_equal(shuffled[np.asarray(ids_restore[b])], np.where(mask[b], -1, patches[b]))
  np.testing.assert_array_equal(float_mask, mask.astype(np.float32))


@pytest.mark.parametrize("strategy, keys, counts", [
    ("random", {}, lambda r: np.ceil(64 * r - 0.5)),
    ("simmim", {"method.mask_patch_size": 8}, lambda r: 4 * np.ceil(16 * r)),
])
def test_progressive_ratio_counts_in_graph(strategy, keys, counts):
  """SimMIM's ``mask_ratio_end`` through one compilation: r_k = 0.2 + 0.6 min(k / 10, 1) (steps whose counts
  land away from a rounding boundary)."""
  config = _config("simmim", **{"method.mask_strategy": strategy, "method.mask_ratio": 0.2,
                                "method.mask_ratio_end": 0.8, **keys})
  policy = mask_policy.from_config(config, methods.default_config("simmim"))
  assert policy.num_masked is None
  draw = jax.jit(lambda step: mask_policy.mask_fn(policy, 10)(jax.random.PRNGKey(0), BATCH, step).sum(axis=1))
  for step in (1, 3, 7, 12):
    assert list(draw(jnp.int32(step))) == [counts(0.2 + 0.6 * min(step / 10, 1.0))] * BATCH, step
  assert draw._cache_size() == 1  # pylint: disable=protected-access


@pytest.mark.parametrize("name, overrides, message", [
    ("mae", {"method.mask_strategy": "blocks"}, r"config\.method\.mask_strategy='blocks' is not one of"),
    ("mae", {"method.mask_ratio_end": 0.9},
     r"config\.method\.mask_ratio_end=0\.9: dropping the masked tokens needs a static number of visible tokens"),
    ("mae", {"method.mask_strategy": "grid", "method.mask_ratio_end": 0.9},
     r"config\.method\.mask_ratio_end=0\.9: dropping the masked tokens"),
    ("mae", {"method.mask_strategy": "simmim", "method.mask_patch_size": 12},
     r"config\.method\.mask_patch_size=12 does not divide config\.data\.image_size=32"),
    ("mae", {"method.mask_strategy": "grid", "method.grid_stride": 3},
     r"config\.method\.grid_stride=3 does not divide the patch grid \(8x8"),
    ("mae", {"method.mask_strategy": "importance", "method.mask_ratio": 0.999},
     r"config\.method\.mask_ratio=0\.999 masks 64 of the 64 patches"),
    ("mae", {"method.mask_strategy": "block", "method.block_aspect": (2.0, 1.0)},
     r"config\.method\.block_aspect=\(2\.0, 1\.0\) must be a pair"),
    ("simmim", {"method.mask_strategy": "blocks"}, r"config\.method\.mask_strategy='blocks' is not one of"),
    ("simmim", {"method.mask_strategy": "block", "method.mask_ratio_end": 0.9},
     r"config\.method\.mask_ratio_end=0\.9: config\.method\.mask_strategy='block' masks a static count"),
    ("simmim", {"method.mask_strategy": "random", "method.mask_ratio_end": 0.999},
     r"config\.method\.mask_ratio_end=0\.999 masks 64 of the 64 patches"),
    ("simmim", {"method.mask_strategy": "grid", "method.grid_stride": 1},
     r"config\.method\.grid_stride=1 must be an int in \[2,"),
    ("simmim", {"method.mask_strategy": "importance", "method.importance_highest": None},
     r"config\.method\.importance_highest=None must be True or False"),
    ("beit", {"method.mask_strategy": "blocks"}, r"config\.method\.mask_strategy='blocks' is not one of"),
    ("beit", {"method.mask_ratio_end": 0.9},
     r"config\.method\.mask_ratio_end=0\.9: BEiT's head gathers a static number of masked positions"),
    ("beit", {"method.mask_strategy": "simmim", "method.mask_patch_size": 6},
     r"config\.method\.mask_patch_size=6 is not a multiple of the patch size 4"),
    ("beit", {"method.mask_strategy": "importance", "method.importance_random_share": 1.5},
     r"config\.method\.importance_random_share=1\.5 must be a number in \[0, 1\]"),
    ("beit", {"method.mask_strategy": "random", "method.mask_ratio": 0.001},
     r"config\.method\.mask_ratio=0\.001 masks 0 of the 64 patches"),
])
def test_bad_masking_keys_are_named_before_compiling(monkeypatch, name, overrides, message):
  config = _config(name, **overrides)

  def fail(*args, **kwargs):
    raise AssertionError("compiled before the bad key was reported")

  monkeypatch.setattr(jax, "jit", fail)
  with pytest.raises(checks.ConfigError, match=message):
    checks.validate_run_config(config)
  with pytest.raises(ValueError, match=message):
    methods.build_method(config)
