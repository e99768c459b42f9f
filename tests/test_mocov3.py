"""MoCo v3: the momentum encoder (no gradient, scheduled moving average), one pass per view, the heads,
stop-grad-conv1, evaluation from either encoder, configs and recipes, and a command-line run that resumes."""
import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from sslx import checks
from sslx import losses
from sslx import methods
from sslx import optim
from sslx.methods import RunLength
from sslx.methods import byol
from sslx.methods import mocov3
from sslx.models import heads
import contrastive_helpers as helpers
from test_configs import load_config

CONFIG = "mocov3_fashion_mnist"


def _momentum(step, base, total):
  """m_s = 1 - (1 - m_0) (cos(pi s / K) + 1) / 2, in numpy."""
  return 1 - (1 - base) * (np.cos(np.pi * min(step, total) / total) + 1) / 2


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
  """The :test config from the command line: 6 steps at batch 32, a checkpoint after every step."""
  return helpers.fresh_cli_run(CONFIG, tmp_path_factory)


@pytest.fixture(scope="module")
def fresh():
  """A freshly initialised MoCo v3 (the one-block ViT of the :test config) at batch 8
  (`contrastive_helpers.fresh_teacher_student`)."""
  return helpers.fresh_teacher_student(helpers.tiny_config(CONFIG, batch_size=8))


def test_only_the_online_network_gets_a_gradient(fresh):
  assert set(fresh["variables"]["params"]) == {"encoder", "projector", "predictor"}
  assert set(fresh["method_state"]["target"]["params"]) == {"encoder", "projector"}
  online_grads, target_grads = fresh["grads"]
  assert all(float(np.abs(g).max()) == 0 for g in jax.tree.leaves(target_grads))
  # Every online parameter, the patch projection included: stop-grad-conv1 is the optimizer's doing.
  for path, g in jax.tree_util.tree_flatten_with_path(online_grads)[0]:
    assert float(np.abs(g).max()) > 0, jax.tree_util.keystr(path)


def test_each_view_is_its_own_batch(fresh):
  """The loss is MoCo v3's of each view's own pass through each network (BatchNorm over that view's rows only),
  and the online running averages take the first view's update, then the second's."""
  metrics, _, model_state = fresh["aux"]
  (q1, q2), stats, (k1, k2) = helpers.per_view_reference(fresh, *byol.networks(fresh["config"]))
  expected = losses.mocov3_loss(q1, q2, k1, k2, temperature=0.2)
  np.testing.assert_allclose(fresh["loss"], expected.loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["contrastive_accuracy"], expected.accuracy, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), model_state, dict(stats))


def test_momentum_encoder_is_the_scheduled_moving_average(fresh):
  """Three updates (k = 0, 1, 2, as the loop numbers them) of a run of K = 4 steps at m_0 = 0.5, the online
  parameters moving far each time: the first copies the online network, update k then averages with m_{k+1}
  (the momentum of the step whose keys it makes), from numpy."""
  config = fresh["config"].copy_and_resolve_references()
  config.method.momentum = 0.5
  method = methods.build_method(config, RunLength(4, 4))
  variables, state = fresh["variables"], fresh["method_state"]
  rng = np.random.default_rng(0)
  online = [jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(np.float32), variables["params"])
            for _ in range(3)]
  for k, params in enumerate(online):
    state = method.after_update({**variables, "params": params}, state, np.int32(k))
  m2, m3 = _momentum(2, 0.5, 4), _momentum(3, 0.5, 4)
  expected = jax.tree.map(lambda t1, t2, t3: m3 * (m2 * t1 + (1 - m2) * t2) + (1 - m3) * t3,
                          *[{scope: params[scope] for scope in ("encoder", "projector")} for params in online])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               state["target"]["params"], expected)
  assert state["target"]["batch_stats"] is fresh["method_state"]["target"]["batch_stats"]


