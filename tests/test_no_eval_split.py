"""``config.data.eval_split = None``: a run on a flat folder of unlabelled images, with no held-out split.

No kNN and no held-out scores; the monitor's label-free diagnostics read the training subset, and the pictures
show training images under the evaluation transform.
"""
import json
import os

import numpy as np
import pytest
from PIL import Image

from sslx import config as config_lib
from sslx import parallel
from sslx import monitors
from sslx import train
from sslx.data import pipeline
from sslx.evaluate import diagnostics
from sslx.evaluate import run as eval_run
from test_configs import load_config
from train_helpers import tiny_run_config


def _flat_folder(root, count=40):
  """``count`` grey PNGs of 32x30 pixels, directly in ``root`` (no class folders: every label is -1)."""
  root.mkdir()
  rng = np.random.default_rng(0)
  for i in range(count):
    Image.fromarray(rng.integers(0, 256, (32, 30), dtype=np.uint8)).save(root / f"{i:03d}.png")
  return str(root)


def test_a_flat_folder_trains_to_the_end_and_draws_pictures(tmp_path):
  config = tiny_run_config(**{"data.source": "folder", "data.data_dir": _flat_folder(tmp_path / "images"),
                              "data.eval_split": None})
  state, last = train.train(config, str(tmp_path / "run"))
  assert int(state.step) == config.total_steps and np.isfinite(last["loss"])
  assert sorted(os.listdir(tmp_path / "run" / "pictures")) == ["step_0000003.png", "step_0000006.png"]
  with open(tmp_path / "run" / "metrics.jsonl", encoding="utf-8") as f:
    names = set().union(*(json.loads(line) for line in f))
  assert "diag/std" in names  # the collapse watch needs no labels and no held-out split
  assert not any(name.startswith(("monitor/", "probe/", "eval/")) for name in names)


def test_pictures_come_from_the_eval_split_else_from_the_training_split_untransformed():
  data = pipeline.default_data_config()
  for split in ("test", "train"):
    expected = next(iter(pipeline.make_eval_loader(data, split=split, batch_size=4)))
    batch = pipeline.make_viz_batch(data, 4)
    assert sorted(batch) == ["image", "label"]
    np.testing.assert_array_equal(batch["image"], expected["image"])
    np.testing.assert_array_equal(batch["label"], expected["label"])
    data.eval_split = None


def test_monitor_without_eval_split_reports_only_training_diagnostics():
  config = tiny_run_config(**{"data.eval_split": None})
  monitor = monitors.RepresentationMonitor(config, eval_run.pixel_embed, parallel.create_mesh(1))
  assert monitor.num_classes == 10  # from the training labels: the online probe still trains
  report = monitor.report({}, {}, probe_params=None)
  assert sorted(report) == ["diag/collapsed", "diag/rankme", "diag/std", "diag/uniformity"]
  train_x, _ = eval_run.method_features(eval_run.pixel_embed, ({}, {}), config.data, config.eval, "train",
                                        config.monitor.knn_train_examples)
  assert report["diag/rankme"] == pytest.approx(diagnostics.summary(train_x)["rankme"], rel=1e-5)


def test_evaluation_commands_need_an_eval_split(tmp_path):
  config = load_config("eval", "knn")
  config.data.eval_split = None
  with pytest.raises(ValueError, match=r"config.task='knn' .*config.data.eval_split is None"):
    eval_run.evaluate(config, str(tmp_path))


def test_eval_split_is_a_string_that_can_be_none():
  data = config_lib.base_config().data
  assert data.eval_split == "test" and data.get_type("eval_split") is str
  data.eval_split = None
  data.eval_split = "validation"
  with pytest.raises(TypeError):
    data.eval_split = 3
