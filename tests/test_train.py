"""The generic training loop end to end on the real Fashion-MNIST files, with a tiny MAE."""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

from sslx import train
from train_helpers import logged_losses, tiny_run_config
from multiprocess_helpers import REPO, cpu_env

HELPER = os.path.join(REPO, "tests", "train_helpers.py")
SHARDED_GRADIENTS = os.path.join(REPO, "tests", "sharded_gradients.py")


def _train_in_subprocess(workdir, params_path, num_devices=1, **overrides):
  pairs = [f"{key}={value}" for key, value in overrides.items()]
  subprocess.run([sys.executable, HELPER, str(workdir), str(params_path), *pairs], env=cpu_env(num_devices),
                 check=True, cwd=REPO, capture_output=True, text=True)
  return dict(np.load(params_path))


def test_quickstart_cli_writes_checkpoint_metrics_and_pictures(tmp_path):
  workdir = tmp_path / "quick"
  result = subprocess.run(
      [sys.executable, "-m", "sslx.main", "--config=configs/mae_fashion_mnist.py:test", f"--workdir={workdir}"],
      env=cpu_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "img/s" in result.stdout and "done: step 6" in result.stdout
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
  assert sorted(os.listdir(workdir / "pictures")) == ["step_0000003.png", "step_0000006.png"]
  assert sorted(logged_losses(workdir)) == [1, 2, 4, 6]
  assert glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*"))


def test_loss_falls_and_run_is_reproducible(tmp_path):
  _, first = train.train(tiny_run_config(total_steps=30, **{"checkpoint.every_steps": 30}), str(tmp_path / "a"))
  losses = logged_losses(tmp_path / "a")
  assert np.mean([losses[s] for s in range(26, 31)]) < 0.9 * np.mean([losses[s] for s in range(1, 6)])
  train.train(tiny_run_config(total_steps=30, **{"checkpoint.every_steps": 30}), str(tmp_path / "b"))
  assert logged_losses(tmp_path / "b") == losses
  assert first["loss"] == losses[30]


def test_resume_after_kill_continues_exactly(tmp_path):
  uninterrupted = tmp_path / "uninterrupted"
  train.train(tiny_run_config(), str(uninterrupted))
  expected = logged_losses(uninterrupted)

  killed = tmp_path / "killed"
  process = subprocess.Popen([sys.executable, HELPER, str(killed), str(tmp_path / "unused.npz")],
                             env=cpu_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not os.path.exists(killed / "checkpoints" / "4" / "commit_success.txt") and process.poll() is None:
    assert time.time() < deadline
    time.sleep(0.05)
  if process.poll() is None:
    process.send_signal(signal.SIGKILL)
  process.wait()
  # Whatever the process got to before the kill, the disk now says: "died right after saving step 4".
  for step in os.listdir(killed / "checkpoints"):
    if step.isdigit() and int(step) > 4:
      shutil.rmtree(killed / "checkpoints" / step)

  train.train(tiny_run_config(), str(killed))
  resumed = logged_losses(killed)
  assert [resumed[step] for step in (5, 6)] == [expected[step] for step in (5, 6)]
  # Rows the killed run logged past step 4 were dropped: each step is in the log once.
  with open(killed / "metrics.jsonl", encoding="utf-8") as f:
    steps = [json.loads(line)["step"] for line in f]
  assert len(steps) == len(set(steps)) and set(steps) >= set(range(1, 7))
  assert _tensorboard_steps(killed / "tensorboard", "loss") == list(range(1, 7))


def _tensorboard_steps(logdir, tag):
  """The steps TensorBoard shows for ``tag``, after it applied the purges of resumed runs."""
  from tensorboard.backend.event_processing import event_multiplexer  # pylint: disable=g-import-not-at-top
  multiplexer = event_multiplexer.EventMultiplexer({"run": str(logdir)}, purge_orphaned_data=True)
  multiplexer.Reload()
  return [event.step for event in multiplexer.Scalars("run", tag)]


def test_rerunning_a_finished_run_keeps_its_results(tmp_path, capsys):
  _, last = train.train(tiny_run_config(total_steps=2), str(tmp_path))
  with open(tmp_path / "results.json", encoding="utf-8") as f:
    written = f.read()
  assert json.loads(written)["last"]["loss"] == last["loss"]
  state, again = train.train(tiny_run_config(total_steps=2), str(tmp_path))
  assert "already finished: step 2/2" in capsys.readouterr().out
  assert int(state.step) == 2 and again == last
  with open(tmp_path / "results.json", encoding="utf-8") as f:
    assert f.read() == written


def _assert_same_first_step(one_rows, eight_rows):
  (one_monitor, one_row), (eight_monitor, eight_row) = one_rows, eight_rows
  assert one_row["step"] == eight_row["step"] == 1
  for key in ("loss", "grad_norm", "param_norm", "probe/loss"):
    np.testing.assert_allclose(eight_row[key], one_row[key], rtol=1e-6, err_msg=key)
  # The step-0 monitor report (kNN on sharded feature extraction, diagnostics) is the same on 8 devices.
  assert one_monitor["step"] == 0 and one_monitor.keys() == eight_monitor.keys()
  for key in one_monitor:
    np.testing.assert_allclose(eight_monitor[key], one_monitor[key], rtol=1e-4, err_msg=key)


def _assert_close_params(got, expected):
  assert got.keys() == expected.keys()
  for name in expected:
    # Adam's step is lr * m / (sqrt(v) + 1e-8): for the few entries whose true gradient is ~1e-9 (the key
    # bias, which softmax ignores, is exactly 0) float32 reduction order decides up to ~lr/10 of each step.
    # The gradients themselves are compared tightly in test_sharded_gradients_match_one_device.
    np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=5e-4, err_msg=name)


def test_sharded_gradients_match_one_device():
  result = subprocess.run([sys.executable, SHARDED_GRADIENTS, "{}", "1,2,8"], env=cpu_env(8), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "gradients match" in result.stdout


def _metrics_rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_eight_devices_give_the_steps_of_one_and_a_run_resumes_on_another_device_count(tmp_path):
  """Steps 1-4 on 1 device and on 8 devices (data 2 x FSDP 4) agree; the 8-device workdir, cut back to
  step 2, then resumes on 1 device and ends where the 1-device run did."""
  reference = tmp_path / "reference"
  expected = _train_in_subprocess(reference, tmp_path / "reference.npz", num_devices=1, total_steps=4)
  moved = tmp_path / "moved"
  eight = _train_in_subprocess(moved, tmp_path / "moved8.npz", num_devices=8, total_steps=4,
                               **{"parallel.fsdp": 4})
  _assert_same_first_step(*(_metrics_rows(workdir)[:2] for workdir in (reference, moved)))
  np.testing.assert_allclose(list(logged_losses(moved).values()), list(logged_losses(reference).values()),
                             rtol=1e-5)
  _assert_close_params(eight, expected)

  shutil.rmtree(moved / "checkpoints" / "4")  # as if the 8-device job had stopped after saving step 2
  resumed = _train_in_subprocess(moved, tmp_path / "moved1.npz", num_devices=1, total_steps=4)
  losses, reference_losses = ([row for row in _metrics_rows(workdir) if "loss" in row] for workdir in (moved, reference))
  assert [row["step"] for row in losses[-2:]] == [3, 4]  # logged by the resumed run
  np.testing.assert_allclose([r["loss"] for r in losses[-2:]], [r["loss"] for r in reference_losses[2:4]],
                             rtol=1e-5)
  _assert_close_params(resumed, expected)
