"""BYOL: the target network (no gradient, scheduled moving average), one pass per view, evaluation from either
network, configs and recipes, and runs through the one loop (command line, resume, 8 devices)."""
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
from sslx.models import heads
import contrastive_helpers as helpers
from test_configs import load_config

CONFIG = "byol_fashion_mnist"


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
  """The :test config from the command line: 6 steps at batch 32, a checkpoint after every step."""
  return helpers.fresh_cli_run(CONFIG, tmp_path_factory)


def _config(**overrides):
  return helpers.tiny_config(CONFIG, **overrides)


@pytest.fixture(scope="module")
def fresh():
  """A freshly initialised BYOL at batch 8 (`contrastive_helpers.fresh_teacher_student`)."""
  return helpers.fresh_teacher_student(_config(batch_size=8))


def test_only_the_online_network_gets_a_gradient(fresh):
  assert set(fresh["variables"]["params"]) == {"encoder", "projector", "predictor"}
  assert set(fresh["method_state"]["target"]["params"]) == {"encoder", "projector"}
  online_grads, target_grads = fresh["grads"]
  assert all(float(np.abs(g).max()) == 0 for g in jax.tree.leaves(target_grads))
  for scope in ("encoder", "projector", "predictor"):
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(online_grads[scope])) > 0, scope


def test_target_is_the_scheduled_moving_average_of_the_online_network(fresh):
  """Three updates (k = 0, 1, 2, as the loop numbers them) of a run of K = 4 steps at tau_0 = 0.5, the online
  parameters moving far each time: the first copies the online network, then ``xi <- tau_k xi + (1 - tau_k)
  theta`` with tau_k from numpy; the target's BatchNorm averages are left to its own passes. The command-line
  run below checks the same through the loop."""
  config = fresh["config"].copy_and_resolve_references()
  config.method.momentum = 0.5
  method = methods.build_method(config, RunLength(4, 4))
  variables, state = fresh["variables"], fresh["method_state"]
  rng = np.random.default_rng(0)
  online = [jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(np.float32), variables["params"])
            for _ in range(3)]
  for k, params in enumerate(online):
    state = method.after_update({**variables, "params": params}, state, np.int32(k))
  tau = [1 - (1 - 0.5) * (np.cos(np.pi * k / 4) + 1) / 2 for k in (1, 2)]
  expected = jax.tree.map(lambda t1, t2, t3: tau[1] * (tau[0] * t1 + (1 - tau[0]) * t2) + (1 - tau[1]) * t3,
                          *[{scope: params[scope] for scope in ("encoder", "projector")} for params in online])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               state["target"]["params"], expected)
  assert state["target"]["batch_stats"] is fresh["method_state"]["target"]["batch_stats"]


def test_each_view_is_its_own_batch(fresh):
  """The loss is the symmetric BYOL loss of each view's own pass (BatchNorm over that view's rows only), and
  the running averages take the first view's update, then the second's."""
  metrics, _, model_state = fresh["aux"]
  (p0, p1), stats, (z0, z1) = helpers.per_view_reference(fresh, *byol.networks(fresh["config"]))
  expected = losses.byol_loss(p0, z1).loss + losses.byol_loss(p1, z0).loss
  np.testing.assert_allclose(fresh["loss"], expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["cosine"], 1 - expected / 4, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), model_state, dict(stats))
  batch, online = fresh["batch"], byol.networks(fresh["config"])[0]
  both, _ = online.apply(fresh["variables"], np.concatenate([batch["view_0"], batch["view_1"]]), train=True,
                         mutable=["batch_stats"])
  assert float(np.abs(both[:8] - p0).max()) > 1e-3  # one 2N batch would normalise differently


