"""One run per workdir: the lock file, its stale takeover, and two launches on one workdir."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from sslx import run_lock
from sslx import train
from train_helpers import logged_losses, tiny_run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_lock(workdir, **holder):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, run_lock.LOCK_NAME), "w", encoding="utf-8") as f:
    json.dump({"host": socket.gethostname(), "started": time.time(), **holder}, f)


@pytest.fixture
def live_process():
  process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
  yield process
  process.kill()
  process.wait()


def _dead_pid():
  process = subprocess.Popen([sys.executable, "-c", "pass"])
  process.wait()
  return process.pid


def test_lock_names_its_holder_and_is_released(tmp_path):
  with run_lock.WorkdirLock(str(tmp_path)) as lock:
    with open(lock.path, encoding="utf-8") as f:
      holder = json.load(f)
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(run_lock.WorkdirLockedError, match=rf"in use by another run \(host .*, PID {os.getpid()}"):
      run_lock.WorkdirLock(str(tmp_path)).acquire()
  assert not os.path.exists(lock.path)


def test_a_second_run_fails_at_once_naming_the_holder(tmp_path, live_process, monkeypatch):
  _write_lock(tmp_path, pid=live_process.pid)
  monkeypatch.setattr(train, "_Run", lambda *args: pytest.fail("the data was loaded"))
  with pytest.raises(run_lock.WorkdirLockedError, match=rf"PID {live_process.pid}"):
    train.train(tiny_run_config(), str(tmp_path))
  assert os.path.exists(tmp_path / run_lock.LOCK_NAME)  # still the holder's


def test_a_reused_pid_is_not_mistaken_for_the_holder(tmp_path, live_process):
  _write_lock(tmp_path, pid=live_process.pid, start_ticks="1")  # same PID, another process's start time
  messages = []
  with run_lock.WorkdirLock(str(tmp_path), warn=messages.append):
    pass
  assert "taking over the lock of a run that is gone" in messages[0]


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, capsys):
  pid = _dead_pid()
  _write_lock(tmp_path, pid=pid)
  train.train(tiny_run_config(total_steps=2), str(tmp_path))
  assert f"taking over the lock of a run that is gone (host {socket.gethostname()}, PID {pid}" in capsys.readouterr().out
  assert not os.path.exists(tmp_path / run_lock.LOCK_NAME)


def test_a_lock_from_another_host_says_how_to_remove_it(tmp_path):
  _write_lock(tmp_path, pid=1, host="other-host")
  with pytest.raises(run_lock.WorkdirLockedError, match=r"host other-host.*if that run is gone, delete .*run.lock"):
    run_lock.WorkdirLock(str(tmp_path)).acquire()


def test_two_identical_runs_started_together_on_one_workdir(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  command = [sys.executable, "-m", "sslx.main", "--config=configs/mae_fashion_mnist.py:test",
             f"--workdir={tmp_path}", "--config.checkpoint.every_steps=1", "--config.checkpoint.max_to_keep=3",
             "--config.monitor.every_steps=0"]
  processes = [subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
  results = [(process.wait(timeout=600), *process.communicate()) for process in processes]
  codes = sorted(code for code, _, _ in results)
  assert codes == [0, 1], results
  _, _, refused_err = next(result for result in results if result[0] == 1)
  assert refused_err.strip().count("\n") == 0 and "in use by another run" in refused_err, refused_err
  steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
  assert steps == [4, 5, 6]
  with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
    logged_steps = [json.loads(line)["step"] for line in f]
  assert len(logged_steps) == len(set(logged_steps)) and sorted(logged_losses(tmp_path)) == [1, 2, 4, 6]
