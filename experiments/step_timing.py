"""Timing of training steps shared by the benchmarks."""
import statistics
import time


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
