"""A `jax.profiler` trace of a chosen range of training steps (``config.profile_steps``).

The loop calls ``profiler.step(step, state)`` at the top of every iteration, before step ``step`` runs on
``state``, and ``profiler.close(state)`` after the last one. Steps ``start..stop`` (both included, counted
as the loop counts them, from 1) are traced into ``log_dir`` (``<workdir>/tensorboard``): XLA's
``plugins/profile/<time>/<host>.xplane.pb``, which TensorBoard's profile plugin
(``tensorboard-plugin-profile`` / xprof) shows, beside ``<host>.trace.json.gz`` for ui.perfetto.dev;
``experiments/summarize_trace.py`` prints the top ops and the time per op category from the xplane file.
Every process traces its own devices.

Steps are dispatched asynchronously, so the trace is stopped only once the last traced step's output is
ready (the state the next step receives), or it would miss that step's device work. While tracing, each
iteration is marked as a ``train`` step (`jax.profiler.StepTraceAnnotation`), the marker xprof's step-time
views read.
"""
from __future__ import annotations

from typing import Any, Optional

import jax


class StepProfiler:
  """Traces steps ``profile_steps = (start, stop)`` into ``log_dir``; ``profile_steps`` None: does nothing."""

  def __init__(self, profile_steps: Optional[tuple[int, int]], log_dir: str):
    self._range = tuple(profile_steps) if profile_steps is not None else None
    self._log_dir = log_dir
    self._tracing = False
    self._annotation = None

  @property
  def tracing(self) -> bool:
    return self._tracing

  def step(self, step: int, state: Any = None) -> None:
    """Called before step ``step`` runs on ``state`` (the previous step's output)."""
    if self._range is None:
      return
    start, stop = self._range
    self._end_annotation()
    if self._tracing and step > stop:
      self._stop(state)
    elif not self._tracing and start <= step <= stop:
      # A resumed run that starts inside the range traces what is left of it.
      jax.profiler.start_trace(self._log_dir)
      self._tracing = True
    if self._tracing:
      self._annotation = jax.profiler.StepTraceAnnotation("train", step_num=step)
      self._annotation.__enter__()

  def close(self, state: Any = None) -> None:
    """Ends a trace still running (the run ended inside the range), after ``state`` is ready."""
    self._end_annotation()
    if self._tracing:
      self._stop(state)

  def _end_annotation(self) -> None:
    if self._annotation is not None:
      self._annotation.__exit__(None, None, None)
      self._annotation = None

  def _stop(self, state: Any) -> None:
    if state is not None:
      jax.block_until_ready(state)
    jax.profiler.stop_trace()
    self._tracing = False