def test_embed_from_target_reads_the_momentum_encoder(fresh):
  config = fresh["config"].copy_and_resolve_references()
  config.method.embed_from = "target"
  images = fresh["batch"]["view_0"]
  target = {**fresh["method_state"]["target"]}
  target["params"] = jax.tree.map(lambda x: x * 1.5, target["params"])  # apart from the online network
  encoder = byol.networks(config)[0].encoder
  _, aux = encoder.apply(methods.subtree_variables(target, "encoder"), images, train=False)
  embedded = methods.build_method(config).embed(fresh["variables"], {"target": target}, images)
  np.testing.assert_allclose(embedded, aux["pooled"], rtol=1e-5, atol=1e-6)
  online = fresh["method"].embed(fresh["variables"], {"target": target}, images)
  assert float(np.abs(online - embedded).max()) > 1e-3


def _head_shapes(head, in_dim):
  """``(params, batch_stats)`` shapes of a head section's module on ``in_dim`` features."""
  init = functools.partial(heads.from_config(head).init, jax.random.PRNGKey(0), train=False)
  variables = jax.eval_shape(init, jax.ShapeDtypeStruct((2, in_dim), np.float32))
  return [jax.tree.map(np.shape, nn.unbox(variables[name])) for name in ("params", "batch_stats")]


def _affine(width):
  return {"scale": (width,), "bias": (width,)}


def _stats(width):
  return {"mean": (width,), "var": (width,)}


def test_vit_heads_have_moco_v3_layers():
  """Bias-free dense layers, BatchNorm with scale and bias after the hidden ones, and a last BatchNorm with
  running statistics but no affine parameters: projector 768-4096-4096-256, predictor 256-4096-256."""
  method = load_config("mocov3_vitb").method
  params, stats = _head_shapes(method.projector, 768)
  assert params == {"layer_0": {"kernel": (768, 4096)}, "bn_0": _affine(4096), "layer_1": {"kernel": (4096, 4096)},
                    "bn_1": _affine(4096), "layer_2": {"kernel": (4096, 256)}}
  assert stats == {"bn_0": _stats(4096), "bn_1": _stats(4096), "bn_2": _stats(256)}
  params, stats = _head_shapes(method.predictor, 256)
  assert params == {"layer_0": {"kernel": (256, 4096)}, "bn_0": _affine(4096), "layer_1": {"kernel": (4096, 256)}}
  assert stats == {"bn_0": _stats(4096), "bn_1": _stats(256)}


def test_resnet_heads_have_moco_v3_layers():
  """Projector 2048-4096-256 with the affine-free last BatchNorm; predictor 256-4096-256 without a last one."""
  method = load_config("mocov3_resnet50").method
  params, stats = _head_shapes(method.projector, 2048)
  assert params == {"layer_0": {"kernel": (2048, 4096)}, "bn_0": _affine(4096), "layer_1": {"kernel": (4096, 256)}}
  assert stats == {"bn_0": _stats(4096), "bn_1": _stats(256)}
  params, stats = _head_shapes(method.predictor, 256)
  assert params == {"layer_0": {"kernel": (256, 4096)}, "bn_0": _affine(4096), "layer_1": {"kernel": (4096, 256)}}
  assert stats == {"bn_0": _stats(4096)}


@pytest.mark.parametrize("key, value, message", [
    ("method.temperature", 0.0, r"config\.method\.temperature=0\.0 must be a number > 0"),
    ("method.momentum", 1.0, r"config\.method\.momentum=1\.0 must be a number in \[0, 1\)"),
    ("method.embed_from", "momentum", r"config\.method\.embed_from='momentum' is not one of"),
    ("method.predictor.out_dim", 16, r"config\.method\.predictor\.out_dim=16 must equal "
                                     r"config\.method\.projector\.out_dim=32"),
    ("method.projector.last_batch_norm_scale", None, r"config\.method\.projector\.last_batch_norm_scale=None"),
    ("data.views", ("random_resized_crop(28)",), r"consumes 2 views but config\.data\.views="),
])
def test_bad_configs_name_the_key(key, value, message):
  with pytest.raises(checks.ConfigError, match=message):
    checks.validate_run_config(helpers.tiny_config(CONFIG, **{key: value}))


