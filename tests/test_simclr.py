"""SimCLR: the method bundle, its recipes, and runs through the one loop (command line, resume, 8 devices,
TFDS)."""
import math
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from sslx import checks
from sslx import methods
from sslx import optim
from sslx.evaluate import run as eval_run
from sslx.methods import simclr
from sslx.models import heads
import contrastive_helpers as helpers
from test_configs import SslxTinyRgb, load_config

CONFIG = "simclr_fashion_mnist"


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
  """The :test config from the command line: 6 steps at batch 32, a checkpoint after every step."""
  return helpers.fresh_cli_run(CONFIG, tmp_path_factory)


def _tiny_method(**method_overrides):
  config = load_config(CONFIG, "test")
  config.unlock()
  config.method.update(method_overrides)
  return config, methods.build_method(config)


def test_embed_reads_the_encoder_features_before_the_head():
  config, method = _tiny_method()
  images = np.random.default_rng(0).normal(size=(4, 28, 28, 1)).astype(np.float32)
  variables, _ = nn.unbox(method.init(jax.random.PRNGKey(0), {"image": images[:1]}))
  features = method.embed(variables, {}, images)
  model = heads.encoder_with_head(config)
  projections, pooled = model.apply(variables, images, train=False)
  assert features.shape == (4, 64) and projections.shape == (4, 128)  # ResNet-18 at width 8: 8 * 8 features
  np.testing.assert_array_equal(features, pooled)


def test_vit_variant_embeds_and_every_parameter_gets_a_gradient():
  config = load_config(CONFIG, "vit,test")
  assert config.model.name == "vit" and config.optimizer.name == "adamw"
  method = methods.build_method(config)
  views = helpers.random_views(4, seed=0)
  variables, method_state = method.init(jax.random.PRNGKey(0), {"image": views["view_0"]})
  variables = nn.unbox(variables)
  assert method.embed(variables, method_state, views["view_0"]).shape == (4, 32)  # the one-block ViT's width
  grads = jax.grad(lambda v: method.loss_fn(v, method_state, views, jax.random.PRNGKey(1))[0])(variables)
  assert all(np.isfinite(g).all() and np.abs(g).max() > 0 for g in jax.tree_util.tree_leaves(grads["params"]))


@pytest.mark.parametrize("key, value, message", [
    ("data.views", ("random_resized_crop(28)",), r"consumes 2 views but config\.data\.views="),
    ("data.views", None, r"consumes 2 views but config\.data\.views=None"),
    ("data.views", ("random_resized_crop(28)", "random_resized_crop(14)"),
     r"config\.data\.views\[1\]=.*makes 14x14"),
    ("method.temperature", 0.0, r"config\.method\.temperature=0\.0 must be a number > 0"),
    ("method.head.num_layers", 0, r"config\.method\.head\.num_layers=0"),
    ("model.bn_groups", 3, r"config\.model\.bn_groups=3 must split the 64 rows"),
])
def test_bad_configs_name_the_key(key, value, message):
  config = load_config(CONFIG, "test")
  config.unlock()
  *parents, leaf = key.split(".")
  section = config
  for parent in parents:
    section = section[parent]
  section[leaf] = value
  with pytest.raises(checks.ConfigError, match=message):
    checks.validate_run_config(config)


def test_views_of_one_size_pass_the_size_check():
  config = load_config(CONFIG, "test")
  simclr.check_views_share_a_size(config.data)  # no error


