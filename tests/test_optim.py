"""sslx.optim against independent references: numpy AdamW / LARS loops, torch.optim.SGD, the MAE formula."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import linen as nn

from sslx import optim

STEPS_PER_EPOCH, TOTAL = 2, 4
PEAK, MIN_LR = 0.1, 0.01  # with _config's base_lr and batch sizes


def _config(schedule=None, **optimizer):
  """Only the keys a test sets; build_optimizer reads the others' defaults, as for an old config.json."""
  return ml_collections.ConfigDict(dict(
      batch_size=512, optimizer=dict(dict(base_lr=0.05, lr_batch_base=256), **optimizer),
      schedule=schedule or dict(warmup_epochs=0.0, min_lr=MIN_LR)))


def _mae_lr(step, *, peak=PEAK, warmup=0, total=TOTAL, min_lr=MIN_LR):
  """MAE's `adjust_learning_rate` (main_pretrain.py) per step."""
  if step < warmup:
    return peak * step / warmup
  return min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def _tiny_params(rng):
  """Kernels, biases, a LayerNorm scale and the tokens, as the sslx ViT and MAE decoder name them."""
  shapes = {
      "encoder": {"cls_token": (1, 1, 4), "patch_embed": {"kernel": (2, 2, 1, 4), "bias": (4,)},
                  "block_0": {"norm1": {"scale": (4,), "bias": (4,)},
                              "mlp": {"fc1": {"kernel": (4, 6), "bias": (6,)}}}},
      "decoder": {"mask_token": (1, 1, 4)},
      "head": {"kernel": (4, 3), "bias": (3,)},
  }
  return jax.tree.map(lambda shape: rng.normal(size=shape).astype(np.float32), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))


def _params_and_grads(seed=0, steps=3, make=_tiny_params):
  rng = np.random.default_rng(seed)
  return make(rng), [make(rng) for _ in range(steps)]


def _names(path):
  return [key.key for key in path]


def _run(tx, params, grads):
  """Applies ``tx`` once per gradient (jitted, as the training loop does); returns params, state, updates."""
  update = jax.jit(tx.update)
  state, current, all_updates = tx.init(params), jax.tree.map(jnp.asarray, params), []
  for g in grads:
    updates, state = update(g, state, current)
    current = optax.apply_updates(current, updates)
    all_updates.append(updates)
  return current, state, all_updates


def _build(config, steps_per_epoch=STEPS_PER_EPOCH, total_steps=TOTAL):
  return optim.build_optimizer(config, steps_per_epoch=steps_per_epoch, total_steps=total_steps)


def _assert_trees_close(got, want, **tolerance):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, **tolerance), got, want)


def test_square_root_scaling_of_the_learning_rate():
  """SimCLR's alternative to the linear rule: 0.075 sqrt(batch) with lr_batch_base 1."""
  config = _config(base_lr=0.075, lr_batch_base=1, lr_scaling="sqrt")
  schedule = optim.learning_rate_schedule(config, steps_per_epoch=10, total_steps=100)
  assert float(schedule(0)) == pytest.approx(0.075 * math.sqrt(512))


def test_schedule_matches_mae_formula():
  config = _config(schedule=dict(warmup_epochs=2.0, min_lr=1e-6), base_lr=1.5e-4)
  steps_per_epoch, total = 10, 100
  schedule = optim.learning_rate_schedule(config, steps_per_epoch=steps_per_epoch, total_steps=total)
  for step in (0, 5, 19, 20, 21, 60, 99):
    expected = _mae_lr(step, peak=1.5e-4 * 512 / 256, warmup=20, total=total, min_lr=1e-6)
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5, atol=1e-12)
  _, schedules = _build(config, steps_per_epoch, total)
  assert float(schedules["lr"](60)) == float(schedule(60))


