r"""Frozen-encoder evaluation of a pretraining run: weighted kNN (DINO) or a linear probe (MAE).

  python -m sslx.main --config=configs/eval.py:knn --config.init_from=runs/quickstart --workdir=runs/qs_knn
  python -m sslx.main --config=configs/eval.py:linear_probe --config.init_from=runs/quickstart \
      --workdir=runs/qs_probe [--config.eval.probe=lars]

The encoder, its data set and splits come from ``init_from`` (its config.json and newest checkpoint);
``--config.data_dir`` points at data that moved. Without ``init_from`` a randomly initialised encoder of
the quick start's shape is evaluated on Fashion-MNIST. Settings: ``config.eval.*``.
"""
from sslx import config as config_lib
from sslx import recipes
from sslx.evaluate import run


def get_config(arg="knn"):
  config = run.eval_task_config(arg)
  quick_start = recipes.mae_fashion_mnist()
  config.model = quick_start.model
  config.data = quick_start.data
  return config_lib.finalize(config)
