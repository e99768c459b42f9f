"""configs/eval.py: every argument builds a valid config; the ImageNet ones hold the published recipes and
run."""
import json
import re

import numpy as np
import pytest
from PIL import Image

from sslx import config as config_lib
from sslx import recipes
from sslx.evaluate import linear_probe
from sslx.evaluate import run
from test_configs import SslxTinyRgb, load_config

ARGS = ["knn", "linear_probe", "imagenet_knn", "imagenet_linear_probe"]


# 'name,local' is the config-argument convention; 'name:local' is the older spelling, still accepted.
@pytest.mark.parametrize("arg", [None, *ARGS, *(f"{arg}{sep}local" for sep in ",:" for arg in ARGS)])
def test_every_argument_builds_a_valid_locked_config(arg):
  config = load_config("eval", arg) if arg else load_config("eval")
  config_lib.validate_eval_config(config.eval)
  assert config.task == re.split("[,:]", arg or "knn")[0].removeprefix("imagenet_")
  assert config.init_from is None
  # None: the pooling of the run evaluated (or the encoder's default for a random one).
  assert config.model.pooling is None
  with pytest.raises(AttributeError):
    config.eval.typo = 1
  if arg and arg.endswith("local"):
    # Small enough for a CPU, and every k fits the bank.
    assert config.data.image_size <= 64 and config.data.num_workers == 0
    assert max(config.eval.knn_ks) <= config.eval.max_train_examples <= 10_000


def test_imagenet_configs_hold_the_published_recipes():
  knn = load_config("eval", "imagenet_knn")
  assert (knn.data.source, knn.data.dataset, knn.data.split, knn.data.eval_split) == (
      "tfds", "imagenet2012", "train", "validation")
  assert knn.data.image_size == 224
  assert knn.data.eval_crop_fraction == 224 / 256  # resize 256, centre crop 224
  assert knn.data.mean == recipes.IMAGENET_MEAN and knn.data.std == recipes.IMAGENET_STD
  assert knn.model.variant == "B/16" and knn.method.name == "mae"  # the random-init baseline's encoder
  # DINO's kNN: k = 20 and 200, T = 0.07, the whole training set as the bank.
  assert knn.eval.knn_ks == (20, 200) and knn.eval.knn_temperature == 0.07
  assert knn.eval.max_train_examples is None and knn.eval.batch_size == 1024
  probe = load_config("eval", "imagenet_linear_probe").eval
  # MAE's FINETUNE.md "Linear Probing": LARS, 90 epochs, effective batch 16384, blr 0.1, 10 warm-up epochs.
  assert (probe.probe, probe.probe_epochs, probe.probe_batch_size) == ("lars", 90, 16384)
  assert (probe.probe_base_lr, probe.probe_warmup_epochs) == (0.1, 10.0)


@pytest.mark.parametrize("arg, named", [
    ("imagenet", "'imagenet'"), ("knn:lokal", "'lokal'"), ("knn,lokal", "'lokal'"),
    ("imagenet_knn:local:local", "'local' is given twice"), ("finetune", "'finetune'")])
def test_unknown_arguments_are_named(arg, named):
  with pytest.raises(ValueError, match=named):
    load_config("eval", arg)


class SslxTinySeparableRgb(SslxTinyRgb):
  """SslxTinyRgb's sizes and labels, but each class is one colour (plus noise): a frozen random encoder
  separates the classes, so a kNN whose labels and features were misaligned would show."""

  def _generate_examples(self, n, seed):
    rng = np.random.default_rng(seed)
    colours = np.array([[230, 30, 30], [30, 230, 30], [30, 30, 230], [230, 230, 30]])
    for i in range(n):
      shape = (40, 52, 3) if i % 2 else (52, 40, 3)
      image = np.clip(colours[i % 4] + rng.integers(-20, 20, shape), 0, 255).astype(np.uint8)
      yield i, {"image": Image.fromarray(image), "label": i % 4}


@pytest.fixture(scope="module")
def tiny_tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  SslxTinySeparableRgb(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


@pytest.mark.parametrize("arg", ["imagenet_knn:local", "imagenet_linear_probe,local"])
def test_local_imagenet_eval_runs_on_a_tfds_dataset(tiny_tfds_dir, tmp_path, arg):
  config = load_config("eval", arg)
  config.data.update(dict(dataset="sslx_tiny_separable_rgb", data_dir=tiny_tfds_dir))
  # The local recipe's 3 steps barely move a LARS head off its random start; 100 (still well under a
  # second) reach an accuracy that says the probe learned.
  config.eval.update(dict(probe_epochs=100, probe_base_lr=10.0))
  results = run.evaluate(config, str(tmp_path))
  with open(tmp_path / "results.json", encoding="utf-8") as f:
    assert json.load(f) == {"task": config.task, "init_from": None, **results}
  if config.task == "knn":
    # 24 training images (6 per class) as the bank, 8 validation images: every neighbour vote is right.
    assert results["knn5_top1"] == 100 and results["knn20_top1"] == 100
    return
  # The same probe (LARS, batch 16 and 1 warm-up epoch from the local recipe), refitted here on the features
  # of the same random encoder: the command must score exactly what its settings describe.
  method, state = run.random_init(config, config.seed)
  train_x, train_y = run.method_features(method.embed, state, config.data, config.eval, "train")
  test_x, test_y = run.method_features(method.embed, state, config.data, config.eval, "validation")
  assert len(train_x) == 24 and len(test_x) == 8
  params, stats = linear_probe.train_linear_probe(train_x, train_y, 4, epochs=100, batch_size=16,
                                                  base_lr=10.0, warmup_epochs=1.0)
  assert results["linear_top1"] == 100 * linear_probe.evaluate_linear_probe(params, stats, test_x, test_y)
  # Chance is 25%; one colour per class is linearly separable even in a random encoder's features.
  assert results["linear_top1"] >= 75
