"""What a run leaves behind to read: ``<workdir>/results.json`` and the metrics it logged.

Writes go through a temporary file and a rename, so a run killed mid-write never leaves half a file.
"""
from __future__ import annotations

import json
import os

import jax

RESULTS = "results.json"


def write_json(path: str, value: dict) -> None:
  partial = path + ".tmp"
  with open(partial, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2)
  os.replace(partial, path)


def recorded(workdir: str) -> dict:
  """What ``<workdir>/results.json`` holds ({} before the run finished)."""
  path = os.path.join(workdir, RESULTS)
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def record(workdir: str, **entries) -> None:
  """Adds ``entries`` to ``<workdir>/results.json`` (lead process only)."""
  if jax.process_index() == 0:
    write_json(os.path.join(workdir, RESULTS), {**recorded(workdir), **entries})


def logged_metrics_at(jsonl: str, step: int) -> dict[str, float]:
  """Every value the JSONL log at ``jsonl`` holds for ``step``, merged over its rows."""
  merged = {}
  if os.path.exists(jsonl):
    with open(jsonl, encoding="utf-8") as f:
      for line in f:
        try:
          row = json.loads(line)
        except ValueError:
          continue  # a line cut short by a kill
        if isinstance(row, dict) and row.get("step") == step:
          merged.update({name: value for name, value in row.items() if name != "step"})
  return merged