def test_weight_decay_schedule_is_constant_or_a_half_cosine():
  wd, end, total = 0.04, 0.4, 100
  _, constant = _build(_config(weight_decay=wd), total_steps=total)
  _, cosine = _build(_config(weight_decay=wd, weight_decay_end=end), total_steps=total)
  for step in (0, 50, 99, 100):
    np.testing.assert_allclose(float(constant["weight_decay"](step)), wd, rtol=1e-6)
    expected = end + (wd - end) * 0.5 * (1 + math.cos(math.pi * step / total))
    np.testing.assert_allclose(float(cosine["weight_decay"](step)), expected, rtol=1e-5)
  np.testing.assert_allclose(float(cosine["weight_decay"](50)), (wd + end) / 2, rtol=1e-5)


def test_adamw_matches_numpy_with_weight_decay_multipliers_and_schedule():
  b1, b2, eps, wd, wd_end = 0.9, 0.95, 1e-8, 0.04, 0.4
  rules = (("head/kernel", 2.0), (".*/kernel$", 1.0), (".*_token", 0.5))
  tx, _ = _build(_config(name="adamw", b1=b1, b2=b2, weight_decay=wd, weight_decay_end=wd_end,
                         wd_mults=rules))
  params, grads = _params_and_grads()
  # Written out by hand, not derived with the code under test.
  multiplier = {"head/kernel": 2.0, "encoder/patch_embed/kernel": 1.0, "encoder/block_0/mlp/fc1/kernel": 1.0,
                "encoder/cls_token": 0.5, "decoder/mask_token": 0.5}

  def reference(path, param, *leaf_grads):
    mult = multiplier.get("/".join(_names(path)), 0.0)
    p, m, v = param.astype(np.float64), 0.0, 0.0
    for t, g in enumerate(leaf_grads):
      m = b1 * m + (1 - b1) * g
      v = b2 * v + (1 - b2) * g**2
      adam = (m / (1 - b1**(t + 1))) / (np.sqrt(v / (1 - b2**(t + 1))) + eps)
      wd_t = wd_end + (wd - wd_end) * 0.5 * (1 + math.cos(math.pi * t / TOTAL))
      p = p - _mae_lr(t) * (adam + wd_t * mult * p)
    return p

  got, _, _ = _run(tx, params, grads)
  _assert_trees_close(got, jax.tree_util.tree_map_with_path(reference, params, *grads), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_leaves_undecayed_parameters_out_of_decay_and_trust_ratio(nesterov):
  wd, momentum, eta = 1e-2, 0.9, 0.001
  tx, _ = _build(_config(name="lars", weight_decay=wd, momentum=momentum, nesterov=nesterov,
                         lars_trust_coefficient=eta))
  params, grads = _params_and_grads()

  def reference(path, param, *leaf_grads):
    adapted = _names(path)[-1] == "kernel"  # the default rule: kernels decay, nothing else
    p, v = param.astype(np.float64), 0.0
    for t, g in enumerate(leaf_grads):
      if adapted:
        g = g + wd * p
        g = eta * np.linalg.norm(p) / np.linalg.norm(g) * g
      u = _mae_lr(t) * g
      v = momentum * v + u
      p = p - (u + momentum * v if nesterov else v)
    return p

  got, _, _ = _run(tx, params, grads)
  _assert_trees_close(got, jax.tree_util.tree_map_with_path(reference, params, *grads), rtol=2e-5, atol=1e-7)
  # The trust ratio (~1e-3) shrinks kernel steps far below a bias's: it really is on, and off for biases.
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).mean()), got, params)
  assert moved["head"]["kernel"] < 0.01 * moved["head"]["bias"]


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_torch(nesterov):
  torch = pytest.importorskip("torch")
  wd, momentum = 0.05, 0.9
  rules = (("head/kernel", 2.0), (".*/kernel$", 1.0))
  tx, _ = _build(_config(name="sgd", weight_decay=wd, momentum=momentum, nesterov=nesterov, wd_mults=rules))
  params, grads = _params_and_grads()
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  tensors = [torch.tensor(np.asarray(leaf, np.float64), requires_grad=True) for _, leaf in leaves]
  decay = [wd * (2.0 if _names(path) == ["head", "kernel"] else float(_names(path)[-1] == "kernel"))
           for path, _ in leaves]
  groups = [dict(params=[x], weight_decay=d) for x, d in zip(tensors, decay, strict=True)]
  sgd = torch.optim.SGD(groups, lr=0.0, momentum=momentum, nesterov=nesterov)
  for t, g in enumerate(grads):
    for group in sgd.param_groups:
      group["lr"] = _mae_lr(t)
    for x, leaf in zip(tensors, jax.tree.leaves(g), strict=True):
      x.grad = torch.tensor(np.asarray(leaf, np.float64))
    sgd.step()
  got, _, _ = _run(tx, params, grads)
  want = jax.tree_util.tree_unflatten(treedef, [x.detach().numpy() for x in tensors])
  _assert_trees_close(got, want, rtol=2e-5, atol=1e-6)


