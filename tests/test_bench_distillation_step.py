"""experiments/bench_distillation_step.py: its crop overrides, and sslx's side at the configs' :local sizes."""
import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import bench_distillation_step as bench  # experiments/ is not a package: on the path above


def test_dino_crop_overrides():
  options = bench.Options(method="dino", local=True, image_size=48, local_size=32, local_crops=3, depth=1)
  config = bench.build_config(options)
  assert bench.dino.crop_sizes(config) == [48, 48, 32, 32, 32]
  assert config.data.image_size == 48 and config.model.depth == 1 and config.model.dtype == "float32"
  assert [crop.shape for crop in bench.synthetic_crops(config)] == [(16, 48, 48, 3)] * 2 + [(16, 32, 32, 3)] * 3


@pytest.mark.parametrize("method, crops", [("dino", [32, 32, 16, 16]), ("mocov3", [32, 32])])
def test_sslx_step_record(method, crops, tmp_path):
  json_out = str(tmp_path / "bench.jsonl")
  options = bench.Options(method=method, batch_size=2, steps=1, warmup=0, peer="none", local=True, depth=1,
                          json_out=json_out)
  record = bench.run(options)
  assert record["crops"] == crops and record["dtype"] == "float32" and record["depth"] == 1
  assert "torch" not in record and record["sslx_over_torch"] is None
  assert record["sslx"]["images_per_s"] > 0 and math.isfinite(record["sslx"]["loss"])
  with open(json_out, encoding="utf-8") as f:
    assert [json.loads(line) for line in f] == [record]
