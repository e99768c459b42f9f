"""What a person watches during a run: a progress line, a JSONL log and TensorBoard event files.

TensorBoard files come from tensorboardX's writer, which needs neither TensorFlow nor a TensorBoard
server installed; `tensorboard --logdir WORKDIR` reads them.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import sys
import time
from typing import Mapping, TextIO

# --- TensorBoard event files ------------------------------------------------------------------------

# tensorboardX names a file by the second and the host only and opens it with truncation, so a second
# writer on the same directory within a second (a quick resume) would wipe the first one's events.
_WRITER_IDS = itertools.count()
# The writer queues events for a background thread that flushes at most this often: a live TensorBoard
# sees new points within it, and a killed run loses at most that much.
_FLUSH_SECS = 10


class TensorBoardWriter:
  """Scalar summaries in ``logdir/events.out.tfevents.<time>.<host>.<pid>.<n>``.

  Runs make one on the lead process only (sslx/train.py). tensorboardX is imported here rather than at the
  top because it imports torch whenever torch is installed: only the process that writes pays for that,
  and ``--help`` stays fast.
  """

  def __init__(self, logdir: str, *, purge_step: int | None = None):
    """``purge_step``: TensorBoard hides the events of earlier files at this step and later (a resumed
    run restarts there, so each step is shown once)."""
    import tensorboardX  # pylint: disable=g-import-not-at-top

    self._writer = tensorboardX.SummaryWriter(
        logdir, flush_secs=_FLUSH_SECS, filename_suffix=f".{os.getpid()}.{next(_WRITER_IDS)}",
        purge_step=purge_step)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    wall_time = time.time()
    for tag, value in scalars.items():
      self._writer.add_scalar(tag, float(value), step, walltime=wall_time)

  def flush(self) -> None:
    """Writes every queued event to disk now."""
    self._writer.flush()

  def close(self) -> None:
    """Writes every queued event to disk and closes the file."""
    self._writer.close()


# --- JSONL and the progress line ---------------------------------------------------------------------


def drop_rows_after(path: str, last_step: int) -> int:
  """Rewrites the JSONL log at ``path`` without its rows past ``last_step``; returns how many went.

  A run killed after its last checkpoint logged steps that its resumption trains again; their rows go, so
  that the log holds each step once. A damaged last line (the kill came mid-write) goes with them.
  """
  if not os.path.exists(path):
    return 0
  kept, dropped = [], 0
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        dropped += 1
        continue
      if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= last_step:
        kept.append(line if line.endswith("\n") else line + "\n")
      else:
        dropped += 1
  if dropped:
    partial = path + ".tmp"
    with open(partial, "w", encoding="utf-8") as f:
      f.writelines(kept)
    os.replace(partial, path)  # never a half-written log, whenever this process dies
  return dropped


class JsonlWriter:
  """One JSON object per line: ``{"step": ..., "<name>": value, ...}``, appended to what is there."""

  def __init__(self, path: str):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    self._file = open(path, "a", encoding="utf-8")

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    self._file.write(json.dumps({"step": step, **scalars}) + "\n")
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class ProgressLine:
  """``step 120/2340 (5%) | loss 0.5123 | lr 1.20e-04 | 812 img/s | ETA 4m12s``.

  Throughput is measured between consecutive reports, so compilation time does not distort it after the
  first report. On a terminal the line is redrawn in place; in a log file each report is its own line.
  """

  def __init__(self, total_steps: int, batch_size: int, stream: TextIO = sys.stdout):
    self._total_steps = total_steps
    self._batch_size = batch_size
    self._stream = stream
    self._last_time = None
    self._last_step = None
    self._is_tty = stream.isatty()

  def report(self, step: int, scalars: Mapping[str, float]) -> float:
    """Prints the line for ``step`` and returns the measured images/s (nan on the first report)."""
    now = time.time()
    images_per_s = float("nan")
    if self._last_time is not None and step > self._last_step:
      images_per_s = (step - self._last_step) * self._batch_size / (now - self._last_time)
    self._last_time, self._last_step = now, step
    eta = (self._total_steps - step) * self._batch_size / images_per_s if images_per_s > 0 else float("nan")
    parts = [f"step {step}/{self._total_steps} ({100 * step // max(self._total_steps, 1)}%)"]
    parts += [f"{name} {value:.4g}" if name != "lr" else f"lr {value:.2e}" for name, value in scalars.items()]
    parts += [f"{images_per_s:.0f} img/s" if math.isfinite(images_per_s) else "-- img/s",
              f"ETA {format_duration(eta)}"]
    line = " | ".join(parts)
    self._stream.write(("\r" + line + "\x1b[K") if self._is_tty else line + "\n")
    self._stream.flush()
    return images_per_s

  def exclude(self, seconds: float) -> None:
    """Leaves ``seconds`` spent outside training steps (evaluation, monitors) out of the throughput."""
    if self._last_time is not None:
      self._last_time += seconds

  def close(self) -> None:
    if self._is_tty:
      self._stream.write("\n")
      self._stream.flush()