def _element_counts(tree):
  return sum(np.size(leaf) for leaf in jax.tree.leaves(tree) if np.ndim(leaf) > 0)


def test_frozen_subtree_is_bit_identical_and_has_no_optimizer_state():
  tx, _ = _build(_config(name="adamw", frozen=("encoder/.*",), grad_clip_norm=1.0))
  params, grads = _params_and_grads()
  got, state, _ = _run(tx, params, grads)
  jax.tree.map(np.testing.assert_array_equal, got["encoder"], params["encoder"])
  assert not np.allclose(got["head"]["kernel"], params["head"]["kernel"])
  paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(state)]
  assert not any("'encoder'" in path for path in paths)
  trainable = _element_counts({"head": params["head"], "decoder": params["decoder"]})
  assert _element_counts(state) == 2 * trainable  # Adam's two moments of the trainable leaves, nothing more


def test_gradient_clipping_ignores_frozen_gradients():
  tx, _ = _build(_config(name="sgd", frozen=("encoder/.*",), grad_clip_norm=1e3))
  params, grads = _params_and_grads(steps=1)
  huge = dict(grads[0], encoder=jax.tree.map(lambda g: 1e6 * g, grads[0]["encoder"]))
  _, _, (plain,) = _run(tx, params, grads)
  _, _, (with_huge,) = _run(tx, params, [huge])
  jax.tree.map(np.testing.assert_array_equal, with_huge, plain)


def test_boxed_init_gives_the_state_of_unboxed_params():
  # The training loop runs tx.init on nn.Partitioned params and tx.update on the unboxed ones.
  tx, _ = _build(_config(name="lars", frozen=("decoder/.*",), lr_mults=(("head/.*", 0.5),),
                         freeze_epochs=(("encoder/cls_token", 1.0),)))
  params, grads = _params_and_grads(steps=1)
  boxed = jax.tree.map(lambda x: nn.LogicallyPartitioned(x, names=(None,) * x.ndim), params)
  state = nn.unbox(tx.init(boxed))
  assert jax.tree.structure(state) == jax.tree.structure(tx.init(params))
  jax.jit(tx.update)(grads[0], state, jax.tree.map(jnp.asarray, params))


def _vit_like_params(rng):
  """Two blocks: the layer ids are 0 (patch_embed, cls_token), 1 and 2 (blocks), 3 (final norm, head)."""
  shapes = {
      "encoder": {
          "patch_embed": {"kernel": (2, 2, 1, 4), "bias": (4,)},
          "cls_token": (1, 1, 4),
          "block_0": {"attn": {"qkv": {"kernel": (4, 12), "bias": (12,)}},
                      "norm1": {"scale": (4,), "bias": (4,)}},
          "block_1": {"mlp": {"fc1": {"kernel": (4, 8), "bias": (8,)}}},
          "norm": {"scale": (4,), "bias": (4,)},
      },
      "head": {"fc_norm": {"scale": (4,)}, "logits": {"kernel": (4, 3), "bias": (3,)}},
  }
  return jax.tree.map(lambda shape: rng.normal(size=shape).astype(np.float32), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))


