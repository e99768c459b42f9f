"""Every bad-input check of a run, before anything is built or compiled.

Each module validates its own section (`sslx.config` the generic keys, the encoder module ``config.model``,
the method module ``config.method``, the data pipeline ``config.data``, `sslx.optim` ``config.optimizer``);
this module only calls them in order and checks what lies between sections.
"""
from __future__ import annotations

import os

from sslx import config as config_lib
from sslx import init_from
from sslx import methods
from sslx import models
from sslx import optim
from sslx.data import pipeline


class ConfigError(ValueError):
  """A rejected run config or ``--workdir``: the one-line message names the ``config.`` key or the flag, and
  is all a user needs to read (the command line prints it without a traceback)."""


def validate_workdir(workdir) -> None:
  """Raises a `ConfigError` naming ``--workdir`` unless it is, or can become, a folder of this run.

  Checked first of all, so that an empty flag does not scatter checkpoints into the current directory and
  a path through a file fails in one line instead of inside Orbax after the data has loaded. A URL
  (``gs://...``) is left to the storage library.
  """
  if not isinstance(workdir, str) or not workdir.strip():
    raise ConfigError(f"--workdir={workdir!r} is empty: name the folder for the run's checkpoints, metrics "
                      "and pictures")
  if "://" in workdir:
    return
  path = os.path.abspath(workdir)
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    where = "is a file" if existing == path else f"lies under the file {existing}"
    raise ConfigError(f"--workdir={workdir!r} {where}; it must be a folder (or a path where one can be made)")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ConfigError(f"--workdir={workdir!r}: {existing} is not writable")


def validate_run_config(config, *, open_data: bool = True) -> None:
  """Raises a `ConfigError` naming the first bad key of a training run (pretraining or fine-tuning).

  The data section's values go first, since the encoder's and the method's checks read its image size and
  channels; the method is then built (cheap: no parameters) to learn how many views it consumes; the data
  itself is opened last (missing data raises FileNotFoundError), unless ``open_data`` is False (a config for
  data this machine does not hold).
  """
  try:
    _validate_sections(config, open_data)
  except ValueError as error:  # each section's module raises plain ValueErrors
    raise ConfigError(str(error)) from error


def _validate_sections(config, open_data: bool) -> None:
  config_lib.validate_config(config)
  if config.method.name not in methods.known_methods():
    raise ValueError(f"config.method.name={config.method.name!r} is not one of {methods.known_methods()}")
  pipeline.validate_data_values(config.data)
  models.validate_config(config.model, config.data.image_size)
  methods.validate_config(config)
  optim.validate_optimizer_config(config)
  init_from.parse_mappings(config.init_from)
  validate_views(config, methods.build_method(config).num_views)
  if open_data:
    pipeline.check_splits_exist(config.data)


def validate_views(config, num_views: int) -> None:
  """The data must give the method as many views as it consumes (a one-view method reads ``'image'``)."""
  views = config.data.views
  if num_views == 1 and views is not None:
    raise ValueError(f"config.data.views={views!r}: config.method.name={config.method.name!r} consumes one "
                     "view; set config.data.augmentation instead")
  if num_views > 1 and (views is None or len(views) != num_views):
    raise ValueError(f"config.method.name={config.method.name!r} consumes {num_views} views but "
                     f"config.data.views={views!r}: list {num_views} augmentation specs")
