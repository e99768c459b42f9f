"""Timing of training steps shared by the benchmarks."""
import statistics
import time

import jax

from sslx import train
from sslx import xla_options


def median_step_seconds(run_step, sync, *, warmup: int, steps: int) -> float:
  """Median wall time of ``steps`` individually synchronised calls of ``run_step`` after ``warmup`` untimed
  ones; ``sync()`` waits for the device (``jax.block_until_ready``, ``torch.cuda.synchronize``)."""
  for _ in range(warmup):
    run_step()
  sync()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    run_step()
    sync()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def time_sslx_step(method, tx, schedules, state, inputs, *, warmup: int, steps: int) -> dict:
  """Compiles sslx's train step (`sslx.train.make_train_step`, donated state) for ``state`` and ``inputs`` and
  times it with `median_step_seconds`: ``seconds_per_step``, ``compile_s``, the last step's ``loss`` and the
  ``device`` kind."""
  start = time.perf_counter()
  compiled = xla_options.jit(train.make_train_step(method, tx, schedules), donate_argnums=(0,)).lower(
      state, inputs).compile()
  compile_s = time.perf_counter() - start
  metrics = {}

  def run_step():
    nonlocal state, metrics
    state, metrics = compiled(state, inputs)

  seconds = median_step_seconds(run_step, lambda: jax.block_until_ready(state), warmup=warmup, steps=steps)
  return dict(seconds_per_step=seconds, compile_s=compile_s, loss=float(metrics["loss"]),
              device=jax.devices()[0].device_kind)
