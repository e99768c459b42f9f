"""Command-line entry point.

    python -m sslx.main --config=configs/mae_vitb.py --workdir=runs/mae_vitb [--config.batch_size=1024 ...]

Running the same command again resumes from the newest checkpoint in ``--workdir``.
"""
from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from sslx import cli
from sslx import parallel

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config: configs/<file>.py[:arg].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and pictures go.")
flags.mark_flags_as_required(["config", "workdir"])


def _train(config, workdir: str) -> None:
  from sslx import results  # pylint: disable=g-import-not-at-top  (keeps --help fast)
  from sslx import train  # pylint: disable=g-import-not-at-top
  state, _ = train.train(config, workdir)
  # A rerun of a finished run that was compared already keeps that comparison.
  if config.task == "pretrain" and config.eval.after_pretrain and "after_pretrain" not in results.recorded(workdir):
    from sslx import methods  # pylint: disable=g-import-not-at-top
    from sslx.evaluate import run  # pylint: disable=g-import-not-at-top
    # The frozen representation does not depend on the run's length, so a nominal build reads it.
    rows = run.compare_with_baselines(config, workdir, methods.build_method(config),
                                      (state.variables, state.method_state))
    results.record(workdir, after_pretrain=rows)


def _evaluate(config, workdir: str) -> None:
  from sslx.evaluate import run  # pylint: disable=g-import-not-at-top
  run.evaluate(config, workdir)


def _tasks():
  return {"pretrain": _train, "finetune": _train, "knn": _evaluate, "linear_probe": _evaluate}


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO; keep the progress line readable
  parallel.maybe_initialize_distributed()
  config = _CONFIG.value
  tasks = _tasks()
  if config.task not in tasks:
    raise app.UsageError(f"config.task={config.task!r} is not one of {sorted(tasks)}")
  from sslx import preemption  # pylint: disable=g-import-not-at-top
  try:
    tasks[config.task](config, _WORKDIR.value)
  except preemption.Preempted as stop:
    print(stop, flush=True)
    sys.exit(stop.exit_code)
  except _run_errors() as error:  # the message says it all; a traceback would bury it
    print(f"error: {error}", file=sys.stderr, flush=True)
    sys.exit(1)


def _run_errors() -> tuple[type[Exception], ...]:
  """Errors of the run's surroundings (a held workdir, failing storage), not of sslx's code."""
  from sslx import checkpoint  # pylint: disable=g-import-not-at-top
  from sslx import checks  # pylint: disable=g-import-not-at-top
  from sslx import run_lock  # pylint: disable=g-import-not-at-top
  from sslx import step_metrics  # pylint: disable=g-import-not-at-top
  return (checks.ConfigError, run_lock.WorkdirLockedError, checkpoint.CheckpointSaveError, checkpoint.CheckpointRestoreError,
          step_metrics.NonFiniteLossError)


if __name__ == "__main__":
  cli.run(main)
