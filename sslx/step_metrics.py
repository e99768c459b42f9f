"""What the training loop does with each step's metrics: stops on non-finite values, averages them between
logs and writes them (progress line, JSONL, TensorBoard), and warns when the method reports a collapse.

A method that can tell its own collapse (DINO: a uniform or one-hot teacher the student has caught up with)
reports a per-step ``collapse`` metric, 1 or 0; its mean over the steps since the last log is the fraction
flagged, and any fraction above 0 is logged as a warning. The loop needs no knowledge of the method.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np
from absl import logging

from sslx import metrics as metrics_lib

COLLAPSE = "collapse"  # the per-step 0/1 metric a method reports when it sees itself collapsed


class NonFiniteLossError(FloatingPointError):
  """Loss, gradients or parameters stopped being finite; the run stops and keeps its last good checkpoint."""


class NonFiniteGuard:
  """Reads the fetched step metrics under ``config.nan_policy``; raises `NonFiniteLossError` to stop.

  'stop': the first non-finite loss, gradient norm or parameter norm stops the run. 'skip': the step
  skipped that update (see `sslx.train.make_train_step`); the run stops after ``nan_max_skips`` skips in a row, or
  when a parameter stopped being finite anyway.
  """

  def __init__(self, config, checkpointer):
    self._skip = config.nan_policy == "skip"
    self._max_skips = config.nan_max_skips
    self._checkpointer = checkpointer
    self._in_a_row = 0

  def check(self, step_metrics: list[tuple[int, dict]]) -> None:
    for step, values in step_metrics:
      if self._skip and values["nonfinite_skipped"]:
        self._in_a_row += 1
        print(f"step {step}: loss {float(values['loss'])}, grad_norm {float(values['grad_norm'])}: update "
              f"skipped ({self._in_a_row} in a row)", flush=True)
        if self._in_a_row >= self._max_skips:
          self._stop(f"{self._in_a_row} updates in a row were not finite (config.nan_max_skips="
                     f"{self._max_skips}), the last at step {step}")
        continue
      self._in_a_row = 0
      for name in ("loss", "grad_norm", "param_norm"):
        if not math.isfinite(float(values[name])):
          self._stop(f"{name} = {float(values[name])} at step {step}")

  def _stop(self, what: str) -> None:
    self._checkpointer.close()  # finish the saves in flight: they hold good states
    kept = self._checkpointer.all_steps()
    raise NonFiniteLossError(f"{what}; stopping. Kept checkpoints: {kept or 'none'} in "
                             f"{self._checkpointer.directory} (the newest one is the last good state).")


def mean_metrics(step_metrics: list[tuple[int, dict]], schedule_names) -> dict[str, float]:
  """Means over the steps since the last log; scheduled values (lr, weight decay) as of the last step.

  Skipped (non-finite) steps count in ``nonfinite_skipped`` (their number) and in no mean, unless every
  step was skipped.
  """
  values = [values for _, values in step_metrics]
  kept = [row for row in values if not row.get("nonfinite_skipped")] or values
  scalars = {name: float(np.mean([row[name] for row in kept])) for name in values[0]}
  if "nonfinite_skipped" in values[0]:
    scalars["nonfinite_skipped"] = float(sum(row["nonfinite_skipped"] for row in values))
  scalars.update({name: float(values[-1][name]) for name in schedule_names})
  return scalars


def warn_collapse(step: int, scalars: dict[str, float], method: str) -> None:
  """Logs a warning when the logged mean of the ``collapse`` metric of ``method`` (its name) is above 0."""
  fraction = scalars.get(COLLAPSE, 0.0)
  if fraction > 0:
    logging.warning("step %d: collapse: %s flagged %.0f%% of the steps since the last log (sslx/methods/%s.py "
                    "says what it watches).", step, method, 100 * fraction, method)


def is_due(period_steps: Optional[float], step: int, is_last: bool) -> bool:
  return period_steps is not None and (step % max(int(round(period_steps)), 1) == 0 or is_last)


class RunLogger:
  """Progress line on every process; JSONL and TensorBoard from the lead only.

  Starting at ``start_step`` (0 for a fresh run), rows a killed run logged past it are dropped from the
  JSONL and hidden in TensorBoard: the resumed run logs those steps again.
  """

  def __init__(self, config, workdir: str, *, total_steps: int, start_step: int, is_lead: bool):
    self._lead = is_lead
    self._method = config.method.name
    self.progress = metrics_lib.ProgressLine(total_steps, config.batch_size)
    if self._lead:
      with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=2))
      jsonl = os.path.join(workdir, "metrics.jsonl")
      # A fresh run logs its step-0 monitor report again, so it keeps no row at all.
      dropped = metrics_lib.drop_rows_after(jsonl, start_step if start_step else -1)
      if dropped:
        print(f"metrics.jsonl: dropped {dropped} rows logged after step {start_step} by an earlier run",
              flush=True)
      self._jsonl = metrics_lib.JsonlWriter(jsonl)
      self._tensorboard = metrics_lib.TensorBoardWriter(os.path.join(workdir, "tensorboard"),
                                                        purge_step=start_step + 1 if start_step else 0)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if self._lead:
      warn_collapse(step, scalars, self._method)
      self._jsonl.write(step, scalars)
      self._tensorboard.write_scalars(step, scalars)

  def flush(self) -> None:
    """Puts every event logged so far on disk: the events of the steps a checkpoint holds survive a kill."""
    if self._lead:
      self._tensorboard.flush()

  def close(self) -> None:
    self.progress.close()
    if self._lead:
      self._jsonl.close()
      self._tensorboard.close()
