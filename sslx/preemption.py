"""Stopping a run cleanly: SIGTERM, SIGINT or a wall-clock budget become one agreed stop step.

A scheduler that preempts a job sends SIGTERM and kills it a grace period later; a person presses Ctrl-C.
Either way the loop should finish the step it is in, write a checkpoint and exit, so that the same command
resumes. `StopRequests` turns the signals into a flag the loop reads between steps. On several processes
each one may see the signal at a different step (or only one of them sees it), and a checkpoint save is a
collective: every process must decide to stop at the same step, or the others wait forever inside a save.
So the flags are combined by `any_process`, an all-gather that every process calls at the same steps
(the approach of MaxText and big_vision).
"""
from __future__ import annotations

import signal
import threading
import time
from typing import Callable, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

# Why a run stopped early, in order of precedence when processes disagree (the largest code wins), and
# the exit status of each: a preempted job that saved has done what was asked of it; Ctrl-C keeps the
# shell's convention.
_REASONS = {1: ("time limit", 0), 2: ("SIGTERM", 0), 3: ("SIGINT", 130)}
_SIGNAL_CODES = {signal.SIGTERM: 2, signal.SIGINT: 3}


class Preempted(Exception):
  """The run stopped early and saved its state; ``exit_code`` is what the command line should return."""

  def __init__(self, message: str, exit_code: int):
    super().__init__(message)
    self.exit_code = exit_code


def any_process(code: int) -> int:
  """The largest of every process's ``code``; all processes must call this at the same point."""
  if jax.process_count() == 1:
    return code
  return int(np.max(multihost_utils.process_allgather(np.asarray(code, np.int32))))


def all_processes(ok: bool) -> bool:
  """True when ``ok`` holds on every process; a collective like `any_process`."""
  return any_process(0 if ok else 1) == 0


def barrier(name: str) -> None:
  """Waits until every process reached the barrier called ``name``."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class StopRequests:
  """Records SIGTERM / SIGINT (and an optional time budget) while active; the loop polls `agreed_stop`.

  Used as a context manager around the loop, it installs its handlers and puts the previous ones back.
  A second SIGINT raises KeyboardInterrupt at once, for a person who does not want to wait for the save.
  Only the main thread can install handlers; elsewhere (a notebook's worker thread) signals keep their
  usual meaning and only the time budget applies.
  """

  def __init__(self, *, max_minutes: Optional[float] = None, check_every_steps: int = 1,
               agree: Callable[[int], int] = any_process, clock: Callable[[], float] = time.monotonic):
    self._deadline = None if max_minutes is None else clock() + 60.0 * max_minutes
    self._check_every = check_every_steps
    self._agree = agree
    self._clock = clock
    self._code = 0
    self._previous = {}

  def __enter__(self) -> "StopRequests":
    if threading.current_thread() is threading.main_thread():
      for signum in _SIGNAL_CODES:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    del frame
    if signum == signal.SIGINT and self._code == _SIGNAL_CODES[signal.SIGINT]:
      raise KeyboardInterrupt
    self._code = max(self._code, _SIGNAL_CODES[signum])

  def agreed_stop(self, step: int) -> Optional[tuple[str, int]]:
    """``(reason, exit code)`` when the processes agree to stop after ``step``; None to go on.

    Between checks (every ``check_every_steps`` steps: each check is a collective on several processes)
    it returns None without asking the other processes.
    """
    if step % self._check_every:
      return None
    code = self._code
    if self._deadline is not None and self._clock() >= self._deadline:
      code = max(code, 1)
    code = self._agree(code)
    return _REASONS[code] if code else None
