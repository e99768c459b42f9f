"""Preemption: SIGTERM, SIGINT and a time budget end a run with a checkpoint that the same command resumes."""
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sslx import preemption
from sslx import train
from train_helpers import logged_losses, tiny_run_config
from multiprocess_helpers import REPO, cpu_env

TOTAL_STEPS = 40


def _saved_steps(workdir):
  return sorted(int(name) for name in os.listdir(workdir / "checkpoints") if name.isdigit())


# --- StopRequests itself ------------------------------------------------------------------------------


def test_a_signal_becomes_a_stop_at_the_next_check_and_the_old_handlers_come_back():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.StopRequests(check_every_steps=3) as stops:
    assert stops.agreed_stop(3) is None
    os.kill(os.getpid(), signal.SIGTERM)
    assert stops.agreed_stop(4) is None  # not a check step: no collective, no decision
    assert stops.agreed_stop(6) == ("SIGTERM", 0)
  assert signal.getsignal(signal.SIGTERM) is before


def test_a_second_ctrl_c_interrupts_at_once():
  with preemption.StopRequests() as stops:
    os.kill(os.getpid(), signal.SIGINT)
    assert stops.agreed_stop(1) == ("SIGINT", 130)
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)


def test_another_process_signal_stops_this_one_too():
  # `agree` stands in for the all-gather: the other process saw SIGTERM, this one saw nothing.
  with preemption.StopRequests(agree=lambda code: max(code, 2)) as stops:
    assert stops.agreed_stop(1) == ("SIGTERM", 0)


def test_time_budget():
  now = [100.0]
  with preemption.StopRequests(max_minutes=1.0, clock=lambda: now[0]) as stops:
    now[0] += 59.0
    assert stops.agreed_stop(1) is None
    now[0] += 1.0
    assert stops.agreed_stop(2) == ("time limit", 0)


# --- whole runs, from the command line -------------------------------------------------------------


def _command(workdir, *extra):
  return [sys.executable, "-m", "sslx.main", "--config=configs/mae_fashion_mnist.py:test", f"--workdir={workdir}",
          f"--config.total_steps={TOTAL_STEPS}", "--config.checkpoint.every_steps=50", "--config.log_every_steps=1",
          "--config.monitor.every_steps=0", *extra]


def _final_state(workdir):
  return ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(TOTAL_STEPS) / "state")


def _assert_same_state(workdir, reference):
  jax.tree.map(np.testing.assert_array_equal, _final_state(workdir), reference)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """Final state and losses of the run that the interrupted ones must reproduce after resuming."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  subprocess.run(_command(workdir), env=cpu_env(), cwd=REPO, check=True, capture_output=True, timeout=600)
  return _final_state(workdir), logged_losses(workdir)


def _interrupted_run(workdir, signum):
  """Starts the run, signals it once it has trained a few steps; returns (returncode, output)."""
  process = subprocess.Popen(_command(workdir), env=cpu_env(), cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  while len(logged_losses(workdir) if os.path.exists(workdir / "metrics.jsonl") else ()) < 3:
    assert process.poll() is None and time.time() < deadline, process.stdout.read()[-3000:]
    time.sleep(0.05)
  process.send_signal(signum)
  out, _ = process.communicate(timeout=120)
  return process.returncode, out


@pytest.mark.parametrize("signum, exit_code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_signal_saves_the_current_step_and_the_same_command_resumes_exactly(tmp_path, uninterrupted, signum,
                                                                           exit_code):
  reference, losses = uninterrupted
  returncode, out = _interrupted_run(tmp_path, signum)
  assert returncode == exit_code, out[-3000:]
  stopped = re.search(rf"stopped by (SIGTERM|SIGINT) after step (\d+)/{TOTAL_STEPS}: checkpoint (\S+);", out)
  assert stopped and stopped.group(1) == signal.Signals(signum).name, out[-3000:]
  step = int(stopped.group(2))
  assert 3 <= step < TOTAL_STEPS and _saved_steps(tmp_path) == [step]  # every_steps=50: only the stop's save
  assert stopped.group(3) == str(tmp_path / "checkpoints" / str(step))
  assert "Traceback" not in out
  assert not os.path.exists(tmp_path / "run.lock")
  if signum == signal.SIGINT:
    return  # the checkpoint is the same kind; SIGTERM's case resumes from it

  resumed = subprocess.run(_command(tmp_path), env=cpu_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0 and f"Resumed from {tmp_path}/checkpoints/{step}" in resumed.stdout
  _assert_same_state(tmp_path, reference)
  assert logged_losses(tmp_path) == losses  # each step once, and the same values


def test_time_budget_saves_and_the_run_resumes(tmp_path, uninterrupted):
  reference, _ = uninterrupted
  stopped = subprocess.run(_command(tmp_path, "--config.checkpoint.max_minutes=1e-6"), env=cpu_env(), cwd=REPO,
                           capture_output=True, text=True, timeout=600)
  assert stopped.returncode == 0 and f"stopped by time limit after step 1/{TOTAL_STEPS}" in stopped.stdout
  assert _saved_steps(tmp_path) == [1]
  subprocess.run(_command(tmp_path), env=cpu_env(), cwd=REPO, check=True, capture_output=True, timeout=600)
  _assert_same_state(tmp_path, reference)


def test_preempted_is_raised_to_a_caller_of_train(tmp_path):
  config = tiny_run_config(total_steps=TOTAL_STEPS, **{"checkpoint.max_minutes": 1e-6})
  with pytest.raises(preemption.Preempted, match=r"stopped by time limit after step 1/40") as stop:
    train.train(config, str(tmp_path))
  assert stop.value.exit_code == 0 and _saved_steps(tmp_path) == [1]
