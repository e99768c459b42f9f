"""A BatchNorm encoder through the one loop: a ResNet-18 bundle trained, checkpointed and read by every
frozen-feature path from the command line; the same step and statistics on 1 and 8 devices."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from sslx import train
from multiprocess_helpers import REPO, cpu_env

CONFIG = "configs/supervised_fashion_mnist.py:test"


def _cli(*args, num_devices=1):
  result = subprocess.run([sys.executable, "-m", "sslx.main", *args], env=cpu_env(num_devices), cwd=REPO,
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _results(workdir):
  with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
    return json.load(f)


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
  """4 steps of the supervised ResNet-18 recipe from the command line, monitors on."""
  workdir = str(tmp_path_factory.mktemp("resnet"))
  _cli(f"--config={CONFIG}", f"--workdir={workdir}")
  return workdir


def test_training_logs_the_online_probe_and_monitor(resnet_run):
  rows = _rows(resnet_run)
  assert [row["step"] for row in rows if "monitor/knn20_top1" in row] == [0, 2, 4]
  assert all(np.isfinite(row["probe/loss"]) for row in rows if "loss" in row)
  assert rows[0]["diag/rankme"] > 1


@pytest.mark.parametrize("task, metric", [("knn", "knn20_top1"), ("linear_probe", "linear_top1")])
def test_evaluation_commands_read_the_resnet_run(resnet_run, tmp_path, task, metric):
  workdir = str(tmp_path / task)
  _cli(f"--config=configs/eval.py:{task}", f"--config.init_from={resnet_run}", f"--workdir={workdir}",
       "--config.eval.max_train_examples=500", "--config.eval.probe_l2=1e-3")
  assert 20 < _results(workdir)[metric] <= 100  # chance is 10%


def test_random_resnet_baseline_from_the_cli(tmp_path):
  workdir = str(tmp_path / "random")
  _cli("--config=configs/eval.py:knn,encoder=resnet18", f"--workdir={workdir}", "--config.model.width=8",
       "--config.eval.max_train_examples=500")
  results = _results(workdir)
  assert results["init_from"] is None and 20 < results["knn20_top1"] <= 100


def test_fine_tuning_starts_from_the_resnet_run(resnet_run, tmp_path):
  workdir = str(tmp_path / "ft")
  out = _cli(f"--config={CONFIG}", f"--config.init_from={resnet_run}", f"--workdir={workdir}")
  assert "encoder initialised from encoder of" in out
  assert np.isfinite(_results(workdir)["last"]["loss"])


def test_batch_statistics_are_updated_saved_and_restored(tmp_path):
  config = _config(total_steps=2)
  state, _ = train.train(config, str(tmp_path))
  stats = state.model_state["batch_stats"]["encoder"]["stem_bn"]
  assert float(np.abs(stats["mean"]).max()) > 0 and not np.allclose(stats["var"], 1.0)  # moved off their init
  restored = train._Run(_config(total_steps=2), str(tmp_path)).initial_state()
  assert jax.tree.structure(restored.model_state) == jax.tree.structure(state.model_state)
  jax.tree.map(np.testing.assert_array_equal, restored.model_state, state.model_state)


def _config(**overrides):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("supervised", os.path.join(REPO, "configs",
                                                                           "supervised_fashion_mnist.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("test")
  config.unlock()
  config.update(overrides)
  config.monitor.every_steps = 0
  return config


_ONE_STEP = """
import sys
import jax, numpy as np
sys.path.insert(0, "tests")
from test_resnet_training import _config
from sslx import train
config = _config(total_steps=1)
config.checkpoint.every_steps = 1
state, last = train.train(config, sys.argv[1])
leaves = jax.tree_util.tree_flatten_with_path(jax.device_get((state.params, state.model_state)))[0]
np.savez(sys.argv[2], loss=last["loss"], grad_norm=last["grad_norm"],
         **{jax.tree_util.keystr(path): leaf for path, leaf in leaves})
"""


def test_one_and_eight_devices_give_the_same_step_and_statistics(tmp_path):
  """8 devices as data 2 x FSDP 4: both mesh axes split the batch of the BatchNorm statistics."""
  def one_step(name, devices, fsdp=1):
    script = _ONE_STEP.replace("config.checkpoint.every_steps = 1",
                               f"config.checkpoint.every_steps = 1\nconfig.parallel.fsdp = {fsdp}")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / name), str(tmp_path / f"{name}.npz")],
                   env=cpu_env(devices), cwd=REPO, check=True, capture_output=True, text=True, timeout=900)
    return dict(np.load(tmp_path / f"{name}.npz"))

  one, eight = one_step("one", 1), one_step("eight", 8, fsdp=4)
  assert any("batch_stats" in key for key in one)
  assert one.keys() == eight.keys()
  for key in one:
    # SGD's first step is lr * g, so parameters differ from 1 device by float32 reduction order only.
    scale = float(np.abs(one[key]).max()) or 1.0
    np.testing.assert_allclose(eight[key], one[key], rtol=1e-5, atol=1e-6 * scale, err_msg=key)
