"""Bad input stops a run with an error naming the key or file, before anything is compiled."""
import os
import re
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

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
      "unknown config key 'method.mask_ration' (did you mean 'method.mask_ratio'?)"]


def test_unknown_config_key_in_a_config_file_is_named():
  config = tiny_run_config()
  with pytest.raises(AttributeError, match="mask_ration"):
    config.method.mask_ration = 0.5


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.1])
def test_mask_ratio_outside_the_open_unit_interval(tmp_path, monkeypatch, ratio):
  _never_compile(monkeypatch)
  with pytest.raises(ValueError, match="config.method.mask_ratio"):
    train.train(tiny_run_config(**{"method.mask_ratio": ratio}), str(tmp_path))


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
  with pytest.raises(train.NonFiniteLossError, match=r"at step (\d+); stopping") as error:
    train.train(config, str(tmp_path))
  bad_step = int(re.search(r"at step (\d+)", str(error.value)).group(1))
  kept = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
  assert kept and max(kept) < bad_step
  last_good = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / str(max(kept)) / "state")
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(last_good["params"]))
