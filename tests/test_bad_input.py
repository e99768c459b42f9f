"""Bad input stops a run with an error naming the key or file, before anything is compiled."""
import os
import re
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sslx import checks
from sslx import config as config_lib
from sslx import recipes
from sslx import step_metrics
from sslx import train
from train_helpers import tiny_run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _never_compile(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError("compiled before the bad input was reported")
  monkeypatch.setattr(jax, "jit", fail)


def test_unknown_config_key_on_the_command_line_is_named(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "sslx.main", "--config=configs/mae_fashion_mnist.py:test", f"--workdir={tmp_path}",
       "--config.method.mask_ration=0.5"], cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "unknown config key 'method.mask_ration' (did you mean 'method.mask_ratio' or 'method.mask_ratio_end' or "
      "'method.mask_strategy'?)"]


def test_unknown_config_key_in_a_config_file_is_named():
  config = tiny_run_config()
  with pytest.raises(AttributeError, match="mask_ration"):
    config.method.mask_ration = 0.5


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.1])
def test_mask_ratio_outside_the_open_unit_interval(tmp_path, monkeypatch, ratio):
  _never_compile(monkeypatch)
  with pytest.raises(ValueError, match="config.method.mask_ratio"):
    train.train(tiny_run_config(**{"method.mask_ratio": ratio}), str(tmp_path))


def test_mask_ratio_that_leaves_no_visible_patch_names_the_largest_allowed(tmp_path, monkeypatch):
  _never_compile(monkeypatch)
  patch_4 = {"model.variant": "Ti/4"}  # 28x28 images: 49 patches, 1 visible below 1 - 1/49
  with pytest.raises(ValueError, match=r"config.method.mask_ratio=0.99 leaves no visible patch of the 49 "
                                       r"patches .*largest ratio allowed is 0.9795918367346939 "
                                       r"\(1 - 1/49\)$"):
    train.train(tiny_run_config(**patch_4, **{"method.mask_ratio": 0.99}), str(tmp_path))
  checks.validate_run_config(tiny_run_config(**patch_4, **{"method.mask_ratio": 0.9795918367346939}))
  with pytest.raises(ValueError, match=r"config.method.mask_ratio=1e-17 masks none of the 49 patches"):
    checks.validate_run_config(tiny_run_config(**patch_4, **{"method.mask_ratio": 1e-17}))


def _notes(root):
  path = root / "notes.txt"
  path.write_text("not a folder")
  return path


@pytest.mark.parametrize("make_workdir, message", [
    (lambda root: "", r"^--workdir='' is empty"),
    (lambda root: "  ", r"^--workdir='  ' is empty"),
    (lambda root: str(_notes(root)), r"notes.txt' is a file; it must be a folder"),
    (lambda root: str(_notes(root) / "run"), r"notes.txt/run' lies under the file .*notes.txt;"),
])
def test_bad_workdir_is_named_before_anything_is_made(tmp_path, monkeypatch, make_workdir, message):
  monkeypatch.chdir(tmp_path)
  _never_compile(monkeypatch)
  workdir = make_workdir(tmp_path)
  before = sorted(os.listdir(tmp_path))
  with pytest.raises(ValueError, match=message):
    checks.validate_workdir(workdir)
  with pytest.raises(ValueError, match=message):
    train.train(tiny_run_config(), workdir)
  assert sorted(os.listdir(tmp_path)) == before
  checks.validate_workdir(str(tmp_path / "new" / "run"))  # a folder that can be made is fine, and not made
  assert sorted(os.listdir(tmp_path)) == before


