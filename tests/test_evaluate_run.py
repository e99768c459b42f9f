"""The kNN / linear-probe commands and the report after pretraining, on the real Fashion-MNIST files."""
import json
import os
import subprocess
import sys

import pytest

from sslx import train
from sslx.evaluate import run
from train_helpers import tiny_run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("pretrained"))
  config = tiny_run_config(total_steps=4)
  state, _ = train.train(config, workdir)
  return config, workdir, state


def test_report_after_pretraining_compares_with_a_random_encoder(pretrained, capsys):
  config, workdir, state = pretrained
  rows = run.compare_with_random_init(config, workdir, state.params["encoder"])
  assert list(rows) == ["random init", "pretrained (mae)"]
  for values in rows.values():
    # Chance is 10% on Fashion-MNIST: labels and features that were misaligned would land there.
    assert 40 < values["knn20_top1"] <= 100 and 40 < values["linear_top1"] <= 100
    assert values["knn20_top1"] <= values["knn20_top5"]
  printed = capsys.readouterr().out
  assert "kNN top-1 (k=20)" in printed and "random init" in printed and "pretrained (mae)" in printed
  with open(os.path.join(workdir, "eval_after_pretraining.json"), encoding="utf-8") as f:
    assert json.load(f) == rows


@pytest.mark.parametrize("task, key", [("knn", "knn20_top1"), ("linear_probe", "linear_top1")])
def test_eval_commands_read_the_pretraining_run(pretrained, tmp_path, task, key):
  _, workdir, _ = pretrained
  result = subprocess.run(
      [sys.executable, "-m", "sslx.main", f"--config=configs/eval.py:{task}", f"--config.init_from={workdir}",
       f"--workdir={tmp_path}", "--config.eval.knn_ks=(20,)"],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"Encoder from {workdir}/checkpoints/4" in result.stdout
  with open(tmp_path / "results.json", encoding="utf-8") as f:
    results = json.load(f)
  assert results["task"] == task and results["init_from"] == workdir and 40 < results[key] <= 100
  # The label-free diagnostics of the held-out features are reported too (width 32: rank at most 32).
  assert 1 < results["diag/rankme"] <= 32 and results["diag/std"] > 0 and results["diag/collapsed"] == 0


def test_eval_of_a_workdir_without_a_run_is_a_clear_error(tmp_path):
  config = run.eval_task_config("knn")
  config.init_from = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="holds no config.json"):
    run.evaluate(config, str(tmp_path / "out"))


def test_bad_eval_setting_is_named(tmp_path):
  config = run.eval_task_config("knn")
  config.eval.pooling = "max"
  with pytest.raises(ValueError, match="config.eval.pooling='max'"):
    run.evaluate(config, str(tmp_path))
