"""A tiny MAE run on the real Fashion-MNIST files, shared by the training-loop tests and their subprocesses."""
import json
import os
import sys

from sslx import config as config_lib
from sslx import recipes


def tiny_run_config(**overrides):
  config = recipes.mae_config("Ti/7")
  config.model.update(dict(width=32, depth=1, num_heads=2, mlp_dim=64))
  config.method.decoder.update(dict(width=32, depth=1, num_heads=2, mlp_dim=64))
  config.batch_size = 16
  config.total_steps = 6
  config.optimizer.base_lr = 2e-2  # lr = 1.25e-3 at batch 16
  config.schedule.warmup_epochs = 0.0
  config.checkpoint.update(dict(every_steps=2, max_to_keep=5))
  config.log_every_steps = 1
  config.viz_every_steps = 3
  config.viz_num_images = 4
  # Small monitor subsets keep each report (at every checkpoint and at step 0) well under a second.
  config.monitor.update(dict(knn_train_examples=200, knn_test_examples=100, probe_batch_size=8))
  config.eval.batch_size = 100
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config_lib.finalize(config)


def logged_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return {row["step"]: row["loss"] for row in map(json.loads, f) if "loss" in row}


if __name__ == "__main__":
  # python tests/train_helpers.py WORKDIR PARAMS_NPZ [key=value ...]: trains and dumps the final params.
  # Run with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID set, it is one process of several.
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from sslx import parallel  # pylint: disable=g-import-not-at-top
  from sslx import train  # pylint: disable=g-import-not-at-top
  parallel.maybe_initialize_distributed()
  workdir, params_path, *pairs = sys.argv[1:]
  overrides = {key: json.loads(value) for key, value in (pair.split("=", 1) for pair in pairs)}
  from sslx import preemption  # pylint: disable=g-import-not-at-top
  try:
    state, _ = train.train(tiny_run_config(**overrides), workdir)
  except preemption.Preempted as stop:  # as `python -m sslx.main` ends
    print(stop, flush=True)
    sys.exit(stop.exit_code)
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]
  np.savez(params_path, **{jax.tree_util.keystr(path): leaf for path, leaf in leaves})
