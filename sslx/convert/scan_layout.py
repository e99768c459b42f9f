"""Transformer blocks in either parameter layout: unrolled ``block_0 ... block_{L-1}`` or stacked ``blocks``.

``config.model.scan_blocks`` decides which layout a ViT (and the MAE decoder) has: unrolled, each block its own
subtree; stacked, one ``blocks`` subtree whose every leaf is the ``L`` blocks' leaves stacked along a new
leading axis, block ``i`` at index ``i`` (what ``nn.scan`` over `sslx.models.vit.Block` creates). The two
hold the same numbers, so conversion is exact both ways.

The functions take any pytree of arrays: parameters, an optimizer state (optax states hold trees shaped like
the parameters, e.g. Adam's ``mu`` and ``nu``), a whole train state, an EMA copy. Every dict holding
``block_{i}`` keys (or a ``blocks`` key) is converted; everything else is left as it is. Trees must be
unboxed (``nn.unbox``): a logical-partitioning box would keep its old axis names.

Typical use, switching a pretrained HF checkpoint to the scanned layout::

  params = stack_blocks(hf_mae.convert_hf_vitmae(state_dict, hf_config))
"""
from __future__ import annotations

import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from sslx.models import vit

STACKED = vit.STACKED_BLOCKS
_BLOCK = re.compile(r"block_(\d+)")


def _block_indices(node: dict) -> list[int]:
  return sorted(int(match.group(1)) for key in node if isinstance(key, str) and (match := _BLOCK.fullmatch(key)))


def _is_unrolled(node: Any) -> bool:
  return isinstance(node, dict) and bool(_block_indices(node))


def _is_stacked(node: Any) -> bool:
  return isinstance(node, dict) and STACKED in node


def _refuse_boxes(tree: Any) -> None:
  if any(isinstance(leaf, meta.AxisMetadata)
         for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))):
    raise TypeError("scan_layout converts unboxed trees only: call nn.unbox first (a box would keep the old "
                    "layout's logical axis names)")


def _stack(leaves) -> Any:
  if all(isinstance(leaf, np.ndarray) for leaf in leaves):
    return np.stack(leaves)
  return jnp.stack(leaves)


def _stack_node(node: dict) -> dict:
  indices = _block_indices(node)
  if indices != list(range(len(indices))):
    raise ValueError(f"Blocks {indices} are not block_0 ... block_{len(indices) - 1}; cannot stack them.")
  if STACKED in node:
    raise ValueError(f"A subtree holds both {STACKED!r} and block_{{i}} keys; cannot stack it.")
  blocks = [node[f"block_{i}"] for i in indices]
  structure = jax.tree.structure(blocks[0])
  for i, block in enumerate(blocks):
    if jax.tree.structure(block) != structure:
      raise ValueError(f"block_{i} has another structure than block_0; cannot stack them.")
  rest = {key: value for key, value in node.items() if not (isinstance(key, str) and _BLOCK.fullmatch(key))}
  return {**rest, STACKED: jax.tree.map(lambda *leaves: _stack(leaves), *blocks)}


def _depth(blocks: Any, depth: Optional[int]) -> int:
  sizes = {leaf.shape[0] for leaf in jax.tree.leaves(blocks)}
  if depth is not None:
    sizes.add(depth)
  if len(sizes) != 1:
    what = f"leading sizes {sorted(sizes)}" if sizes else "no array to read the depth from; pass depth"
    raise ValueError(f"Cannot unstack {STACKED!r}: {what}.")
  return sizes.pop()


def _unstack_node(node: dict, depth: Optional[int] = None) -> dict:
  if _block_indices(node):
    raise ValueError(f"A subtree holds both {STACKED!r} and block_{{i}} keys; cannot unstack it.")
  blocks = node[STACKED]
  rest = {key: value for key, value in node.items() if key != STACKED}
  layers = {f"block_{i}": jax.tree.map(lambda leaf, i=i: leaf[i], blocks) for i in range(_depth(blocks, depth))}
  return {**rest, **layers}


def stack_blocks(tree: Any) -> Any:
  """``tree`` with every ``block_0 ... block_{L-1}`` group replaced by one stacked ``blocks`` subtree."""
  _refuse_boxes(tree)
  return jax.tree.map(lambda node: _stack_node(node) if _is_unrolled(node) else node, tree, is_leaf=_is_unrolled)


def unstack_blocks(tree: Any, *, depth: Optional[int] = None) -> Any:
  """``tree`` with every stacked ``blocks`` subtree split into ``block_0 ... block_{L-1}``.

  ``L`` is the leaves' leading size; ``depth`` is only needed where a ``blocks`` subtree holds no array (an
  optimizer state of frozen parameters), and is checked against the leaves otherwise.
  """
  _refuse_boxes(tree)
  return jax.tree.map(lambda node: _unstack_node(node, depth) if _is_stacked(node) else node, tree,
                      is_leaf=_is_stacked)


def to_layout(tree: Any, *, scan_blocks: bool) -> Any:
  """``tree`` in the layout ``config.model.scan_blocks`` names (a no-op where it already is)."""
  return stack_blocks(tree) if scan_blocks else unstack_blocks(tree)


def match_layout(source: Any, target: Any) -> Any:
  """``source`` with each block group in the layout of the same place in ``target`` (nested dicts).

  What `sslx.init_from` applies to a subtree of another run, so an encoder saved in one layout loads into a
  model built in the other. Places ``target`` lacks, and non-dict nodes, are left as they are.
  """
  if not (isinstance(source, dict) and isinstance(target, dict)):
    return source
  if STACKED in target and _is_unrolled(source):
    _refuse_boxes(source)
    source = _stack_node(source)
  elif _is_unrolled(target) and STACKED in source:
    _refuse_boxes(source)
    source = _unstack_node(source)
  return {key: match_layout(value, target[key]) if key in target else value for key, value in source.items()}
