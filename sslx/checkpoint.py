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


def _path_name(path) -> str:
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return "/".join(parts)


def _shapes_by_name(tree) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_name(path): tuple(leaf.shape) for path, leaf in leaves if hasattr(leaf, "shape")}


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

  def check_params_match(self, step: int, abstract_params: Any) -> None:
    """Raises if the checkpoint at ``step`` holds parameters of another model than ``abstract_params``."""
    saved = self._manager.item_metadata(step)["state"]
    saved_tree = getattr(saved, "tree", saved)
    saved_params = saved_tree.get("params") if isinstance(saved_tree, dict) else None
    if saved_params is None:
      raise ValueError(f"{self.directory}/{step} holds no 'params'; it was not written by this sslx version")
    ours, theirs = _shapes_by_name(abstract_params), _shapes_by_name(saved_params)
    differences = [f"{name}: checkpoint {theirs.get(name)} vs config {ours.get(name)}"
                   for name in sorted(set(ours) | set(theirs)) if ours.get(name) != theirs.get(name)]
    if differences:
      listed = "\n  ".join(differences[:10]) + ("\n  ..." if len(differences) > 10 else "")
      raise ValueError(
          f"The checkpoint in {self.directory}/{step} belongs to another model than this config "
          f"({len(differences)} parameters differ):\n  {listed}\n"
          "Use a fresh --workdir, or the config the checkpoint was trained with.")

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores onto the shardings carried by ``abstract_state`` (a tree of `jax.ShapeDtypeStruct`)."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
