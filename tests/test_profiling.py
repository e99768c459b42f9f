"""config.profile_steps: the step profiler writes a trace of the chosen steps, and the key is validated."""
import glob
import os

import jax
import jax.numpy as jnp
import pytest

from sslx import config as config_lib
from sslx import profiling
from sslx import train
import train_helpers


# No monitor, probe or pictures: the trace is what is tested, and they would cost most of the run's time.
_QUIET = {"monitor.every_steps": 0, "monitor.online_probe": False, "viz_every_steps": 100}


def _traced_steps(log_dir):
  """The step numbers the trace's step markers hold, and the trace file."""
  traces = glob.glob(os.path.join(log_dir, "plugins", "profile", "*", "*.xplane.pb"))
  assert len(traces) == 1, traces
  steps = set()
  for plane in jax.profiler.ProfileData.from_file(traces[0]).planes:
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        if event.name == "train" and "step_num" in stats:
          steps.add(int(stats["step_num"]))
  return steps


def _run(profiler, num_steps):
  step_fn = jax.jit(lambda x: jnp.tanh(x @ x))
  state = jnp.eye(16)
  for step in range(1, num_steps + 1):
    profiler.step(step, state)
    state = step_fn(state)
  profiler.close(state)


def test_traces_exactly_the_chosen_steps(tmp_path):
  profiler = profiling.StepProfiler((2, 3), str(tmp_path))
  _run(profiler, 5)
  assert not profiler.tracing
  assert _traced_steps(str(tmp_path)) == {2, 3}


def test_close_ends_a_trace_the_run_stopped_inside(tmp_path):
  profiler = profiling.StepProfiler((2, 10), str(tmp_path))
  _run(profiler, 3)
  assert not profiler.tracing
  assert _traced_steps(str(tmp_path)) == {2, 3}


def test_none_traces_nothing(tmp_path):
  _run(profiling.StepProfiler(None, str(tmp_path)), 2)
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("value", [(0, 2), (3, 2), (1,), (1, 2, 3), (1.0, 2), ("1", "2"), (True, 2)])
def test_bad_profile_steps_are_refused_by_name(value):
  config = train_helpers.tiny_run_config()
  config.unlock()
  config.profile_steps = value
  with pytest.raises(ValueError, match=r"config\.profile_steps"):
    config_lib.validate_config(config)


def test_good_profile_steps_pass():
  for value in (None, (1, 1), (2, 5), [3, 4]):
    config_lib.validate_config(train_helpers.tiny_run_config(profile_steps=value))


def test_training_run_writes_a_trace_of_the_chosen_steps(tmp_path):
  train.train(train_helpers.tiny_run_config(profile_steps=(2, 3), total_steps=3, **_QUIET), str(tmp_path))
  assert _traced_steps(os.path.join(str(tmp_path), "tensorboard")) == {2, 3}
