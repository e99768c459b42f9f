"""Training on two real `jax.distributed` CPU processes takes the steps of one process, and resumes exactly.

Two processes with one CPU device each train the tiny run of ``train_helpers.py``, each reading its half
of every global batch; the reference is one process with two (fake) CPU devices. Both have the same
``(2, 1)`` mesh and the same rows on each device, so each device computes the same thing and the
cross-device sums add the same two partial sums: the runs must agree bit for bit, and the test says so.
(Against one device the reductions split differently and agree only to ~1e-6, see test_train.py.)
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from multiprocess_helpers import REPO, cpu_env, run_processes, start_processes, wait_for

HELPER = os.path.join(REPO, "tests", "train_helpers.py")
# The representation monitor would double the time; its kNN over processes is test_multiprocess_eval's.
OVERRIDES = ("monitor.every_steps=0",)
TOTAL_STEPS = 6  # train_helpers.tiny_run_config: a checkpoint every 2 steps
RESUMED_FROM = 4


def _start_one_process(workdir, num_devices) -> subprocess.Popen:
  with open(f"{workdir}.log", "w", encoding="utf-8") as log:
    return subprocess.Popen([sys.executable, HELPER, str(workdir), os.path.join(workdir, "params.npz"), *OVERRIDES],
                            env=cpu_env(num_devices), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def train_command(workdir, params_dir, overrides=OVERRIDES):
  """``command(process_id)`` for `multiprocess_helpers.start_processes`: trains (or resumes) in ``workdir``;
  process ``i`` saves its final params to ``params_dir/params_<i>.npz``."""
  return lambda i: [sys.executable, HELPER, str(workdir), os.path.join(params_dir, f"params_{i}.npz"), *overrides]


def _train_two_processes(workdir, logs_dir, overrides=OVERRIDES):
  """Both processes' logs and final params, trained in (or resumed from) ``workdir``."""
  os.makedirs(logs_dir, exist_ok=True)
  logs = run_processes(train_command(workdir, logs_dir, overrides), logs_dir=logs_dir, env=cpu_env(num_devices=1))
  return logs, [dict(np.load(os.path.join(logs_dir, f"params_{i}.npz"))) for i in range(len(logs))]


def _metrics_rows(workdir) -> list[dict]:
  """metrics.jsonl without the throughput, which is the one value a rerun may change."""
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [{key: value for key, value in json.loads(line).items() if key != "images_per_s"} for line in f]


def _assert_same_params(got: dict, expected: dict) -> None:
  assert got.keys() == expected.keys()
  for name in expected:
    np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The uninterrupted run on one process with two devices, and on two processes with one device each."""
  root = tmp_path_factory.mktemp("runs")
  # Both at once: the two processes often wait for each other, and the machine has few cores.
  single = _start_one_process(root / "single", num_devices=2)
  try:
    logs, two_params = _train_two_processes(root / "two", root / "two_logs")
    single.wait(timeout=300)
  finally:
    single.kill()
  assert single.returncode == 0, (root / "single.log").read_text()[-3000:]
  single_params = dict(np.load(root / "single" / "params.npz"))
  return types.SimpleNamespace(single=root / "single", single_params=single_params, two=root / "two",
                               two_logs=logs, two_params=two_params)


def test_two_processes_log_the_metrics_of_one_process(runs):
  rows = _metrics_rows(runs.two)
  # Only the lead process writes metrics.jsonl: one row per step, though both processes share the workdir.
  assert [row["step"] for row in rows] == list(range(1, TOTAL_STEPS + 1))
  assert rows == _metrics_rows(runs.single)  # loss, gradient and parameter norms, online probe: exactly
  assert f"done: step {TOTAL_STEPS}" in runs.two_logs[0] and "done:" not in runs.two_logs[1]


def test_two_processes_end_with_the_parameters_of_one_process(runs):
  for params in runs.two_params:
    _assert_same_params(params, runs.single_params)


def test_two_processes_resume_from_the_checkpoint_they_saved_together(runs, tmp_path):
  # One checkpoint per step, written by both processes into one directory (not one per process).
  assert sorted(os.listdir(runs.two / "checkpoints"), key=int) == ["2", "4", "6"]
  # The workdir as if both processes had died right after saving step 4. (A shorter first run would not
  # do: its lr schedule, a function of total_steps, would differ from step 2 on.)
  resumed = tmp_path / "resumed"
  shutil.copytree(runs.two / "checkpoints" / str(RESUMED_FROM), resumed / "checkpoints" / str(RESUMED_FROM))
  logs, params = _train_two_processes(resumed, tmp_path / "logs")
  assert f"Resumed from {resumed / 'checkpoints'}/{RESUMED_FROM}" in logs[0]
  assert _metrics_rows(resumed) == _metrics_rows(runs.two)[RESUMED_FROM:]
  for process_params in params:  # both processes restored, or their copies of the parameters would differ
    _assert_same_params(process_params, runs.two_params[0])


def test_sigterm_to_one_process_stops_both_at_the_same_step_and_both_resume(tmp_path):
  steps = 40
  overrides = (*OVERRIDES, f"total_steps={steps}", "checkpoint.every_steps=50", "checkpoint.stop_check_every_steps=2")
  reference = subprocess.Popen(
      [sys.executable, HELPER, str(tmp_path / "single"), str(tmp_path / "single.npz"), *overrides],
      env=cpu_env(2), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  workdir, logs_dir = tmp_path / "two", tmp_path / "logs"
  os.makedirs(logs_dir)
  with start_processes(train_command(workdir, logs_dir, overrides), logs_dir=logs_dir,
                       env=cpu_env(num_devices=1)) as cluster:
    deadline = time.monotonic() + 300
    while "step 3/40" not in cluster.log(0):
      assert time.monotonic() < deadline and all(p.poll() is None for p in cluster.processes), cluster.log(0)
      time.sleep(0.05)
    cluster.processes[1].send_signal(signal.SIGTERM)  # the scheduler preempts one host only
    finished = wait_for(cluster)
  stops = [re.search(r"stopped by SIGTERM after step (\d+)/40", result.log) for result in finished]
  assert [result.returncode for result in finished] == [0, 0] and all(stops), [r.log[-2000:] for r in finished]
  stop_step = int(stops[0].group(1))
  assert int(stops[1].group(1)) == stop_step and stop_step % 2 == 0  # agreed at a check step
  assert sorted(os.listdir(workdir / "checkpoints")) == [str(stop_step)]

  _, params = _train_two_processes(workdir, tmp_path / "resumed_logs", overrides)
  assert reference.wait(timeout=300) == 0
  expected = dict(np.load(tmp_path / "single.npz"))
  for process_params in params:
    _assert_same_params(process_params, expected)