@pytest.mark.parametrize("embed_from", ["online", "target"])
def test_embed_reads_the_encoder_embed_from_names(fresh, embed_from):
  config = fresh["config"].copy_and_resolve_references()
  config.method.embed_from = embed_from
  method = methods.build_method(config)
  variables, batch = fresh["variables"], fresh["batch"]
  # A target apart from the online network, so the two encoders give different features.
  target = {**fresh["method_state"]["target"]}
  target["params"] = jax.tree.map(lambda x: x * 1.5, target["params"])
  method_state = {"target": target}
  source = variables if embed_from == "online" else target
  encoder = byol.networks(config)[0].encoder
  _, aux = encoder.apply({name: tree["encoder"] for name, tree in source.items()}, batch["view_0"], train=False)
  np.testing.assert_allclose(method.embed(variables, method_state, batch["view_0"]), aux["pooled"], rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("key, value, message", [
    ("method.momentum", 1.0, r"config\.method\.momentum=1\.0 must be a number in \[0, 1\)"),
    ("method.embed_from", "teacher", r"config\.method\.embed_from='teacher' is not one of"),
    ("method.predictor.out_dim", 16, r"config\.method\.predictor\.out_dim=16 must equal "
                                     r"config\.method\.projector\.out_dim=32"),
    ("method.projector.hidden_dim", -3, r"config\.method\.projector\.hidden_dim=-3"),
    ("method.predictor.last_batch_norm", None, r"config\.method\.predictor\.last_batch_norm=None"),
    ("model.bn_groups", 3, r"config\.model\.bn_groups=3 must split the 32 rows .*one view"),
    ("data.views", ("random_resized_crop(28)",), r"consumes 2 views but config\.data\.views="),
])
def test_bad_configs_name_the_key(key, value, message):
  with pytest.raises(checks.ConfigError, match=message):
    checks.validate_run_config(_config(**{key: value}))


def test_imagenet_recipe():
  config = load_config("byol_resnet50")
  assert (config.batch_size, config.num_epochs, config.model.variant) == (4096, 300, "50")
  opt = config.optimizer
  # 300 epochs: the reference's preset; 1000 epochs: the paper's headline recipe.
  assert (opt.name, opt.base_lr, opt.weight_decay, config.method.momentum) == ("lars", 0.3, 1e-6, 0.99)
  longest = load_config("byol_resnet50", "epochs=1000")
  assert (longest.optimizer.base_lr, longest.optimizer.weight_decay, longest.method.momentum) == (0.2, 1.5e-6, 0.996)
  assert opt.momentum == 0.9 and opt.lr_batch_base == 256 and opt.wd_mults == optim.DEFAULT_WD_MULTS
  assert (config.schedule.warmup_epochs, config.schedule.min_lr) == (10.0, 0.0)
  for mlp, in_dim in ((config.method.projector, 2048), (config.method.predictor, 256)):
    init = functools.partial(heads.from_config(mlp).init, jax.random.PRNGKey(0), train=False)
    params = jax.eval_shape(init, jax.ShapeDtypeStruct((2, in_dim), np.float32))["params"]
    # Dense 4096 -> BN (scale, bias) -> ReLU -> dense 256 without bias, no BN on the output.
    assert jax.tree.map(np.shape, nn.unbox(params)) == {
        "layer_0": {"kernel": (in_dim, 4096)}, "bn_0": {"scale": (4096,), "bias": (4096,)},
        "layer_1": {"kernel": (4096, 256)}}
  first, second = config.data.views
  common = ("random_resized_crop(224, scale=(0.08, 1.0), interpolation='bicubic')|hflip"
            "|color_jitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, p=0.8)|grayscale(p=0.2)")
  assert first == common + "|blur(p=1.0, sigma=(0.1, 2.0))|solarize(p=0.0)"
  assert second == common + "|blur(p=0.1, sigma=(0.1, 2.0))|solarize(p=0.2)"
  local = load_config("byol_resnet50", "local")
  assert local.batch_size == 8 and local.data.views[1].endswith("|blur(p=0.1, sigma=(0.1, 2.0))|solarize(p=0.2)")


def test_cli_run_writes_checkpoints_and_resumes_exactly(cli_run, tmp_path):
  assert sorted(int(p.name) for p in (cli_run / "checkpoints").iterdir()) == [1, 2, 3, 4, 5, 6]
  # Through the loop: its first update (k = 0) copies the online network, its second (k = 1 of K = 6) averages
  # with tau_0 = 0.99 on the schedule.
  first, second = helpers.read_state(cli_run, 1), helpers.read_state(cli_run, 2)
  tau = 1 - (1 - 0.99) * (np.cos(np.pi / 6) + 1) / 2
  online_names = [name for name in first if name.startswith("['params']") and "['predictor']" not in name]
  assert online_names and all(f"['method_state']['target']{name}" in first for name in online_names)
  for name in online_names:
    target = f"['method_state']['target']{name}"
    np.testing.assert_array_equal(first[target], first[name], err_msg=name)
    np.testing.assert_allclose(second[target], tau * first[name] + (1 - tau) * second[name], rtol=1e-5,
                               atol=1e-7, err_msg=name)
  helpers.assert_resumes_exactly(CONFIG, cli_run, tmp_path)


def test_eight_devices_train_as_one(cli_run, tmp_path):
  """The batch split over 8 devices: the same losses, parameters, BatchNorm statistics and target network."""
  helpers.train_on_eight_devices(CONFIG, tmp_path / "eight")
  helpers.assert_same_steps(tmp_path / "eight", cli_run)
