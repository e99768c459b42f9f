"""experiments/bench_throughput.py on tiny configs: its records hold sane numbers; the batch search."""
import dataclasses
import json
import os
import sys

import jax
import pytest

from sslx import config as config_lib
from sslx.methods import finetune
from train_helpers import tiny_run_config

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import bench_throughput  # experiments/ is not a package: on the path above

FIELDS = ("method", "model", "batch_per_device", "devices", "dtype", "images_per_s", "step_ms", "compile_s",
          "memory_argument_bytes", "memory_output_bytes", "memory_temp_bytes", "memory_generated_code_bytes",
          "memory_peak_bytes_in_use", "model_flops_per_image", "xla_flops_per_image", "model_over_xla_flops",
          "mfu")
OPTIONS = bench_throughput.Options(steps=2, warmup_steps=1, config_name="tests:tiny")


def _tiny_finetune_config():
  config = finetune.finetune_config(tiny_run_config(), num_classes=10, batch_size=8, num_epochs=1,
                                    base_lr=1e-3, layer_decay=0.75, drop_path_rate=0.1,
                                    augmentation="random_resized_crop(28)|hflip")
  return config_lib.finalize(config)


def _check(record, method, batch_per_device):
  assert set(FIELDS) <= set(record)
  assert record["method"] == method and record["batch_per_device"] == batch_per_device
  assert record["devices"] == jax.device_count() and record["dtype"] == "float32"
  assert record["images_per_s"] > 0 and record["step_ms"] > 0 and record["compile_s"] > 0
  assert record["memory_argument_bytes"] > 0 and record["memory_temp_bytes"] >= 0
  assert record["flops_source"] == "analytic"
  assert 0.5 < record["model_over_xla_flops"] < 2.0, record
  assert record["mfu"] is None  # a CPU has no known peak


def test_mae_record(tmp_path, capsys):
  json_out = str(tmp_path / "bench.jsonl")
  options = dataclasses.replace(OPTIONS, json_out=json_out)
  [record] = bench_throughput.run(tiny_run_config(), options, [4])
  _check(record, "mae", 4)
  assert record["online_probe"] and record["probe_flops_per_image"] > 0
  with open(json_out, encoding="utf-8") as f:
    assert [json.loads(line) for line in f] == [record]
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == record


def test_finetune_record_and_mfu_against_a_given_peak():
  options = dataclasses.replace(OPTIONS, peak_tflops=1.0)
  [record] = bench_throughput.run(_tiny_finetune_config(), options, [4])
  assert record["method"] == "finetune" and not record["online_probe"]
  assert record["mfu"] == pytest.approx(record["model_tflops_per_s_per_device"] / 1.0)
  assert 0.5 < record["model_over_xla_flops"] < 2.0, record


@pytest.mark.parametrize("limit, start, cap, multiple, expected", [
    (37, 1, None, 1, 37), (37, 4, None, 8, 32), (37, 1, 20, 1, 20), (37, 64, None, 1, 37),
    (0, 1, None, 1, None), (1000, 3, 100, 4, 100)])
def test_search_max_batch(limit, start, cap, multiple, expected):
  tried = []

  def fits(batch):
    tried.append(batch)
    assert batch % multiple == 0 and (cap is None or batch <= cap)
    return batch <= limit

  assert bench_throughput.search_max_batch(fits, start, cap, multiple) == expected
  assert len(tried) <= 2 * max(limit, 1).bit_length() + 2


def test_find_max_batch_keeps_the_largest_run_and_every_try(monkeypatch):
  def measure(config, options):
    per_device = config.batch_size // jax.device_count()
    if per_device > 5:
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB")
    return {"batch_per_device": per_device, "images_per_s": float(per_device)}

  monkeypatch.setattr(bench_throughput, "measure", measure)
  record = bench_throughput.find_max_batch(tiny_run_config(), None, 1, OPTIONS)
  assert record["batch_per_device"] == 5
  assert [(t["batch_per_device"], t["fits"]) for t in record["max_batch_search"]] == [
      (1, True), (2, True), (4, True), (8, False), (6, False), (5, True)]


def test_other_errors_are_not_taken_for_out_of_memory(monkeypatch):
  def measure(config, options):
    raise RuntimeError("INVALID_ARGUMENT: shapes do not match")

  monkeypatch.setattr(bench_throughput, "measure", measure)
  with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):
    bench_throughput.find_max_batch(tiny_run_config(), None, 1, OPTIONS)
