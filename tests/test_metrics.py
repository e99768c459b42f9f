"""JSONL, progress line and TensorBoard files, the latter read back by TensorBoard's own reader."""
import io
import json

import numpy as np
import pytest

from sslx import metrics


def test_tensorboard_scalars_read_back(tmp_path):
  event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
  writer = metrics.TensorBoardWriter(str(tmp_path))
  for step in (10, 20, 30):
    writer.write_scalars(step, {"loss": 1.0 / step, "lr": 1e-3 * step})
  writer.close()
  accumulator = event_accumulator.EventAccumulator(str(tmp_path))
  accumulator.Reload()
  assert set(accumulator.Tags()["scalars"]) == {"loss", "lr"}
  losses = accumulator.Scalars("loss")
  assert [event.step for event in losses] == [10, 20, 30]
  np.testing.assert_allclose([event.value for event in losses], [0.1, 0.05, 1 / 30], rtol=1e-6)


def test_tensorboard_writers_in_one_second_keep_both_files(tmp_path):
  # A resume that reopens the log directory at once must not truncate the first writer's file.
  event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
  for step in (1, 2):
    writer = metrics.TensorBoardWriter(str(tmp_path / "tb"))
    writer.write_scalars(step, {"loss": float(step)})
    writer.close()
  assert len(list((tmp_path / "tb").iterdir())) == 2
  accumulator = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
  accumulator.Reload()
  assert [event.step for event in accumulator.Scalars("loss")] == [1, 2]


def test_jsonl_lines(tmp_path):
  path = tmp_path / "m.jsonl"
  writer = metrics.JsonlWriter(str(path))
  writer.write(1, {"loss": 0.5})
  writer.write(2, {"loss": 0.25, "lr": 1e-4})
  writer.close()
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  assert rows == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25, "lr": 1e-4}]


def test_progress_line_reports_throughput_and_eta(monkeypatch):
  clock = iter([100.0, 102.0])
  monkeypatch.setattr(metrics.time, "time", lambda: next(clock))
  stream = io.StringIO()
  progress = metrics.ProgressLine(total_steps=100, batch_size=64, stream=stream)
  assert np.isnan(progress.report(10, {"loss": 1.0, "lr": 1e-3}))
  rate = progress.report(20, {"loss": 0.5, "lr": 2e-3})
  assert rate == pytest.approx(10 * 64 / 2.0)
  last = stream.getvalue().splitlines()[-1]
  assert "step 20/100 (20%)" in last and "loss 0.5" in last and "lr 2.00e-03" in last
  assert "320 img/s" in last and "ETA 0m16s" in last  # 80 steps * 64 images / 320 img/s
