"""Initial values from other runs: ``config.init_from``.

A run that starts (its workdir has no checkpoint yet) may copy subtrees of other runs' newest checkpoints
into its fresh state. ``config.init_from`` is either

- a run's workdir ``'runs/mae'``: shorthand for ``(('runs/mae', 'encoder', 'encoder'),)``, or
- ``(run_dir, source subtree, target subtree)`` triples, applied in order.

A subtree is ``'encoder'`` or a '/'-separated path into ``{'params', 'model_state', 'method_state'}``,
e.g. ``'params/encoder'``, ``'method_state/teacher'``. As a source, ``'encoder'`` is the encoder the
source run's method stands for (`Method.encoder_variables`: its online encoder, or its teacher when its
config says so), as variables: every collection of it (BatchNorm statistics too); ``'encoder/params'``
is its parameters alone, e.g. for a target inside a method's EMA copy. As a target, ``'encoder'`` is this
run's online encoder (``params/encoder`` and ``model_state/<collection>/encoder``). Shapes are checked
before anything is copied, over the leaves the target has: parameters only the source has (a mask token an
evaluation does not use) are listed as ignored; a missing or differently shaped one is an error naming the
subtree and both shapes. Blocks saved in the other layout (``config.model.scan_blocks``: ``block_{i}`` or
stacked ``blocks``) are converted to this run's first (`sslx.convert.scan_layout.match_layout`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from flax import linen as nn

from sslx import checkpoint as checkpoint_lib
from sslx import methods
from sslx import trees
from sslx.convert import scan_layout

STATE_PARTS = ("params", "model_state", "method_state")
ENCODER = "encoder"


@dataclasses.dataclass(frozen=True)
class Mapping:
  run_dir: str
  source: str
  target: str


def parse_mappings(value: Any) -> list[Mapping]:
  """``config.init_from`` as a list of mappings (empty for None); raises a ValueError naming the bad entry."""
  if value is None:
    return []
  if isinstance(value, str):
    value = ((value, ENCODER, ENCODER),)
  if not isinstance(value, (list, tuple)):
    raise ValueError(f"config.init_from={value!r} is neither a run directory nor (run_dir, source, target) "
                     "triples")
  mappings = []
  for i, entry in enumerate(value):
    if not (isinstance(entry, (list, tuple)) and len(entry) == 3 and all(isinstance(x, str) for x in entry)):
      raise ValueError(f"config.init_from[{i}]={entry!r} is not a (run_dir, source subtree, target subtree) "
                       "triple of strings")
    mapping = Mapping(*entry)
    for side in ("source", "target"):
      _check_subtree(getattr(mapping, side), f"config.init_from[{i}] {side}")
    if not os.path.isdir(os.path.join(mapping.run_dir, "checkpoints")):
      raise ValueError(f"config.init_from[{i}] run_dir={mapping.run_dir!r} is not the --workdir of an sslx run "
                       "(it has no checkpoints/ folder)")
    mappings.append(mapping)
  return mappings


def _check_subtree(subtree: str, what: str) -> None:
  head = subtree.split("/")[0]
  if subtree != ENCODER and head not in STATE_PARTS and not (what.endswith("source") and head == ENCODER):
    raise ValueError(f"{what} {subtree!r} is neither 'encoder' nor a path starting with one of {STATE_PARTS}"
                     + (" or 'encoder/'" if what.endswith("source") else ""))


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a run wrote to ``<workdir>/config.json``."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir!r} holds no config.json ({path}); point config.init_from at the "
                            "--workdir of an sslx run")
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))


def _get(tree: Any, path: str, what: str) -> Any:
  for key in path.split("/"):
    if not isinstance(tree, dict) or key not in tree:
      keys = sorted(tree) if isinstance(tree, dict) else []
      raise ValueError(f"{what} has no {path!r} (at {key!r}; it has {keys})")
    tree = tree[key]
  return tree


def _set(tree: dict, path: str, value: Any) -> dict:
  head, _, rest = path.partition("/")
  return {**tree, head: _set(tree[head], rest, value) if rest else value}


def encoder_view(state: dict) -> dict:
  """The online encoder of a state tree, as variables: ``{'params': ..., '<collection>': ...}``."""
  view = {"params": state["params"][ENCODER]} if ENCODER in state["params"] else {}
  view.update({name: tree[ENCODER] for name, tree in state.get("model_state", {}).items() if ENCODER in tree})
  return view


def _with_encoder(state: dict, encoder: dict) -> dict:
  state = _set(state, f"params/{ENCODER}", encoder["params"])
  for name, tree in encoder.items():
    if name != "params":
      state = _set(state, f"model_state/{name}/{ENCODER}", tree)
  return state


class RunReader:
  """One source run: its config, method and newest checkpoint, restored on demand (replicated)."""

  def __init__(self, run_dir: str, mesh, run_config: Optional[ml_collections.ConfigDict] = None):
    self.run_dir = run_dir
    self.config = load_run_config(run_dir) if run_config is None else run_config
    self.method = methods.build_method(self.config)
    self._checkpointer = checkpoint_lib.Checkpointer(os.path.join(run_dir, "checkpoints"), max_to_keep=1)
    self.step = self._checkpointer.latest_step()
    if self.step is None:
      raise FileNotFoundError(f"{run_dir!r} holds no checkpoint in {self._checkpointer.directory}")
    self._replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self._state: Optional[dict] = None

  def abstract_state(self) -> dict:
    """``{'params', 'model_state', 'method_state'}`` as this run's method initialises them (shapes only)."""
    size, channels = self.config.data.image_size, self.config.data.channels
    example = {"image": jax.ShapeDtypeStruct((1, size, size, channels), np.float32),
               "label": jax.ShapeDtypeStruct((1,), np.int32)}
    variables, method_state = jax.eval_shape(self.method.init, jax.random.PRNGKey(0), example)
    variables = nn.unbox(variables)
    return {"params": variables["params"],
            "model_state": {name: tree for name, tree in variables.items() if name != "params"},
            "method_state": nn.unbox(method_state)}

  def state(self) -> dict:
    """The checkpoint's params, model state and method state (no optimizer state is read)."""
    if self._state is None:
      abstract = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=self._replicated),
                              self.abstract_state())
      self._checkpointer.check_params_match(
          self.step, abstract["params"],
          hint=f"The config.json in {self.run_dir!r} does not describe its checkpoint (edited, or written by "
          "another sslx version).")
      self._state = self._checkpointer.restore_parts(self.step, abstract)
    return self._state

  def subtree(self, source: str) -> Any:
    state = self.state()
    what = f"The checkpoint {self._checkpointer.directory}/{self.step}"
    head, _, rest = source.partition("/")
    if head == ENCODER:
      variables = {"params": state["params"], **state["model_state"]}
      encoder = self.method.encoder_variables(variables, state["method_state"])
      return _get(encoder, rest, f"{what}'s encoder") if rest else encoder
    return _get(state, source, what)

  def describe(self) -> str:
    return f"{self._checkpointer.directory}/{self.step}"

  def close(self) -> None:
    self._checkpointer.close()


