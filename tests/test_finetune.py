"""The fine-tuning bundle (sslx/methods/finetune.py) and its configs (configs/finetune.py)."""
import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslx import checks
from sslx import methods
from sslx import models
from sslx import optim
from sslx import recipes
from sslx.methods import finetune

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 5


def tiny_config(**method_overrides):
  """ViT with width 32, 2 blocks, patch 8 on 16x16 RGB: 4 patches."""
  pretrain = recipes.mae_config("Ti/8")
  pretrain.model.update(dict(width=32, depth=2, num_heads=2, mlp_dim=64, dtype="float32"))
  pretrain.data.update(dict(image_size=16, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3))
  config = finetune.finetune_config(
      pretrain, num_classes=NUM_CLASSES, batch_size=8, num_epochs=1, base_lr=1e-3, layer_decay=0.75,
      drop_path_rate=0.0, augmentation="random_resized_crop(16, scale=(1, 1), ratio=(1, 1))|hflip")
  config.method.update(method_overrides)
  return config


def images_and_labels(batch=8, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(batch, 16, 16, 3)), jnp.float32),
          jnp.asarray(rng.integers(0, NUM_CLASSES, batch), jnp.int32))


def init_variables(method, images):
  variables, method_state = jax.jit(method.init)(jax.random.PRNGKey(0), {"image": images[:1]})
  return nn.unbox(variables), nn.unbox(method_state)


def random_head_kernel():
  """A head kernel of unit scale, whose logits differ from row to row (the initial one's are ~0)."""
  return jax.random.normal(jax.random.PRNGKey(1), (32, NUM_CLASSES))


