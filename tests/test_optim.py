import math

import jax.numpy as jnp
import ml_collections
import numpy as np

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