def apply_mappings(state: dict, mappings: list[Mapping], shardings: dict, mesh, log=print) -> dict:
  """``state`` (``{'params', 'model_state', 'method_state'}``) with every mapping's subtree copied in.

  ``shardings`` has the structure of ``state``: each copied array is placed as the target's.
  """
  readers: dict[str, RunReader] = {}
  try:
    for i, mapping in enumerate(mappings):
      reader = readers.get(mapping.run_dir) or readers.setdefault(mapping.run_dir, RunReader(mapping.run_dir, mesh))
      what = f"config.init_from[{i}] ({mapping.run_dir!r}, {mapping.source!r}, {mapping.target!r})"
      if mapping.target == ENCODER:
        target, target_shardings = encoder_view(state), encoder_view(shardings)
      else:
        target = _get(state, mapping.target, f"{what}: this run's state")
        target_shardings = _get(shardings, mapping.target, f"{what}: this run's state")
      # An encoder saved with the other config.model.scan_blocks loads: its blocks are restacked (exactly).
      source = scan_layout.match_layout(reader.subtree(mapping.source), target)
      ignored = check_target_shapes(source, target, what=what)
      copied = _select_like(source, target)
      copied = jax.tree.map(lambda x, sharding: jax.device_put(x, sharding), copied, target_shardings)
      state = _with_encoder(state, copied) if mapping.target == ENCODER else _set(state, mapping.target, copied)
      note = f" (ignored, unused here: {', '.join(ignored)})" if ignored else ""
      log(f"{mapping.target} initialised from {mapping.source} of {reader.describe()}{note}")
  finally:
    for reader in readers.values():
      reader.close()
  return state


def check_target_shapes(source: Any, target: Any, *, what: str) -> list[str]:
  """Raises unless every leaf of ``target`` exists in ``source`` with its shape; returns the names of the
  source's leaves the target does not have."""
  theirs, ours = trees.leaves_by_name(source), trees.leaves_by_name(target)
  problems = [f"{name}: source {tuple(theirs[name].shape) if name in theirs else 'missing'} vs target "
              f"{tuple(leaf.shape)}" for name, leaf in ours.items()
              if name not in theirs or tuple(theirs[name].shape) != tuple(leaf.shape)]
  if problems:
    listed = "\n  ".join(problems[:10]) + ("\n  ..." if len(problems) > 10 else "")
    raise ValueError(f"{what}: {len(problems)} leaves of the target subtree do not match the source:\n  {listed}\n"
                     "Set config.model to the encoder that run trained (its config.json).")
  return sorted(set(theirs) - set(ours))


def _select_like(source: Any, target: Any) -> Any:
  """The leaves of ``source`` at the target's paths, in the target's structure."""
  by_name = trees.leaves_by_name(source)
  paths, treedef = jax.tree_util.tree_flatten_with_path(target)
  return jax.tree_util.tree_unflatten(treedef, [by_name[trees.path_name(path)] for path, _ in paths])
