"""Prefetch to device: order, the state of the consumed batch (not of the queued ones), errors."""
import time

import numpy as np
import pytest

from sslx.data import prefetch


class CountingLoader:
  """Yields {'x': [k]} for k = 0, 1, ...; fails at ``fail_at``."""

  def __init__(self, fail_at=None):
    self.next_batch, self.fail_at = 0, fail_at

  def __next__(self):
    if self.next_batch == self.fail_at:
      raise OSError("disk went away")
    batch = {"x": np.array([self.next_batch])}
    self.next_batch += 1
    return batch

  def get_state(self):
    return {"next_batch": self.next_batch}


@pytest.mark.parametrize("size", [0, 1, 3])
def test_batches_arrive_in_order_placed_and_state_follows_consumption(size):
  loader = CountingLoader()
  batches = prefetch.DevicePrefetcher(loader, lambda b: {"x": b["x"] * 10}, size=size)
  assert batches.get_state() == {"next_batch": 0}
  for k in range(5):
    assert int(next(batches)["x"][0]) == 10 * k
    if size:
      time.sleep(0.05)  # let the thread run ahead: the state must still be that of batch k
    assert batches.get_state() == {"next_batch": k + 1}
  if size:
    assert loader.next_batch > 5  # it did prefetch
  batches.close()


def test_loader_errors_reach_the_consumer():
  batches = prefetch.DevicePrefetcher(CountingLoader(fail_at=2), lambda b: b, size=2)
  next(batches)
  next(batches)
  with pytest.raises(OSError, match="disk went away"):
    next(batches)
  batches.close()


def test_negative_size_is_rejected():
  with pytest.raises(ValueError, match="prefetch size"):
    prefetch.DevicePrefetcher(CountingLoader(), lambda b: b, size=-1)
