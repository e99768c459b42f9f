"""What a person watches during a run: a progress line, a JSONL log and TensorBoard event files.

The TensorBoard writer emits the TFRecord/`Event` protobuf wire format directly (scalars only), so runs need
neither TensorFlow nor tensorboardX installed; `tensorboard --logdir WORKDIR` reads the files.
"""
from __future__ import annotations

import json
import math
import os
import socket
import struct
import sys
import time
from typing import Mapping, TextIO

# --- TensorBoard event files ------------------------------------------------------------------------


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  # TFRecord masks the CRC so that a CRC of data containing CRCs is well-behaved.
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
  out = bytearray()
  value &= (1 << 64) - 1
  while True:
    byte = value & 0x7F
    value >>= 7
    if value:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
  return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: str | None = None, summary: bytes | None = None):
  message = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(step)
  if file_version is not None:
    message += _length_delimited(3, file_version.encode())
  if summary is not None:
    message += _length_delimited(5, summary)
  return message


def _scalar_summary(scalars: Mapping[str, float]) -> bytes:
  values = b""
  for tag, value in scalars.items():
    value_message = _length_delimited(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value)
    values += _length_delimited(1, value_message)
  return values


class TensorBoardWriter:
  """Appends scalar summaries to ``logdir/events.out.tfevents.<time>.<host>``."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
    self._file = open(os.path.join(logdir, name), "ab")
    self._write_record(_event(time.time(), 0, file_version="brain.Event:2"))

  def _write_record(self, data: bytes) -> None:
    header = struct.pack("<Q", len(data))
    self._file.write(header + struct.pack("<I", _masked_crc(header)) + data +
                     struct.pack("<I", _masked_crc(data)))

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    self._write_record(_event(time.time(), step, summary=_scalar_summary(scalars)))
    self._file.flush()

  def close(self) -> None:
    self._file.close()


# --- JSONL and the progress line ---------------------------------------------------------------------


class JsonlWriter:
  """One JSON object per line: ``{"step": ..., "<name>": value, ...}``."""

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