def test_vit_recipe():
  config = load_config("mocov3_vitb")
  assert (config.batch_size, config.num_epochs, config.model.variant) == (4096, 300, "B/16")
  opt = config.optimizer
  assert (opt.name, opt.base_lr, opt.lr_batch_base, opt.b1, opt.b2) == ("adamw", 1.5e-4, 256, 0.9, 0.999)
  assert opt.weight_decay == 0.1 and opt.wd_mults == ((".*", 1.0),)
  assert opt.frozen == (mocov3.PATCH_EMBED_PATTERN,)
  assert (config.schedule.warmup_epochs, config.schedule.min_lr) == (40.0, 0.0)
  assert (config.method.temperature, config.method.momentum) == (0.2, 0.99)
  first, second = config.data.views
  common = ("random_resized_crop(224, scale=(0.08, 1.0), interpolation='bilinear')|hflip"
            "|color_jitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, p=0.8)|grayscale(p=0.2)")
  assert first == common + "|blur(p=1.0, sigma=(0.1, 2.0))|solarize(p=0.0)"
  assert second == common + "|blur(p=0.1, sigma=(0.1, 2.0))|solarize(p=0.2)"
  small = load_config("mocov3_vitb", "variant=S/16,stop_grad_conv1=false")
  assert (small.model.variant, small.model.num_heads, small.optimizer.frozen) == ("S/16", 12, ())
  local = load_config("mocov3_vitb", "local")
  assert (local.batch_size, local.data.image_size, local.model.width) == (8, 32, 8)
  assert local.data.views[1].endswith("|solarize(p=0.2)")


def test_resnet_recipe():
  config = load_config("mocov3_resnet50")
  assert (config.batch_size, config.num_epochs, config.model.variant) == (4096, 100, "50")
  assert config.model.zero_init_last_bn
  opt = config.optimizer
  assert (opt.name, opt.base_lr, opt.weight_decay, opt.momentum, opt.lr_batch_base) == ("lars", 0.6, 1e-6, 0.9, 256)
  assert opt.wd_mults == optim.DEFAULT_WD_MULTS and opt.frozen == ()
  assert (config.schedule.warmup_epochs, config.schedule.min_lr) == (10.0, 0.0)
  assert (config.method.temperature, config.method.momentum) == (1.0, 0.99)
  assert all(view.startswith("random_resized_crop(224, scale=(0.2, 1.0)") for view in config.data.views)
  longest = load_config("mocov3_resnet50", "epochs=1000")
  assert (longest.optimizer.base_lr, longest.optimizer.weight_decay, longest.method.momentum) == (0.3, 1.5e-6, 0.996)
  assert load_config("mocov3_resnet50", "local").batch_size == 8


def test_cli_run_freezes_the_patch_embedding_and_resumes_exactly(cli_run, tmp_path):
  assert sorted(int(p.name) for p in (cli_run / "checkpoints").iterdir()) == [1, 2, 3, 4, 5, 6]
  first, second, last = (helpers.read_state(cli_run, step) for step in (1, 2, 6))
  # Through the loop: its first update (k = 0) copies the online network, its second (k = 1 of K = 6) averages
  # with m_2 of the schedule from m_0 = 0.99.
  m = _momentum(2, 0.99, 6)
  online_names = [name for name in first if name.startswith("['params']") and "['predictor']" not in name]
  assert online_names and all(f"['method_state']['target']{name}" in first for name in online_names)
  for name in online_names:
    target = f"['method_state']['target']{name}"
    np.testing.assert_array_equal(first[target], first[name], err_msg=name)
    np.testing.assert_allclose(second[target], m * first[name] + (1 - m) * second[name], rtol=1e-5, atol=1e-7,
                               err_msg=name)
  # stop-grad-conv1: the patch projection stays put in both encoders; every other parameter moves.
  params = [name for name in first if name.startswith("['params']")]
  frozen = [name for name in params if "['patch_embed']" in name]
  assert len(frozen) == 2
  for name in frozen:
    for state in (second, last):
      np.testing.assert_array_equal(state[name], first[name], err_msg=name)
      # The momentum encoder's is an average of equal values: equal up to float32 rounding.
      np.testing.assert_allclose(state[f"['method_state']['target']{name}"], first[name], rtol=1e-6, atol=0,
                                 err_msg=name)
  moved = [name for name in params if name not in frozen and not np.array_equal(last[name], first[name])]
  assert len(moved) == len(params) - 2
  helpers.assert_resumes_exactly(CONFIG, cli_run, tmp_path)