def test_imagenet_recipe():
  config = load_config("simclr_resnet50")
  assert (config.batch_size, config.num_epochs, config.method.temperature) == (4096, 100, 0.1)
  assert config.data.views[0] == config.data.views[1] and "scale=(0.08, 1.0)" in config.data.views[0]
  assert "color_jitter(1.0, p=0.8)|grayscale(p=0.2)|blur(p=0.5, sigma=(0.1, 2.0))" in config.data.views[0]
  opt = config.optimizer
  assert (opt.name, opt.base_lr, opt.weight_decay, opt.momentum) == ("lars", 0.3, 1e-6, 0.9)
  assert opt.wd_mults == optim.DEFAULT_WD_MULTS and config.schedule.warmup_epochs == 10.0
  schedule = optim.learning_rate_schedule(config, steps_per_epoch=100, total_steps=10_000)
  assert float(schedule(1000)) == pytest.approx(0.3 * 4096 / 256)
  sqrt = load_config("simclr_resnet50", "lr=sqrt")
  schedule = optim.learning_rate_schedule(sqrt, steps_per_epoch=100, total_steps=10_000)
  assert float(schedule(1000)) == pytest.approx(0.075 * math.sqrt(4096))
  # SimCLR v2's head on ResNet-50: 2048-2048-128; v1's has one hidden layer.
  method = methods.build_method(config)
  image = jax.ShapeDtypeStruct((1, 224, 224, 3), np.float32)
  params = jax.eval_shape(lambda x: method.init(jax.random.PRNGKey(0), {"image": x})[0]["params"], image)
  kernels = [nn.unbox(params["head"][f"layer_{i}"]["kernel"]).shape for i in range(3)]
  assert kernels == [(2048, 2048), (2048, 2048), (2048, 128)]
  # torchvision's ResNet-50 has 25,557,032 parameters, 2,049,000 of them in its 1000-class fc layer.
  assert sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params["encoder"])) == 25_557_032 - 2_049_000
  assert load_config("simclr_resnet50", "head=v1").method.head.num_layers == 2


def test_cli_run_writes_checkpoints_and_resumes_exactly(cli_run, tmp_path):
  assert sorted(int(p.name) for p in (cli_run / "checkpoints").iterdir()) == [1, 2, 3, 4, 5, 6]
  logged = helpers.rows(cli_run)
  assert all(0 <= logged[step]["contrastive_accuracy"] <= 1 and logged[step]["loss"] > 0 for step in logged)
  # A step moves every parameter and every BatchNorm statistic, the head's (all three layers) included.
  first, second = helpers.read_state(cli_run, 1), helpers.read_state(cli_run, 2)
  trained = [name for name in first if name.startswith(("['params']", "['model_state']"))]
  assert any("['batch_stats']['head']['bn_2']" in name for name in trained)
  assert all(not np.array_equal(first[name], second[name]) for name in trained)
  helpers.assert_resumes_exactly(CONFIG, cli_run, tmp_path)


def test_eight_devices_train_as_one(cli_run, tmp_path):
  """The batch split over 8 devices: the same losses, parameters and BatchNorm statistics (the head's and the
  encoder's, over the global batch)."""
  helpers.train_on_eight_devices(CONFIG, tmp_path / "eight")
  helpers.assert_same_steps(tmp_path / "eight", cli_run)


def test_local_recipe_trains_from_the_command_line_on_a_tfds_dataset(tmp_path):
  """Two steps of configs/simclr_resnet50.py:local (ResNet-50 of width 8, 32 px, batch 8) on a 24-image TFDS
  dataset in the array_record format, from the command line, as a user with ImageNet prepared would run it."""
  data_dir = str(tmp_path / "tfds")
  SslxTinyRgb(data_dir=data_dir, file_format="array_record").download_and_prepare()
  config = load_config("simclr_resnet50", "local")
  assert (config.model.variant, config.model.width, config.data.image_size, config.batch_size) == ("50", 8, 32, 8)
  result = subprocess.run(
      [sys.executable, "-m", "sslx.main", "--config=configs/simclr_resnet50.py:local", f"--workdir={tmp_path / 'run'}",
       "--config.data.dataset=sslx_tiny_rgb", f"--config.data.data_dir={data_dir}", "--config.total_steps=2",
       "--config.monitor.every_steps=0", "--config.log_every_steps=1"],
      env=helpers.env(), cwd=helpers.REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "done: step 2" in result.stdout
  losses = [row["loss"] for row in helpers.rows(tmp_path / "run").values()]
  assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)


def test_evaluation_refuses_to_pick_a_network_simclr_does_not_have(cli_run):
  with pytest.raises(ValueError, match=r"config\.embed_from='target': the simclr run .* has one representation"):
    eval_run.restored_run(str(cli_run), embed_from="target")
