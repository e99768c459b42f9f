"""A thin wrapper over Orbax's `CheckpointManager`: train state + data-iterator state, saved together.

Saves are asynchronous (training continues while arrays are written), the newest ``max_to_keep`` are
kept, and a restore places every array with the shardings of the *current* mesh, so a run can resume on
a different number of devices than it was saved from.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from sslx import trees


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


class Checkpointer:
  """Saves ``state`` (a pytree of arrays) and ``data`` (a JSON-able dict) under ``directory/<step>/``."""

  def __init__(self, directory: str, *, max_to_keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()},
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data: dict) -> None:
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     data=ocp.args.JsonSave(data)))

  def check_params_match(self, step: int, abstract_params: Any, *, subtree: str | None = None,
                         hint: str = "Use a fresh --workdir, or the config the checkpoint was trained with.") -> None:
    """Raises if the checkpoint at ``step`` holds parameters of another model than ``abstract_params``.

    With ``subtree`` (e.g. 'encoder'), only ``params[subtree]`` of the checkpoint is compared.
    """
    saved = self._manager.item_metadata(step)["state"]
    saved_tree = getattr(saved, "tree", saved)
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
    """Restores onto the shardings carried by ``abstract_state`` (a tree of `jax.ShapeDtypeStruct`)."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]

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
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


class BestCheckpointer:
  """Keeps the one state that scored highest on ``metric`` so far (e.g. 'eval/top1'), beside the latest ones.

  The score travels with the checkpoint, so a resumed run still compares against the best before it.
  """

  def __init__(self, directory: str, metric: str):
    self.metric = metric
    self._checkpointer = Checkpointer(directory, max_to_keep=1)
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
