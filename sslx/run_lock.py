"""One run per workdir: a lock file that names its holder.

Two launches on one workdir (a job scheduled twice, a resubmission while the first is still alive) would
interleave their metrics, fight over the newest checkpoint and break each other's saves. The lead process
of a run creates ``<workdir>/run.lock`` exclusively and writes its host, PID and start time into it; a
second run fails at once with a message naming the holder. A lock left by a run that died (a PID that no
longer runs on this host, or runs another program) is taken over with a warning. A lock from another host
cannot be checked from here, so the message says how to remove it by hand.
"""
from __future__ import annotations

import json
import os
import socket
import time
from typing import Callable, Optional

LOCK_NAME = "run.lock"


class WorkdirLockedError(RuntimeError):
  """Another run holds the workdir."""


def _process_start_ticks(pid: int) -> Optional[str]:
  """The kernel's start time of ``pid`` (Linux), which tells a live PID from a reused one; None if unknown."""
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      # The command name (field 2) may hold spaces and parentheses: count fields after its closing one.
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _is_alive(holder: dict) -> bool:
  """Whether the process named by a lock on this host still runs (and is the same process)."""
  pid = holder.get("pid")
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # alive, owned by someone else
  started = holder.get("start_ticks")
  return started is None or _process_start_ticks(pid) in (None, started)


def _describe(holder: dict) -> str:
  started = holder.get("started")
  when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
  return f"host {holder.get('host', '?')}, PID {holder.get('pid', '?')}, started {when}"


class WorkdirLock:
  """``with WorkdirLock(workdir):`` holds ``<workdir>/run.lock`` for the duration."""

  def __init__(self, workdir: str, *, warn: Callable[[str], None] = print):
    self.path = os.path.join(workdir, LOCK_NAME)
    self._warn = warn
    self._mine: Optional[dict] = None

  def acquire(self) -> None:
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
          "start_ticks": _process_start_ticks(os.getpid())}
    for _ in range(2):  # at most one stale lock to take over
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        self._take_over_if_stale()
        continue
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(me, f)
      self._mine = me
      return
    raise WorkdirLockedError(f"{self.path} was taken by another run while this one started")

  def _take_over_if_stale(self) -> None:
    holder = self._read_holder()
    if holder == {}:
      return  # released meanwhile: try again
    if holder is None:
      raise WorkdirLockedError(
          f"{self.path} exists but cannot be read as a lock (a run that is just starting writes it, or it "
          "is damaged); if no run is using this workdir, delete it")
    if holder.get("host") != socket.gethostname():
      raise WorkdirLockedError(
          f"workdir {os.path.dirname(self.path)} is in use by another run ({_describe(holder)}); if that run "
          f"is gone, delete {self.path}")
    if _is_alive(holder):
      raise WorkdirLockedError(
          f"workdir {os.path.dirname(self.path)} is in use by another run ({_describe(holder)}); stop it, or "
          "use another --workdir")
    self._warn(f"warning: taking over the lock of a run that is gone ({_describe(holder)}): {self.path}")
    try:
      os.remove(self.path)
    except FileNotFoundError:
      pass  # another starting run removed it first; the exclusive create decides between us

  def _read_holder(self) -> Optional[dict]:
    try:
      with open(self.path, encoding="utf-8") as f:
        holder = json.load(f)
    except FileNotFoundError:
      return {}  # released meanwhile: nothing to take over
    except (OSError, ValueError):
      return None
    return holder if isinstance(holder, dict) else None

  def release(self) -> None:
    """Removes the lock if it is still this run's (a run that took it over owns it now)."""
    if self._mine is None:
      return
    holder = self._read_holder()
    if holder and holder.get("pid") == self._mine["pid"] and holder.get("started") == self._mine["started"]:
      os.remove(self.path)
    self._mine = None

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()