def test_lr_mults_scale_the_whole_update_and_compose_with_layer_decay():
  rules = (("head/.*", 0.5), (".*/bias", 3.0))  # the first match wins: head/logits/bias gets 0.5
  base = _config(name="adamw", weight_decay=0.3, layer_decay=0.65)
  scaled = _config(name="adamw", weight_decay=0.3, layer_decay=0.65, lr_mults=rules)
  # One step: later ones start from params that already differ, so their decay terms differ too.
  params, grads = _params_and_grads(steps=1, make=_vit_like_params)
  _, _, (base_update,) = _run(_build(base)[0], params, grads)
  _, _, (scaled_update,) = _run(_build(scaled)[0], params, grads)

  def expected(path, update):
    names = _names(path)
    return update * (0.5 if names[0] == "head" else 3.0 if names[-1] == "bias" else 1.0)

  want = jax.tree_util.tree_map_with_path(expected, base_update)
  _assert_trees_close(scaled_update, want, rtol=1e-6, atol=0)


def test_freeze_epochs_zero_updates_during_the_frozen_steps_then_not():
  # No weight decay, so the frozen head's momentum sees the same gradients as in an unfrozen run.
  rule = (("head/.*", 1.0),)
  frozen, _ = _build(_config(name="sgd", weight_decay=0.0, freeze_epochs=rule))
  free, _ = _build(_config(name="sgd", weight_decay=0.0))
  params, grads = _params_and_grads()
  _, _, frozen_updates = _run(frozen, params, grads)
  _, _, free_updates = _run(free, params, grads)
  for step, (got, want) in enumerate(zip(frozen_updates, free_updates, strict=True)):
    _assert_trees_close(got["encoder"], want["encoder"], rtol=1e-6, atol=0)
    if step < STEPS_PER_EPOCH:
      assert not any(np.any(leaf) for leaf in jax.tree.leaves(got["head"]))
    else:
      _assert_trees_close(got["head"], want["head"], rtol=1e-6, atol=0)
      assert all(np.all(leaf != 0) for leaf in jax.tree.leaves(got["head"]))


def _boxed_vit_names():
  """Parameter names of the sslx ViT encoder and MAE decoder (boxed, as ``Method.init`` returns them)."""
  shapes = {
      "encoder": {"patch_embed": {"kernel": (2, 2, 3, 4), "bias": (4,)}, "cls_token": (1, 1, 4),
                  "pos_embed": (5, 4),
                  "block_0": {"norm1": {"scale": (4,), "bias": (4,)},
                              "attn": {"qkv": {"kernel": (4, 12), "bias": (12,)}}},
                  "norm": {"scale": (4,), "bias": (4,)}},
      "decoder": {"decoder_embed": {"kernel": (4, 4), "bias": (4,)}, "mask_token": (1, 1, 4),
                  "norm": {"scale": (4,), "bias": (4,)}},
  }
  return jax.tree.map(lambda shape: nn.LogicallyPartitioned(jnp.zeros(shape), names=(None,) * len(shape)),
                      shapes, is_leaf=lambda x: isinstance(x, tuple))


def _decayed(mask):
  return {jax.tree_util.keystr(path, simple=True, separator="/")
          for path, decays in jax.tree_util.tree_leaves_with_path(mask) if decays}


def test_mae_pretraining_rule_decays_kernels_and_tokens_not_biases_or_norms():
  assert _decayed(optim.weight_decay_mask(_boxed_vit_names(), optim.MAE_PRETRAIN_WD_MULTS)) == {
      "encoder/patch_embed/kernel", "encoder/cls_token", "encoder/pos_embed",
      "encoder/block_0/attn/qkv/kernel", "decoder/decoder_embed/kernel", "decoder/mask_token"}


def test_default_rule_decays_kernels_only():
  assert _decayed(optim.weight_decay_mask(_boxed_vit_names())) == {
      "encoder/patch_embed/kernel", "encoder/block_0/attn/qkv/kernel", "decoder/decoder_embed/kernel"}


