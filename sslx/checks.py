"""Every bad-input check of a run, before anything is built or compiled.

Each module validates its own section (`sslx.config` the generic keys, the encoder module ``config.model``,
the method module ``config.method``, the data pipeline ``config.data``, `sslx.optim` ``config.optimizer``);
this module only calls them in order and checks what lies between sections.
"""
from __future__ import annotations

from sslx import config as config_lib
from sslx import init_from
from sslx import methods
from sslx import models
from sslx import optim
from sslx.data import pipeline


def validate_run_config(config) -> None:
  """Raises a ValueError naming the first bad key of a training run (pretraining or fine-tuning)."""
  config_lib.validate_config(config)
  if config.method.name not in methods.known_methods():
    raise ValueError(f"config.method.name={config.method.name!r} is not one of {methods.known_methods()}")
  models.validate_config(config.model, config.data.image_size)
  methods.validate_config(config)
  pipeline.validate_data_config(config.data)
  optim.validate_optimizer_config(config)
  init_from.parse_mappings(config.init_from)


def validate_views(config, num_views: int) -> None:
  """The data must give the method as many views as it consumes (a one-view method reads ``'image'``)."""
  views = config.data.views
  if num_views == 1 and views is not None:
    raise ValueError(f"config.data.views={views!r}: config.method.name={config.method.name!r} consumes one "
                     "view; set config.data.augmentation instead")
  if num_views > 1 and (views is None or len(views) != num_views):
    raise ValueError(f"config.method.name={config.method.name!r} consumes {num_views} views but "
                     f"config.data.views={views!r}: list {num_views} augmentation specs")
