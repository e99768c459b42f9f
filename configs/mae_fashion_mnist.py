r"""Quick start: MAE on Fashion-MNIST (28x28 grey, patch 4) that pretrains on a laptop CPU in minutes.

  python -m sslx.main --config=configs/mae_fashion_mnist.py --workdir=runs/quickstart

Reads the IDX files of Debian's `dataset-fashion-mnist` package (/usr/share/datasets/fashion-mnist), or
``--config.data.data_dir=DIR`` holding the same four files. It ends by printing the kNN and linear-probe
accuracy of the trained encoder beside a randomly initialised one's. ``:test`` shrinks it to 6 steps of a
one-block encoder and decoder with small monitor subsets, for the tests. Random masking of 75% by default;
another strategy with e.g. ``--config.method.mask_strategy=block`` (`sslx.mask_policy`).
"""
from sslx import config as config_lib
from sslx import config_args
from sslx import recipes


def get_config(arg=None):
  test = config_args.parse_arg(arg, test=False).test
  config = recipes.mae_fashion_mnist()
  if test:
    recipes.shrink_test_run(config)
    config.viz_every_steps = 3
    config.model.depth = 1
    config.method.decoder.depth = 1
  return config_lib.finalize(config)