def test_layer_decay_step_is_adamw_with_a_per_layer_learning_rate():
  decay, wd, b1, b2, eps = 0.65, 0.05, 0.9, 0.999, 1e-8
  tx, _ = _build(_config(name="adamw", b1=b1, b2=b2, weight_decay=wd, layer_decay=decay))
  params, grads = _params_and_grads(make=_vit_like_params)
  # A leaf's layer and whether it decays, written out by hand rather than derived with the code under test.
  layer_of = {"patch_embed": 0, "cls_token": 0, "block_0": 1, "block_1": 2, "norm": 3, "fc_norm": 3,
              "logits": 3}

  def reference(path, param, *leaf_grads):
    names = _names(path)
    multiplier = decay ** (3 - layer_of[names[1]])
    decays = names[-1] == "kernel"
    p, m, v = param.astype(np.float64), 0.0, 0.0
    for t, g in enumerate(leaf_grads, start=1):
      m = b1 * m + (1 - b1) * g
      v = b2 * v + (1 - b2) * g**2
      adam = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
      p = p - _mae_lr(t - 1) * multiplier * (adam + wd * decays * p)
    return p

  got, _, _ = _run(tx, params, grads)
  _assert_trees_close(got, jax.tree_util.tree_map_with_path(reference, params, *grads), rtol=2e-5, atol=1e-6)
  # The lowest layer really moved less than the head: the multiplier is not a no-op.
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).mean()), got, params)
  assert moved["encoder"]["cls_token"] < 0.5 * moved["head"]["logits"]["kernel"]


@pytest.mark.parametrize("key, value", [
    ("name", "adam"), ("base_lr", -1.0), ("lr_batch_base", 0), ("b1", 1.0), ("b2", -0.1), ("momentum", 1.0),
    ("nesterov", "yes"), ("lr_scaling", "log"), ("lars_trust_coefficient", 0.0), ("weight_decay", -0.05),
    ("weight_decay_end", -1.0),
    ("grad_clip_norm", 0.0), ("layer_decay", 1.5), ("layer_decay", 0.0),
    ("wd_mults", ".*/kernel$"), ("wd_mults", ((".*/kernel$",),)), ("wd_mults", (("(", 1.0),)),
    ("wd_mults", ((".*", -1.0),)), ("lr_mults", ((".*", "2"),)), ("lr_mults", ((1, 2.0),)),
    ("frozen", "encoder/.*"), ("frozen", (3,)), ("frozen", ("[",)), ("freeze_epochs", (("head/.*", -1),))])
def test_bad_optimizer_values_name_their_key(key, value):
  with pytest.raises(ValueError, match=f"config.optimizer.{key}"):
    optim.validate_optimizer_config(_config(**{key: value}))
  with pytest.raises(ValueError, match=f"config.optimizer.{key}"):
    _build(_config(**{key: value}))


@pytest.mark.parametrize("key", ["warmup_epochs", "min_lr"])
def test_bad_schedule_values_name_their_key(key):
  with pytest.raises(ValueError, match=f"config.schedule.{key}"):
    optim.validate_optimizer_config(_config(schedule=dict(dict(warmup_epochs=0.0, min_lr=0.0),
                                                          **{key: -1.0})))


def test_unknown_optimizer_message_lists_the_choices():
  with pytest.raises(ValueError) as error:
    optim.validate_optimizer_config(_config(name="adam"))
  assert str(error.value) == "config.optimizer.name='adam' is not one of ('adamw', 'lars', 'sgd')"


def test_layer_decay_needs_a_vit_encoder():
  """A ResNet has no blocks to number: refused by the validation, not when the step is traced."""
  config = _config(layer_decay=0.75)
  config.model = ml_collections.ConfigDict(dict(name="resnet"))
  with pytest.raises(ValueError, match=r"config\.optimizer\.layer_decay=0\.75 needs a ViT's blocks"):
    optim.validate_optimizer_config(config)


def test_valid_rules_from_json_lists_pass():
  # A run's config.json turns the tuples into lists; frozen patterns that match nothing are fine.
  optim.validate_optimizer_config(_config(wd_mults=[[".*/kernel$", 1]], frozen=["nothing/.*"],
                                          freeze_epochs=[["head/.*", 1]]))
