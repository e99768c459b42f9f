import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from sslx import optim


def _config(**overrides):
  config = ml_collections.ConfigDict(dict(
      batch_size=512,
      optimizer=dict(base_lr=1.5e-4, lr_batch_base=256),
      schedule=dict(warmup_epochs=2.0, min_lr=1e-6)))
  config.update(overrides)
  return config


def test_schedule_matches_mae_formula():
  config = _config()
  steps_per_epoch, total = 10, 100
  schedule = optim.learning_rate_schedule(config, steps_per_epoch=steps_per_epoch, total_steps=total)
  peak, warmup = 1.5e-4 * 512 / 256, 20
  for step in (0, 5, 19, 20, 21, 60, 99):
    if step < warmup:
      expected = peak * step / warmup
    else:
      progress = (step - warmup) / (total - warmup)
      expected = 1e-6 + (peak - 1e-6) * 0.5 * (1 + math.cos(math.pi * progress))
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5, atol=1e-12)


def test_weight_decay_mask_skips_biases_norms_tokens_and_position_tables():
  params = {
      "cls_token": jnp.zeros((1, 1, 8)),
      "mask_token": jnp.zeros((1, 1, 8)),
      "pos_embed": jnp.zeros((1, 5, 8)),
      "block_0": {"attn": {"kernel": jnp.zeros((8, 3, 2, 4)), "bias": jnp.zeros((3, 2, 4))},
                  "norm": {"scale": jnp.zeros((8,)), "bias": jnp.zeros((8,))}},
      "patch_embed": {"kernel": jnp.zeros((4, 4, 1, 8)), "bias": jnp.zeros((8,))},
  }
  mask = optim.weight_decay_mask(params)
  assert mask["block_0"]["attn"]["kernel"] and mask["patch_embed"]["kernel"]
  assert not any([mask["cls_token"], mask["mask_token"], mask["pos_embed"], mask["block_0"]["attn"]["bias"],
                  mask["block_0"]["norm"]["scale"], mask["block_0"]["norm"]["bias"], mask["patch_embed"]["bias"]])


def test_weight_decay_applies_only_where_masked():
  config = _config(optimizer=dict(name="adamw", base_lr=0.0, lr_batch_base=256, b1=0.9, b2=0.95,
                                  weight_decay=0.1, grad_clip_norm=None))
  schedule = lambda step: 1.0
  tx = optim.build_optimizer(config, schedule)
  params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
  zero_grads = {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros((2,))}
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  np.testing.assert_allclose(updates["kernel"], -0.1 * np.ones((2, 2)))  # -lr * wd * param
  np.testing.assert_allclose(updates["bias"], np.zeros(2))


def _vit_like_params(rng):
  """Two blocks: the layer ids are 0 (patch_embed, cls_token), 1 and 2 (blocks), 3 (final norm, head)."""
  shapes = {
      "encoder": {
          "patch_embed": {"kernel": (2, 2, 1, 4), "bias": (4,)},
          "cls_token": (1, 1, 4),
          "block_0": {"attn": {"qkv": {"kernel": (4, 12), "bias": (12,)}}, "norm1": {"scale": (4,), "bias": (4,)}},
          "block_1": {"mlp": {"fc1": {"kernel": (4, 8), "bias": (8,)}}},
          "norm": {"scale": (4,), "bias": (4,)},
      },
      "head": {"fc_norm": {"scale": (4,)}, "logits": {"kernel": (4, 3), "bias": (3,)}},
  }
  return jax.tree.map(lambda shape: rng.normal(size=shape).astype(np.float32), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))


def test_layer_decay_step_is_adamw_with_a_per_layer_learning_rate():
  decay, wd, b1, b2, eps = 0.65, 0.05, 0.9, 0.999, 1e-8
  config = _config(optimizer=dict(name="adamw", base_lr=0.0, lr_batch_base=256, b1=b1, b2=b2, weight_decay=wd,
                                  grad_clip_norm=None, layer_decay=decay))
  schedule = lambda count: 0.01 * (count + 1)
  tx = optim.build_optimizer(config, schedule)
  rng = np.random.default_rng(0)
  params = _vit_like_params(rng)
  grads = [_vit_like_params(rng) for _ in range(3)]
  # A leaf's layer and whether it decays, written out by hand rather than derived with the code under test.
  layer_of = {"patch_embed": 0, "cls_token": 0, "block_0": 1, "block_1": 2, "norm": 3, "fc_norm": 3, "logits": 3}

  def reference(path, param, *leaf_grads):
    names = [key.key for key in path]
    multiplier = decay ** (3 - layer_of[names[1]])
    decays = names[-1] == "kernel"
    p, m, v = param.astype(np.float64), 0.0, 0.0
    for t, g in enumerate(leaf_grads, start=1):
      m = b1 * m + (1 - b1) * g
      v = b2 * v + (1 - b2) * g**2
      adam = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
      p = p - schedule(t - 1) * multiplier * (adam + wd * decays * p)
    return p

  expected = jax.tree_util.tree_map_with_path(reference, params, *grads)
  state, current = tx.init(params), jax.tree.map(jnp.asarray, params)
  for g in grads:
    updates, state = tx.update(g, state, current)
    current = optax.apply_updates(current, updates)
  jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6), current, expected)
  # The lowest layer really moved less than the head: the multiplier is not a no-op.
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).mean()), current, params)
  assert moved["encoder"]["cls_token"] < 0.5 * moved["head"]["logits"]["kernel"]


def test_without_layer_decay_the_optimizer_state_is_plain_adamw():
  config = _config(optimizer=dict(name="adamw", base_lr=1.0, lr_batch_base=256, b1=0.9, b2=0.95,
                                  weight_decay=0.05, grad_clip_norm=None, layer_decay=None))
  params = _vit_like_params(np.random.default_rng(0))
  # Checkpoints of runs without layer decay hold exactly this state; it must keep restoring into them.
  schedule = lambda count: 1.0
  plain = optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.05, mask=optim.weight_decay_mask)
  assert jax.tree.structure(optim.build_optimizer(config, schedule).init(params)) == \
      jax.tree.structure(plain.init(params))


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5])
def test_bad_layer_decay_names_the_key(bad):
  config = _config(optimizer=dict(name="adamw", base_lr=1.0, lr_batch_base=256, b1=0.9, b2=0.95,
                                  weight_decay=0.05, grad_clip_norm=None, layer_decay=bad))
  with pytest.raises(ValueError, match="config.optimizer.layer_decay"):
    optim.build_optimizer(config, lambda c: 1.0)
