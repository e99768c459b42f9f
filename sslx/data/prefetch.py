"""Prefetch to the device: a thread keeps the next global batches on the accelerator ahead of the step.

The train step is dispatched asynchronously, so while the device computes step ``k`` the host thread
loads, assembles (``jax.make_array_from_process_local_data``) and transfers batch ``k + 1 .. k + size``;
the step never waits for host-to-device copies unless the input pipeline itself is the bottleneck.

Checkpoints must record the data position of the batches the *model* consumed, not of those sitting in
the queue: each queued batch carries the loader state taken right after it was produced, and
`get_state` returns the one of the batch handed out last. Resuming from it replays exactly the batches
an uninterrupted run would have seen.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Optional

_END = object()


class DevicePrefetcher:
  """Iterator of device batches ``place(next(loader))``, ``size`` batches ahead, with a resumable state.

  Args:
    loader: an iterator of host batches with ``get_state()`` (e.g. `sslx.data.pipeline.TrainLoader`).
      Its state must be set before the prefetcher is created; after that only the thread touches it.
    place: host batch -> device batch, e.g. ``parallel.global_batch(batch, sharding)``.
    size: how many batches to keep ready; 0 loads synchronously in the caller's thread.
  """

  def __init__(self, loader: Any, place: Callable[[dict], dict], size: int = 2):
    if size < 0:
      raise ValueError(f"prefetch size must be >= 0; got {size}")
    self._loader, self._place, self._size = loader, place, size
    self._state = loader.get_state()
    self._queue: Optional[queue.Queue] = None
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  def __iter__(self):
    return self

  def _produce_one(self) -> tuple[dict, dict]:
    batch = next(self._loader)
    return self._place(batch), self._loader.get_state()

  def _run(self) -> None:
    try:
      while not self._stop.is_set():
        item = self._produce_one()
        while not self._stop.is_set():
          try:
            self._queue.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
    except BaseException as error:  # pylint: disable=broad-except  (re-raised in the consumer's thread)
      self._queue.put((_END, error))

  def __next__(self) -> dict:
    if self._size == 0:
      batch, self._state = self._produce_one()
      return batch
    if self._thread is None:
      self._queue = queue.Queue(maxsize=self._size)
      self._thread = threading.Thread(target=self._run, name="sslx-device-prefetch", daemon=True)
      self._thread.start()
    batch, state = self._queue.get()
    if batch is _END:
      raise state
    self._state = state
    return batch

  def get_state(self) -> dict:
    """The loader state right after the last batch returned by ``next`` (not the queued ones)."""
    return self._state

  def close(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=10)
      self._thread = None
