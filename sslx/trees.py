"""Names of pytree leaves: the one place a key path becomes ``'encoder/block_0/attn/qkv/kernel'``."""
from __future__ import annotations

from typing import Any

import jax


def path_names(path) -> list[str]:
  """The key names along a `jax.tree_util` key path (dict keys, attribute names, sequence indices)."""
  names = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
  return names


def path_name(path) -> str:
  """``'/'``-joined `path_names`, as the optimizer rules' regular expressions see them."""
  return "/".join(path_names(path))


def leaves_by_name(tree: Any) -> dict[str, Any]:
  """``{path_name: leaf}`` of every leaf."""
  return {path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