def numpy_log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(axis=1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def test_soft_target_cross_entropy_with_smoothing_matches_numpy():
  rng = np.random.default_rng(0)
  logits, labels, smoothing = rng.normal(size=(6, 4)) * 3, rng.integers(0, 4, 6), 0.1
  targets = (1 - smoothing) * np.eye(4)[labels] + smoothing / 4
  expected = -(targets * numpy_log_softmax(logits)).sum(axis=1).mean()
  got = finetune.soft_target_cross_entropy(jnp.asarray(logits, jnp.float32),
                                           jnp.asarray(targets, jnp.float32))
  np.testing.assert_allclose(float(got), expected, rtol=1e-6)


def test_unmixed_training_loss_is_smoothed_cross_entropy_of_the_model_logits():
  config = tiny_config(mixup_alpha=0.0, cutmix_alpha=0.0)  # drop path 0: train mode is deterministic too
  method = methods.build_method(config)
  images, labels = images_and_labels()
  variables, state = init_variables(method, images)
  variables["params"]["head"]["logits"]["kernel"] = random_head_kernel()
  loss, (_, _, model_state) = jax.jit(method.loss_fn)(variables, state, {"image": images, "label": labels},
                                                       jax.random.PRNGKey(2))
  assert model_state == {}  # a ViT has no collection but params
  logits, _ = finetune.model_from_config(config).apply(variables, images, train=False)
  targets = 0.9 * np.eye(NUM_CLASSES)[labels] + 0.1 / NUM_CLASSES
  expected = -(targets * numpy_log_softmax(logits)).sum(axis=1).mean()
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


@pytest.mark.parametrize("mix_prob, switch_prob", [(1.0, 0.5), (1.0, 1.0), (0.5, 0.5)])
def test_mixed_targets_sum_to_one_inside_the_training_loss(mix_prob, switch_prob):
  # With an all-zero head every logit is 0, so the loss is log(C) * (mean target row sum).
  method = methods.build_method(tiny_config(mix_prob=mix_prob, switch_prob=switch_prob))
  images, labels = images_and_labels()
  variables, state = init_variables(method, images)
  variables["params"]["head"] = jax.tree.map(jnp.zeros_like, variables["params"]["head"])
  loss_fn = jax.jit(method.loss_fn)
  for seed in range(4):
    loss, _ = loss_fn(variables, state, {"image": images, "label": labels}, jax.random.PRNGKey(seed))
    np.testing.assert_allclose(float(loss), np.log(NUM_CLASSES), rtol=1e-6)


def test_training_inputs_mix_with_probability_mix_prob():
  method_config = tiny_config(mix_prob=0.5, switch_prob=0.0).method
  images, labels = images_and_labels()
  smoothed = 0.9 * np.eye(NUM_CLASSES)[labels] + 0.1 / NUM_CLASSES
  inputs = jax.jit(lambda rng: finetune.training_inputs(rng, images, labels, method_config))
  outcomes = set()
  for seed in range(12):
    mixed, targets = inputs(jax.random.PRNGKey(seed))
    np.testing.assert_allclose(np.asarray(targets).sum(axis=1), 1.0, rtol=1e-6)
    unmixed = bool(jnp.all(mixed == images))
    if unmixed:
      np.testing.assert_allclose(targets, smoothed, rtol=1e-6)
    outcomes.add(unmixed)
  assert outcomes == {True, False}
  never = tiny_config(mix_prob=0.0).method
  mixed, targets = finetune.training_inputs(jax.random.PRNGKey(0), images, labels, never)
  np.testing.assert_array_equal(mixed, images)
  np.testing.assert_allclose(targets, smoothed, rtol=1e-6)


def test_ema_starts_from_the_first_update_then_follows_the_formula():
  method = methods.build_method(tiny_config(ema_decay=0.9))
  images, _ = images_and_labels()
  variables, state = init_variables(method, images)
  assert set(state) == {"ema"}
  moved = jax.tree.map(lambda p: p + 1.0, variables)
  after_update = jax.jit(method.after_update)
  state = after_update(moved, state, jnp.asarray(0))
  jax.tree.map(lambda e, p: np.testing.assert_array_equal(e, p), state["ema"], moved)
  later = jax.tree.map(lambda p: 3.0 * p - 2.0, variables)
  new_state = after_update(later, state, jnp.asarray(7))
  jax.tree.map(lambda e, old, p: np.testing.assert_allclose(e, 0.9 * np.asarray(old) + 0.1 * np.asarray(p),
                                                            rtol=1e-6, atol=1e-7),
               new_state["ema"], state["ema"], later)
  no_ema = methods.build_method(tiny_config())
  _, empty = init_variables(no_ema, images)
  assert empty == {} and no_ema.after_update(variables, empty, jnp.asarray(3)) == {}


def pooled_features(config, encoder_params, images):
  """``aux['pooled']`` of the encoder ``config.model`` describes, run directly in evaluation mode."""
  encoder = models.encoder_from_config(config.model)
  return np.asarray(encoder.apply({"params": encoder_params}, images, train=False)[1]["pooled"])


@pytest.mark.parametrize("embed_from", ["online", "ema"])
def test_embed_reads_the_encoder_embed_from_names(embed_from):
  config = tiny_config(ema_decay=0.9, embed_from=embed_from)
  method = methods.build_method(config)
  images, _ = images_and_labels()
  variables, _ = init_variables(method, images)
  # An EMA whose encoder differs from the online one, so reading the wrong one shows.
  state = {"ema": jax.tree.map(lambda p: 0.5 * p + 0.1, variables)}
  read = state["ema"] if embed_from == "ema" else variables
  other = variables if embed_from == "ema" else state["ema"]
  embedded = np.asarray(jax.jit(method.embed)(variables, state, images))
  # Jitted against eager: float32 reassociation only.
  np.testing.assert_allclose(embedded, pooled_features(config, read["params"]["encoder"], images),
                             rtol=1e-4, atol=1e-4)
  assert not np.allclose(embedded, pooled_features(config, other["params"]["encoder"], images), atol=1e-3)
  # What config.init_from's 'encoder' copies out of this run is the same encoder.
  jax.tree.map(np.testing.assert_array_equal, method.encoder_variables(variables, state),
               {"params": read["params"]["encoder"]})


def test_embed_from_ema_needs_an_ema():
  with pytest.raises(ValueError, match="embed_from='ema' needs config.method.ema_decay"):
    methods.build_method(tiny_config(embed_from="ema"))


def numpy_classification_sums(logits, labels, mask):
  order = np.argsort(-logits, axis=1)
  real = np.flatnonzero(mask)
  top1 = order[real, 0] == labels[real]
  top5 = np.array([labels[i] in order[i, :5] for i in real])
  nll = -numpy_log_softmax(logits)[real, labels[real]]
  return dict(count=len(real), top1=100 * top1.sum(), top5=100 * top5.sum(), loss=nll.sum())


def test_classification_sums_match_numpy_and_skip_masked_rows():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(10, 8)).astype(np.float32)
  labels = rng.integers(0, 8, 10)
  logits[np.arange(3), labels[:3]] += 5.0  # three sure hits among the random rows
  labels[-3:] = -1  # padding rows, as the eval loader makes them
  mask = labels >= 0
  logits[-3:] = np.nan  # padding must not leak into any sum
  got = finetune.classification_sums(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
  expected = numpy_classification_sums(logits, labels, mask)
  assert set(got) == set(expected)
  for name, value in expected.items():
    np.testing.assert_allclose(float(got[name]), value, rtol=1e-5, err_msg=name)
  assert 0 < expected["top1"] < expected["top5"] < 100 * 7  # the example exercises hits and misses


def test_evaluate_scores_the_model_and_its_ema():
  method = methods.build_method(tiny_config(ema_decay=0.99))
  images, labels = images_and_labels(batch=8, seed=4)
  variables, state = init_variables(method, images)
  variables["params"]["head"]["logits"]["kernel"] = random_head_kernel()
  state = {"ema": jax.tree.map(lambda p: -p, variables)}
  mask = np.array([True] * 6 + [False] * 2)
  sums = method.evaluate(variables, state, {"image": images, "label": labels, "mask": jnp.asarray(mask)})
  model = finetune.model_from_config(tiny_config())
  for prefix, weights in (("", variables), ("ema_", state["ema"])):
    logits = np.asarray(model.apply(weights, images, train=False)[0])
    for name, value in numpy_classification_sums(logits, np.asarray(labels), mask).items():
      key = name if name == "count" else prefix + name
      np.testing.assert_allclose(float(sums[key]), value, rtol=1e-5, err_msg=key)


def test_eval_mode_has_no_drop_path_and_train_mode_does():
  config = tiny_config()
  config.model.drop_path_rate = 0.5
  model = finetune.model_from_config(config)
  images, _ = images_and_labels()
  params = nn.unbox(model.init(jax.random.PRNGKey(0), images, train=False))["params"]

  def features(module, rng, train):  # pre-logits: unit scale, unlike the near-zero logits of a fresh head
    return module.apply({"params": params}, images, train=train, rngs={"dropout": rng})[1]["pre_logits"]

  eval_a = features(model, jax.random.PRNGKey(1), False)
  eval_b = features(model, jax.random.PRNGKey(2), False)
  np.testing.assert_array_equal(eval_a, eval_b)
  np.testing.assert_array_equal(eval_a, model.apply({"params": params}, images, train=False)[1]["pre_logits"])
  train_a = features(model, jax.random.PRNGKey(1), True)
  train_b = features(model, jax.random.PRNGKey(2), True)
  assert not np.allclose(train_a, train_b, atol=1e-3) and not np.allclose(train_a, eval_a, atol=1e-3)
  config.model.drop_path_rate = 0.0  # same weights without drop path: train mode equals eval mode
  plain = finetune.model_from_config(config)
  np.testing.assert_allclose(features(plain, jax.random.PRNGKey(1), True), eval_a, rtol=1e-5, atol=1e-6)


def test_head_layout_init_and_weight_decay():
  config = tiny_config()
  method = methods.build_method(config)
  images, _ = images_and_labels()
  variables, _ = init_variables(method, images)
  params = variables["params"]
  assert set(variables) == {"params"}
  assert set(params) == {"encoder", "head"} and set(params["head"]) == {"fc_norm", "logits"}
  kernel = np.asarray(params["head"]["logits"]["kernel"])
  assert 1e-5 < kernel.std() < 4e-5 and not np.any(params["head"]["logits"]["bias"])
  decays = optim.weight_decay_mask(params, config.optimizer.wd_mults)
  assert decays["head"]["logits"]["kernel"] and not decays["head"]["logits"]["bias"]
  assert not any(jax.tree.leaves(decays["head"]["fc_norm"]))
  # MAE's fine-tuning exempts the class token (and a learned position table) from weight decay.
  assert decays["encoder"]["patch_embed"]["kernel"] and not decays["encoder"]["cls_token"]
  # fc_norm is a LayerNorm with the encoder's epsilon: re-standardising the pooled vector.
  config.model.layer_norm_eps = 1e-3
  pre_logits = finetune.model_from_config(config).apply(variables, images, train=False)[1]["pre_logits"]
  pooled = pooled_features(config, params["encoder"], images)
  mean, var = pooled.mean(axis=1, keepdims=True), pooled.var(axis=1, keepdims=True)
  np.testing.assert_allclose(pre_logits, (pooled - mean) / np.sqrt(var + 1e-3), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("key, value", [
    ("method.num_classes", 1), ("method.label_smoothing", 1.0), ("method.label_smoothing", -0.1),
    ("method.mixup_alpha", -0.8), ("method.cutmix_alpha", -1.0), ("method.mix_prob", 1.5),
    ("method.switch_prob", -0.1), ("method.ema_decay", 1.0), ("method.ema_decay", 0.0),
    ("method.embed_from", "teacher"), ("optimizer.layer_decay", 0.0), ("optimizer.layer_decay", 1.2),
    ("model.pooling", "max"), ("model.drop_path_rate", 1.0)])
def test_bad_values_name_their_key(key, value):
  checks.validate_run_config(tiny_config())  # the unchanged config is valid: the error is the key's
  config = tiny_config()
  section, name = key.split(".")
  config[section][name] = value
  # Each module validates its own section; the loop runs them all before building anything.
  with pytest.raises(ValueError, match=f"config.{key}="):
    checks.validate_run_config(config)


def test_unset_number_of_classes_is_named():
  config = tiny_config()
  config.method = finetune.default_config()  # num_classes has no default: the data set decides it
  with pytest.raises(ValueError, match="config.method.num_classes=None"):
    methods.build_method(config)


def test_layer_decay_needs_a_vit():
  config = tiny_config()
  config.model = models.default_config("resnet")
  with pytest.raises(ValueError, match="config.optimizer.layer_decay=0.75 needs a ViT"):
    methods.build_method(config)


def load_config(arg=None):
  path = os.path.join(REPO, "configs", "finetune.py")
  spec = importlib.util.spec_from_file_location("finetune_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)


def encoder_shapes(config, method_config):
  size = config.data.image_size
  image = jax.ShapeDtypeStruct((1, size, size, config.data.channels), np.float32)
  method = methods.build_method(method_config)
  variables = jax.eval_shape(lambda x: nn.unbox(method.init(jax.random.PRNGKey(0), {"image": x})[0]), image)
  return jax.tree.map(lambda leaf: leaf.shape, variables["params"]["encoder"])


def load_pretrain_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("arg, pretrain", [
    (None, ("mae_fashion_mnist", None)), ("vitb", ("mae_vitb", None)), ("vitl,local", ("mae_vitl", "local")),
    ("vith:local", ("mae_vith", "local"))])
def test_configs_validate_and_match_their_pretraining_encoder(arg, pretrain):
  config = load_config(arg)
  assert config.task == "finetune" and config.method.name == "finetune"
  if config.data.source == "tfds":
    config.data.source = "synthetic"  # ImageNet is not on this machine; everything else is checked
  checks.validate_run_config(config)
  # --config.init_from restores the pretraining run's encoder into these exact shapes.
  pretrain_config = load_pretrain_config(*pretrain)
  assert encoder_shapes(config, config) == encoder_shapes(config, pretrain_config)


@pytest.mark.parametrize("arg, epochs, base_lr, layer_decay, drop_path", [
    ("vitb", 100, 5e-4, 0.65, 0.1), ("vitl", 50, 1e-3, 0.75, 0.2), ("vith", 50, 1e-3, 0.75, 0.3)])
def test_imagenet_configs_follow_mae_finetune_recipe(arg, epochs, base_lr, layer_decay, drop_path):
  config = load_config(arg)
  assert config.num_epochs == epochs
  assert (config.optimizer.base_lr, config.optimizer.layer_decay) == (base_lr, layer_decay)
  # MAE's global pooling: the mean patch token, re-normalised by fc_norm before the head.
  assert config.model.drop_path_rate == drop_path and config.model.pooling == "mean" and config.method.fc_norm
  assert config.batch_size == 1024 and config.schedule.warmup_epochs == 5.0
  assert (config.optimizer.b1, config.optimizer.b2, config.optimizer.weight_decay) == (0.9, 0.999, 0.05)
  method = config.method
  assert (method.num_classes, method.label_smoothing) == (1000, 0.1)
  assert (method.mixup_alpha, method.cutmix_alpha) == (0.8, 1.0)
  assert config.data.dataset == "imagenet2012"
  assert config.data.augmentation.startswith("random_resized_crop(224")
  assert config.checkpoint.best_metric == "eval/top1" and config.eval.every_epochs == 1.0
  local = load_config(f"{arg},local")
  assert local.total_steps == 20 and local.batch_size == 8 and local.model.depth == 2


@pytest.mark.parametrize("arg, named", [("vitb:lokal", "'lokal'"), ("vitz", "'vitz'"),
                                        ("fashion_mnist,local", "already runs on a CPU")])
def test_unknown_config_argument_is_named(arg, named):
  with pytest.raises(ValueError, match=named):
    load_config(arg)
