"""The kNN / linear-probe commands and the report after pretraining, on the real Fashion-MNIST files."""
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sslx import models
from sslx import recipes
from sslx import train
from sslx.data import sources
from sslx.evaluate import knn
from sslx.evaluate import linear_probe
from sslx.evaluate import run
from sslx.methods import build_method
from train_helpers import tiny_run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BANK = 2000  # training examples of the report's kNN bank and probe: 20 whole evaluation batches of 100


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("pretrained"))
  config = tiny_run_config(total_steps=4, **{"eval.max_train_examples": BANK})
  state, _ = train.train(config, workdir)
  return config, workdir, state


def fashion_mnist_pixels(split, data_config, limit=None):
  """``(features, labels)``: each image's pixels, normalised by the data config's mean and std and flattened,
  read straight from the IDX files (16-byte header for images, 8 for labels) without the input pipeline."""
  prefix = {"train": "train", "test": "t10k"}[split]
  with gzip.open(os.path.join(sources.DEFAULT_IDX_DIR, f"{prefix}-images-idx3-ubyte.gz")) as f:
    images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28 * 28)[:limit]
  with gzip.open(os.path.join(sources.DEFAULT_IDX_DIR, f"{prefix}-labels-idx1-ubyte.gz")) as f:
    labels = np.frombuffer(f.read(), np.uint8, offset=8)[:limit]
  (mean,), (std,) = data_config.mean, data_config.std
  return ((images / 255.0 - mean) / std).astype(np.float32), labels.astype(np.int32)


def test_report_after_pretraining_compares_with_raw_pixels_and_a_random_encoder(pretrained, capsys):
  config, workdir, state = pretrained
  rows = run.compare_with_baselines(config, workdir, build_method(config),
                                    (state.variables, state.method_state))
  assert list(rows) == ["raw pixels", "random init", "pretrained (mae)"]
  for values in rows.values():
    # Chance is 10% on Fashion-MNIST: labels and features that were misaligned would land there.
    assert 40 < values["knn20_top1"] <= 100 and 40 < values["linear_top1"] <= 100
    assert values["knn20_top1"] <= values["knn20_top5"]
  printed = capsys.readouterr().out
  assert "kNN top-1 (k=20)" in printed and "linear top-1" in printed
  lines = printed.splitlines()
  for name, values in rows.items():
    line = next(line for line in lines if line.startswith(name))
    assert f"{values['knn20_top1']:.2f}%" in line and f"{values['linear_top1']:.2f}%" in line
  with open(os.path.join(workdir, "eval_after_pretraining.json"), encoding="utf-8") as f:
    assert json.load(f) == rows

  # The raw-pixel row is the same protocol on the pixels themselves, computed here without the pipeline.
  train_x, train_y = fashion_mnist_pixels("train", config.data, BANK)
  test_x, test_y = fashion_mnist_pixels("test", config.data)
  extracted_x, extracted_y = run.method_features(run.pixel_embed, ({}, {}), config.data, config.eval, "test")
  np.testing.assert_array_equal(extracted_y, test_y)
  np.testing.assert_allclose(extracted_x, test_x, rtol=0, atol=1e-5)
  pixels = rows["raw pixels"]
  accuracy = knn.knn_accuracies(train_x, train_y, test_x, test_y, 10, ks=(20, 200),
                                temperature=config.eval.knn_temperature)
  # Float32 rounding of the normalisation may at most flip a near-tie or two among 10k test images.
  assert pixels["knn20_top1"] == pytest.approx(100 * accuracy[20]["top1"], abs=0.03)
  assert pixels["knn200_top1"] == pytest.approx(100 * accuracy[200]["top1"], abs=0.03)
  head = linear_probe.fit_logistic_regression(train_x, train_y, 10, l2=config.eval.probe_l2)
  assert pixels["linear_l2"] == head["l2"]
  assert pixels["linear_top1"] == pytest.approx(
      100 * linear_probe.evaluate_logistic_regression(head, test_x, test_y), abs=0.05)


def test_evaluation_pooling_overrides_the_runs(pretrained):
  config, workdir, state = pretrained
  images = np.random.RandomState(0).randn(4, 28, 28, 1).astype(np.float32)
  encoder = models.encoder_from_config(config.model)
  _, aux = encoder.apply({"params": state.params["encoder"]}, images, train=False)
  # The run trained with the encoder's default pooling, its class token.
  for pooling, expected in ((None, aux["cls_token"]), ("mean", aux["patch_tokens"].mean(axis=1))):
    run_config, method, restored = run.restored_run(workdir, pooling=pooling)
    assert run_config.model.pooling == pooling
    np.testing.assert_allclose(method.embed(*restored, images), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("task, key, flags", [
    ("knn", "knn20_top1", ()), ("linear_probe", "linear_top1", ("--config.model.pooling=mean",))])
def test_eval_commands_read_the_pretraining_run(pretrained, tmp_path, task, key, flags):
  _, workdir, _ = pretrained
  result = subprocess.run(
      [sys.executable, "-m", "sslx.main", f"--config=configs/eval.py:{task},local",
       f"--config.init_from={workdir}", f"--workdir={tmp_path}", "--config.eval.knn_ks=(20,)", *flags],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"Encoder from {workdir}/checkpoints/4" in result.stdout
  with open(tmp_path / "results.json", encoding="utf-8") as f:
    results = json.load(f)
  assert results["task"] == task and results["init_from"] == workdir and 40 < results[key] <= 100
  # The label-free diagnostics of the held-out features are reported too (width 32: rank at most 32).
  assert 1 < results["diag/rankme"] <= 32 and results["diag/std"] > 0 and results["diag/collapsed"] == 0


def eval_config(task="knn"):
  return run.eval_task_config(task, recipes.mae_fashion_mnist())


def test_eval_of_a_workdir_without_a_run_is_a_clear_error(tmp_path):
  config = eval_config()
  config.init_from = str(tmp_path)
  with pytest.raises(ValueError, match="is not the --workdir of an sslx run"):
    run.evaluate(config, str(tmp_path / "out"))
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(FileNotFoundError, match="holds no config.json"):
    run.evaluate(config, str(tmp_path / "out"))


def test_an_evaluation_reads_one_encoder(pretrained, tmp_path):
  _, workdir, _ = pretrained
  config = eval_config()
  config.init_from = ((workdir, "encoder", "encoder"), (workdir, "encoder", "encoder"))
  with pytest.raises(ValueError, match="an evaluation reads one run's encoder"):
    run.evaluate(config, str(tmp_path))


def test_bad_eval_settings_are_named(pretrained, tmp_path):
  config = eval_config()
  config.eval.probe = "sgd"
  with pytest.raises(ValueError, match="config.eval.probe='sgd'"):
    run.evaluate(config, str(tmp_path))
  # Pooling is the encoder's: named for a random encoder and for a pretrained run's alike.
  config = eval_config()
  config.model.pooling = "max"
  with pytest.raises(ValueError, match="config.model.pooling='max'"):
    run.evaluate(config, str(tmp_path))
  config.init_from = pretrained[1]
  with pytest.raises(ValueError, match="config.model.pooling='max'"):
    run.evaluate(config, str(tmp_path))