def test_empty_workdir_on_the_command_line_is_one_line_and_makes_nothing(tmp_path):
  # Needs sslx.main to print a checks.ConfigError as one line (no traceback).
  config = os.path.join(REPO, "configs", "mae_fashion_mnist.py")
  result = subprocess.run([sys.executable, "-m", "sslx.main", f"--config={config}:test", "--workdir="],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
  lines = result.stderr.strip().splitlines()
  assert result.returncode != 0 and len(lines) == 1, result.stderr
  assert "--workdir='' is empty" in lines[0]
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("overrides, named", [
    ({"eval.every_epochs": 1.0}, r"config.eval.every_epochs=1.0 need\(s\) a held-out split"),
    ({"eval.after_pretrain": True}, r"config.eval.after_pretrain=True need\(s\) a held-out split"),
    ({"checkpoint.best_metric": "eval/top1"}, r"config.checkpoint.best_metric='eval/top1' need\(s\) a"),
])
def test_held_out_settings_need_an_eval_split(tmp_path, monkeypatch, overrides, named):
  _never_compile(monkeypatch)
  with pytest.raises(ValueError, match=named + ".*config.data.eval_split is None"):
    train.train(tiny_run_config(**{"data.eval_split": None, **overrides}), str(tmp_path))


def test_supervised_recipe_without_eval_split_names_both_of_its_held_out_keys(tmp_path, monkeypatch):
  _never_compile(monkeypatch)
  config = recipes.supervised_resnet_fashion_mnist()
  config.data.eval_split = None
  with pytest.raises(ValueError, match=r"config.eval.every_epochs=1.0, config.checkpoint.best_metric="
                                       r"'eval/top1' need\(s\) a held-out split"):
    train.train(config_lib.finalize(config), str(tmp_path))


def test_image_size_not_divisible_by_patch(tmp_path, monkeypatch):
  _never_compile(monkeypatch)
  with pytest.raises(ValueError, match=r"config.data.image_size=30 .*patch size 7"):
    train.train(tiny_run_config(**{"data.image_size": 30}), str(tmp_path))


@pytest.mark.parametrize("key, value, message", [
    ("model.name", "swin", r"config.model.name='swin' is not one of \('resnet', 'vit'\)"),
    ("optimizer.name", "adam", r"config.optimizer.name='adam' is not one of"),
    ("optimizer.wd_mults", (("(", 1.0),), r"config.optimizer.wd_mults"),
    ("data.views", ("random_resized_crop(28)", "random_resized_crop(28)"), r"consumes one view"),
    ("init_from", (("a", "b"),), r"config.init_from\[0\]"),
])
def test_bad_sections_are_named_before_anything_compiles(tmp_path, monkeypatch, key, value, message):
  _never_compile(monkeypatch)
  with pytest.raises(ValueError, match=message):
    train.train(tiny_run_config(**{key: value}), str(tmp_path))


def test_batch_not_divisible_by_device_count(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "device_count", lambda: 8)
  _never_compile(monkeypatch)
  with pytest.raises(ValueError, match=r"config.batch_size=12 .*device count \(8\)"):
    train.train(tiny_run_config(batch_size=12), str(tmp_path))


def test_workdir_with_a_checkpoint_of_another_model(tmp_path, monkeypatch):
  train.train(tiny_run_config(total_steps=2), str(tmp_path))
  _never_compile(monkeypatch)
  with pytest.raises(ValueError, match=r"(?s)checkpoints/2 belongs to another model.*encoder"):
    train.train(tiny_run_config(total_steps=4, **{"model.width": 48}), str(tmp_path))


def test_non_finite_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path):
  # Warm-up makes step 1's learning rate 0, so step 1 is good and saved; step 2's huge one blows up.
  config = tiny_run_config(total_steps=12, **{"optimizer.base_lr": 1e30, "checkpoint.every_steps": 1,
                                              "schedule.warmup_epochs": 4 / 3750})
  with pytest.raises(step_metrics.NonFiniteLossError, match=r"at step (\d+); stopping") as error:
    train.train(config, str(tmp_path))
  bad_step = int(re.search(r"at step (\d+)", str(error.value)).group(1))
  kept = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
  assert kept and max(kept) < bad_step
  last_good = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / str(max(kept)) / "state")
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(last_good["params"]))
