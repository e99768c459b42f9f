r"""Quick start: MAE on Fashion-MNIST (28x28 grey, patch 4) that pretrains on a laptop CPU in minutes.

  python -m sslx.main --config=configs/mae_fashion_mnist.py --workdir=runs/quickstart

Reads the IDX files of Debian's `dataset-fashion-mnist` package (/usr/share/datasets/fashion-mnist), or
``--config.data.data_dir=DIR`` holding the same four files. ``:test`` shrinks it to a few steps.
"""
from sslx import config as config_lib


def get_config(arg=None):
  if arg not in (None, "", "test"):
    raise ValueError(f"Unknown config argument {arg!r}: use nothing or ':test'")
  config = config_lib.pretrain_config()
  config.model.variant = "Ti/4"
  config.model.depth = 4
  config.model.decoder.update(dict(width=128, depth=2, num_heads=4, mlp_dim=512))
  config.data.augment.crop_scale = (0.35, 1.0)
  config.batch_size = 256
  config.num_epochs = 2
  config.optimizer.base_lr = 1e-3
  config.schedule.warmup_epochs = 0.2
  config.checkpoint.every_steps = 200
  config.log_every_steps = 20
  config.viz_every_steps = 200
  if arg == "test":
    config.batch_size = 32
    config.total_steps = 6
    config.checkpoint.every_steps = 3
    config.log_every_steps = 2
    config.viz_every_steps = 3
  return config_lib.finalize(config)
