"""A thin wrapper over Orbax's `CheckpointManager`: train state + data-iterator state, saved together.

Saves are asynchronous (training continues while arrays are written), the newest ``max_to_keep`` are
kept, and a restore places every array with the shardings of the *current* mesh, so a run can resume on
a different number of devices than it was saved from.

Runs on machines that come and go meet damaged storage: `Checkpointer.restore_latest` moves a step that
cannot be read aside to ``<step>.corrupt`` and falls back to the one before it; a save that cannot be
written raises one `CheckpointSaveError` (`Checkpointer.raise_if_save_failed` notices it between steps);
``cleanup_partial`` removes what a save killed half-way left behind.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import re
import shutil
import sys
import traceback
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from sslx import checksums as checksums_lib
from sslx import trees

_ORBAX_DIR = os.path.dirname(ocp.__file__)
# Orbax logs a failed write with its traceback in every function it passes through (the array writer's
# thread, the commit thread, the finalize wait), then raises it to the caller; Checkpointer reports it.
_ORBAX_ECHOES = frozenset({"run", "_thread_func", "wait_until_finished", "_write_and_log", "_update_and_log"})
_OTHER_CONFIG_HINT = "Use a fresh --workdir, or the config the checkpoint was trained with."


class UnreadableCheckpointError(ValueError):
  """The files of one saved step cannot be read (truncated, damaged, or missing a part); ``why`` says how."""

  def __init__(self, step_directory: str, why: str):
    super().__init__(f"{step_directory} cannot be read: {why}")
    self.why = why


class CheckpointRestoreError(ValueError):
  """No saved step could be read; the message lists every step tried and why."""


class CheckpointSaveError(RuntimeError):
  """A save could not be written: the message names the step, the directory, the OS error, the steps kept."""


def _shapes_by_name(tree) -> dict[str, tuple[int, ...]]:
  return {name: tuple(leaf.shape) for name, leaf in trees.leaves_by_name(tree).items() if hasattr(leaf, "shape")}


def check_same_shapes(theirs: Any, ours: Any, *, what: str, against: str, hint: str = "") -> None:
  """Raises a ValueError listing the parameters whose shapes differ between two trees (or exist in one).

  ``theirs`` is described by ``what`` (a checkpoint), ``ours`` by ``against`` (this config).
  """
  ours, theirs = _shapes_by_name(ours), _shapes_by_name(theirs)
  differences = [f"{name}: checkpoint {theirs.get(name)} vs config {ours.get(name)}"
                 for name in sorted(set(ours) | set(theirs)) if ours.get(name) != theirs.get(name)]
  if differences:
    listed = "\n  ".join(differences[:10]) + ("\n  ..." if len(differences) > 10 else "")
    raise ValueError(f"{what} belongs to another model than {against} ({len(differences)} parameters "
                     f"differ):\n  {listed}\n{hint}".rstrip())


def _raised_in_orbax(error: BaseException | None) -> bool:
  return error is not None and any(frame.f_code.co_filename.startswith(_ORBAX_DIR)
                                   for frame, _ in traceback.walk_tb(error.__traceback__))


def _is_abandoned_write(unraisable) -> bool:
  """An error of a read or write that orbax had stopped waiting for, which Python can only print."""
  closed_loop = (unraisable.object is None and isinstance(unraisable.exc_value, RuntimeError)
                 and str(unraisable.exc_value) == "Event loop is closed")
  return closed_loop or (inspect.iscoroutine(unraisable.object) and _raised_in_orbax(unraisable.exc_value))


def _is_orbax_echo(record: logging.LogRecord) -> bool:
  """A log record of an orbax error that orbax also raises to its caller, or that repeats one it raised."""
  if not record.exc_info:
    return False
  if record.name == "asyncio":
    error = record.exc_info[1]
    # A tensorstore write future carries no Python frames of orbax: it is known by its message.
    abandoned_write = _raised_in_orbax(error) or "Error writing" in str(error)
    return "exception was never retrieved" in record.getMessage() and abandoned_write
  return (record.levelno >= logging.ERROR and record.pathname.startswith(_ORBAX_DIR)
          and record.funcName in _ORBAX_ECHOES)


@functools.cache
def _quiet_orbax_echoes() -> None:
  """Keeps one failed save from printing hundreds of tracebacks; the failure itself still raises, once.

  When one write of a save fails, orbax's `asyncio.gather` over all of them raises at once and its event
  loop closes while tensorstore still finishes the other writes: each one's completion callback then finds
  the loop closed and goes to `sys.unraisablehook` as ``RuntimeError: Event loop is closed`` (one traceback
  per array), and the writes that fail too are logged by asyncio as "exception was never retrieved". Orbax
  also logs the first failure, with its traceback, in every thread it passes through before raising it.
  """
  previous_hook = sys.unraisablehook

  def unraisablehook(unraisable):
    if not _is_abandoned_write(unraisable):
      previous_hook(unraisable)

  sys.unraisablehook = unraisablehook
  for logger in ("absl", "asyncio"):
    logging.getLogger(logger).addFilter(lambda record: not _is_orbax_echo(record))


def _remove_partial_saves(directory: str) -> None:
  """Deletes the temporary directories of saves that were killed before they completed.

  Orbax writes a step under a temporary name and renames it once complete, so these never hold a
  checkpoint; nothing may be saving (the caller is the run's only writer).
  """
  if os.path.isdir(directory):
    for name in os.listdir(directory):
      if ocp.path.atomicity_types.TMP_DIR_SUFFIX in name:
        shutil.rmtree(os.path.join(directory, name))


def _innermost(error: BaseException) -> BaseException:
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  return error


def _why(error: BaseException) -> str:
  """The innermost error's first line, without tensorstore's spec and paths: why a read failed, briefly."""
  error = _innermost(error)
  text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
  text = (text.splitlines() or [type(error).__name__])[0].split(" [tensorstore_spec=")[0]
  text = re.sub(r' (?:at|of) local file "[^"]*"', "", text)  # the step directory is named beside it
  return text if len(text) <= 240 else f"{text[:150]} ... {text[-85:]}"


def _os_error(error: BaseException) -> str | None:
  """``'[Errno 28] No space left on device'`` for a failed write, from Python or from tensorstore."""
  while error is not None:
    if isinstance(error, OSError) and error.errno is not None:
      return f"[Errno {error.errno}] {error.strerror}"
    code = re.search(r"os_error_code='?(\d+)", str(error))
    if code:
      return f"[Errno {code.group(1)}] {os.strerror(int(code.group(1)))}"
    error = error.__cause__ or error.__context__
  return None


def _is_read_error(error: Exception) -> bool:
  """Errors of damaged files, not of a wrong call: orbax wraps tensorstore's in a bare `Exception`."""
  return isinstance(error, (OSError, ValueError, KeyError)) or type(error) is Exception


class Checkpointer:
  """Saves ``state`` (a pytree of arrays) and ``data`` (a JSON-able dict) under ``directory/<step>/``.

  With ``cleanup_partial`` (pass it on the lead process only, which holds the workdir), the temporary
  directories of saves killed half-way are removed first.
  """

  def __init__(self, directory: str, *, max_to_keep: int, async_save: bool = True, cleanup_partial: bool = False):
    self.directory = os.path.abspath(directory)
    self._async = async_save
    self._in_flight: int | None = None  # the step of an async save not yet known to have completed
    _quiet_orbax_echoes()
    if cleanup_partial:
      _remove_partial_saves(self.directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                       "checksums": ocp.JsonCheckpointHandler()},
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data: dict) -> None:
    """Starts saving ``step`` (or saves it, when not async); raises `CheckpointSaveError` if storage fails
    for it, or for the async save before it."""
    self.wait()
    sums = checksums_lib.checksums(state)
    with self._naming_save_failure(step):
      self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       data=ocp.args.JsonSave(data),
                                                       checksums=ocp.args.JsonSave(sums)))
    self._in_flight = step if self._async else None

  def raise_if_save_failed(self) -> None:
    """Raises `CheckpointSaveError` if the async save in flight has failed; never waits for one that is still
    writing, so the loop can call it every step."""
    if self._in_flight is not None and not self._manager.is_saving_in_progress():
      self.wait()

  @contextlib.contextmanager
  def _naming_save_failure(self, step: int):
    try:
      yield
    except Exception as error:
      os_error = _os_error(error)
      if os_error is None:
        raise
      self._manager.reload()  # orbax forgot steps it meant to delete after this save: they are still there
      raise CheckpointSaveError(
          f"Could not save checkpoint step {step} in {self.directory}: {os_error}. Steps still kept there: "
          f"{self.all_steps() or 'none'}.") from error

  def _saved_state_tree(self, step: int) -> dict:
    """The saved state's metadata tree (one `ArrayMetadata` per array); raises `UnreadableCheckpointError`."""
    where = f"{self.directory}/{step}"
    try:
      metadata = self._manager.item_metadata(step)
    except Exception as error:
      if not _is_read_error(error):
        raise
      raise UnreadableCheckpointError(where, _why(error)) from error
    for item in ("state", "data"):
      if item not in metadata:
        raise UnreadableCheckpointError(where, f"its {item}/ directory is missing")
    if metadata["state"] is None:
      raise UnreadableCheckpointError(where, "state/_METADATA is missing or unreadable")
    return getattr(metadata["state"], "tree", metadata["state"])

  def check_params_match(self, step: int, abstract_params: Any, *, subtree: str | None = None,
                         hint: str = _OTHER_CONFIG_HINT) -> None:
    """Raises if the checkpoint at ``step`` holds parameters of another model than ``abstract_params``.

    With ``subtree`` (e.g. 'encoder'), only ``params[subtree]`` of the checkpoint is compared. A step whose
    metadata cannot be read raises `UnreadableCheckpointError`.
    """
    saved_tree = self._saved_state_tree(step)
    saved_params = saved_tree.get("params") if isinstance(saved_tree, dict) else None
    if saved_params is None:
      raise ValueError(f"{self.directory}/{step} holds no 'params'; it was not written by this sslx version")
    what = f"The checkpoint in {self.directory}/{step}"
    if subtree is not None:
      if subtree not in saved_params:
        raise ValueError(f"{what} has no params[{subtree!r}]; it has {sorted(saved_params)}")
      saved_params, what = saved_params[subtree], f"params[{subtree!r}] in the checkpoint {self.directory}/{step}"
    check_same_shapes(saved_params, abstract_params, what=what, against="this config", hint=hint)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores onto the shardings carried by ``abstract_state`` (a tree of `jax.ShapeDtypeStruct`).

    Reads through the item handlers, not the manager: its restore ends in a barrier of all processes, where
    the others would wait forever for one whose shards failed to read (`restore_latest` agrees instead).
    """
    step_directory = self._manager.directory / str(step)
    handler = ocp.StandardCheckpointHandler()
    try:
      state = handler.restore(step_directory / "state", args=ocp.args.StandardRestore(abstract_state))
    finally:
      handler.close()
    return state, ocp.JsonCheckpointHandler().restore(step_directory / "data", args=ocp.args.JsonRestore())

  def restore_latest(self, abstract_state: Any, *, check_params: Callable[[int], None] | None = None,
                     all_agree: Callable[[bool], bool] = lambda ok: ok, barrier: Callable[[str], None] = lambda name: None,
                     is_lead: bool = True, log: Callable[[str], None] = print) -> tuple[int, Any, dict] | None:
    """``(step, state, data)`` of the newest step every process can read, or None when nothing is saved.

    A step that cannot be read (a truncated or damaged array file, missing metadata, a missing part) is
    moved aside to ``<step>.corrupt`` (``.corrupt.1``, ... if taken; never deleted), ``log`` gets one line
    about it, and the step before it is tried; when none reads, `CheckpointRestoreError` lists them all.
    ``check_params(step)`` raises a ValueError for a checkpoint of another model: that one propagates at
    once and nothing is moved. Each process reads only its own shards, so ``all_agree(ok)`` (an AND over
    processes) decides together; only the lead (``is_lead``) renames, then every process waits at
    ``barrier(name)``.
    """
    failures = []
    steps = sorted(self.all_steps(), reverse=True)
    for index, step in enumerate(steps):
      # Chosen before all_agree, a collective: no process can look after the lead has renamed.
      aside = self._aside_path(step)
      try:
        restored, why = self._read(step, abstract_state, check_params), None
      except UnreadableCheckpointError as error:
        restored, why = None, error.why
      if all_agree(why is None):
        return (step, *restored)
      why = why or "another process could not read its shards"
      self._move_aside(step, aside, is_lead=is_lead, barrier=barrier)
      failures.append(f"step {step}: {why}")
      then = f"trying step {steps[index + 1]}" if index + 1 < len(steps) else "no older step is left"
      log(f"Checkpoint step {step} cannot be read ({why}); moved it to {aside}; {then}.")
    if failures:
      listed = "\n  ".join(failures)
      raise CheckpointRestoreError(f"No checkpoint in {self.directory} could be read (each was moved aside to "
                                   f"<step>.corrupt):\n  {listed}")
    return None

  def _move_aside(self, step: int, aside: str, *, is_lead: bool, barrier: Callable[[str], None]) -> None:
    if is_lead:
      os.rename(os.path.join(self.directory, str(step)), aside)
    barrier(f"sslx_checkpoint_moved_aside_{step}")
    self._manager.reload()  # forget the step, so later saves and max_to_keep deletions do not look for it

  def _aside_path(self, step: int) -> str:
    path = candidate = os.path.join(self.directory, f"{step}.corrupt")
    taken = 0
    while os.path.exists(candidate):
      taken += 1
      candidate = f"{path}.{taken}"
    return candidate

  def _read(self, step: int, abstract_state: Any, check_params: Callable[[int], None] | None) -> tuple[Any, dict]:
    """`restore` of ``step``, raising `UnreadableCheckpointError` for damaged files and a plain ValueError for
    a checkpoint that does not fit ``abstract_state``."""
    saved_tree = self._saved_state_tree(step)
    if check_params is not None:
      check_params(step)
    try:
      state, data = self.restore(step, abstract_state)
      saved_sums = self._saved_checksums(step)
    except Exception as error:
      if not _is_read_error(error):
        raise
      # A config change (another optimizer, queue size) also fails the restore; that checkpoint is fine.
      self._check_fits(step, saved_tree, abstract_state)
      raise UnreadableCheckpointError(f"{self.directory}/{step}", _why(error)) from error
    damaged = [] if saved_sums is None else checksums_lib.mismatches(saved_sums, state)
    if damaged:
      raise UnreadableCheckpointError(
          f"{self.directory}/{step}", f"{len(damaged)} of its arrays differ from their saved checksums, e.g. "
          f"{damaged[0]}")
    return state, data

  def _saved_checksums(self, step: int) -> dict[str, int] | None:
    """The checksums saved with ``step``; None for a checkpoint written before sslx saved them."""
    path = self._manager.directory / str(step) / "checksums"
    if not path.exists():
      return None
    return ocp.JsonCheckpointHandler().restore(path, args=ocp.args.JsonRestore())

  def _check_fits(self, step: int, saved_tree: Any, abstract_state: Any) -> None:
    """Raises a ValueError if the arrays saved at ``step`` differ from ``abstract_state``'s in name or shape.

    Names as orbax writes them beside each array ('opt_state.mu'): key-path names joined by dots.
    """
    saved = {leaf.name: leaf for leaf in jax.tree.leaves(saved_tree) if hasattr(leaf, "name")}
    ours = {".".join(trees.path_names(path)): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    check_same_shapes(saved, ours, what=f"The checkpoint in {self.directory}/{step}", against="this config",
                      hint=_OTHER_CONFIG_HINT)

  def restore_parts(self, step: int, abstract_parts: dict) -> dict:
    """Only the top-level parts of the saved state in ``abstract_parts`` (e.g. ``{'params': ...,
    'method_state': ...}``, trees of `jax.ShapeDtypeStruct` with shardings) at ``step``; the optimizer state
    is never read. Empty parts come back empty. Check shapes first with `check_params_match`."""
    wanted = {name: part for name, part in abstract_parts.items() if jax.tree.leaves(part)}
    restored = {}
    if wanted:
      handler = ocp.PyTreeCheckpointHandler()
      restored = handler.restore(
          self._manager.directory / str(step) / "state",
          args=ocp.args.PyTreeRestore(item=wanted, restore_args=ocp.checkpoint_utils.construct_restore_args(wanted),
                                      partial_restore=True))
      handler.close()
    return {name: restored.get(name, part) for name, part in abstract_parts.items()}

  def read_data(self, step: int) -> dict:
    """The JSON saved beside the state at ``step``, without reading any array."""
    return self._manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]

  def wait(self) -> None:
    """Waits for the save in flight; raises `CheckpointSaveError` (once) if it failed."""
    step, self._in_flight = self._in_flight, None
    if step is not None:
      with self._naming_save_failure(step):
        self._manager.wait_until_finished()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._manager.close()


class BestCheckpointer:
  """Keeps the one state that scored highest on ``metric`` so far (e.g. 'eval/top1'), beside the latest ones.

  The score travels with the checkpoint, so a resumed run still compares against the best before it.
  ``cleanup_partial`` as for `Checkpointer`.
  """

  def __init__(self, directory: str, metric: str, *, cleanup_partial: bool = False):
    self.metric = metric
    self._checkpointer = Checkpointer(directory, max_to_keep=1, cleanup_partial=cleanup_partial)
    self._best: dict | None = None
    step = self._checkpointer.latest_step()
    if step is not None:
      self._best = self._checkpointer.read_data(step)

  def maybe_save(self, step: int, state: Any, metrics: dict[str, float]) -> bool:
    if self.metric not in metrics:
      raise ValueError(f"config.checkpoint.best_metric={self.metric!r} is not among the evaluation metrics "
                       f"{sorted(metrics)}")
    if self._best is not None and metrics[self.metric] <= self._best[self.metric]:
      return False
    self._best = {"step": step, **{name: float(value) for name, value in metrics.items()}}
    self._checkpointer.save(step, state, self._best)
    return True

  def summary(self) -> dict | None:
    """``{'step': ..., <metric>: ..., ...}`` of the best state, or None before any evaluation."""
    return self._best

  def close(self) -> None:
    self._checkpointer.close()
