"""Command-line parsing for ``--config`` (ml_collections config_flags) that speaks in one-line errors.

``run(main)`` replaces ``absl.app.run(main)``. On top of config_flags it

- lets ``--config.KEY=None`` set any placeholder key (a key whose default is None) to None: config_flags
  parses the text with the key's type, so ``None`` would arrive as the string ``'None'`` or fail as an int;
- turns a mistaken override into one line on stderr and exit status 2, instead of a 50-line traceback:
  ``unknown config key 'model.varaint' (did you mean 'model.variant'?)``, or a value that does not parse
  (``config key 'batch_size' takes an int, not 'abc'``), or a config argument that ``get_config``
  rejected with a ValueError. Other flag errors print absl's own message (without its usage hint), also
  with status 2; errors that are not the command line's (a bug in a config file) keep their traceback.
"""
from __future__ import annotations

import difflib
import functools
import re
import sys
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
import ml_collections

_TYPE_NAMES = {int: "an int", float: "a float", bool: "a bool (true/false)", str: "a string",
               tuple: "a tuple"}


class ConfigKeyError(ValueError):
  """A ``--config.KEY`` override that names no key of the config, or that cannot take its value."""


def run(main: Callable[[list[str]], Any], *, config_flag: str = "config") -> None:
  """``absl.app.run(main)`` with `parse_flags` as its flag parser."""
  app.run(main, flags_parser=functools.partial(parse_flags, config_flag=config_flag))


def parse_flags(argv: Sequence[str], *, config_flag: str = "config") -> list[str]:
  """Parses ``argv`` into ``absl.flags.FLAGS``; returns the arguments left for ``main``.

  A command-line mistake ends the process with one line on stderr and status 2.
  """
  argv = [*argv[:1], *flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False)]
  kept, none_keys = split_none_overrides(argv, config_flag)
  try:
    remaining = flags.FLAGS(kept)
    config = flags.FLAGS[config_flag].value
    if not isinstance(config, ml_collections.ConfigDict):
      config.lock()  # config_flags holds back a failure to load the file until the config is used
    for key in none_keys:
      set_to_none(config, key)
  # config_flags reports an unknown key as whatever its lookup raised (AttributeError, KeyError, TypeError,
  # ...): anything that `_describe` cannot put down to the command line is raised again unchanged.
  except Exception as error:  # pylint: disable=broad-except
    message = _describe(error, argv, config_flag)
    if message is None:
      raise
    print(message, file=sys.stderr)
    sys.exit(2)
  return remaining


def split_none_overrides(argv: Sequence[str], config_flag: str = "config") -> tuple[list[str], list[str]]:
  """Takes every ``--<config_flag>.KEY=None`` out of ``argv``.

  Returns the other arguments and the keys whose last override on the command line was None, in order.
  Their ``KEY=None`` arguments are dropped even where a later override of the same key wins, so that none
  of them reaches a parser of the key's type.
  """
  prefix = re.compile(rf"^--?{re.escape(config_flag)}\.([^=]+)=(.*)$")
  kept, last_values = [], {}
  for arg in argv:
    match = prefix.match(arg)
    if match:
      last_values.pop(match.group(1), None)  # re-inserted, so the order is that of the last overrides
      last_values[match.group(1)] = match.group(2)
      if match.group(2) == "None":
        continue
    kept.append(arg)
  return kept, [key for key, value in last_values.items() if value == "None"]


def set_to_none(config: ml_collections.ConfigDict, key: str) -> None:
  """Sets the dotted ``key`` of ``config`` to None; it must be a placeholder (or already None)."""
  holder, leaf = lookup(config, key)
  field = dict(holder.items(preserve_field_references=True))[leaf]
  if not isinstance(field, ml_collections.FieldReference) and field is not None:
    raise ConfigKeyError(f"config key {key!r} cannot be None: only keys whose default is None can")
  holder[leaf] = None


def lookup(config: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
  """The ConfigDict holding the dotted ``key`` and the key's last part; ConfigKeyError if there is none."""
  parts = key.split(".")
  holder = config
  for depth, part in enumerate(parts):
    if not isinstance(holder, ml_collections.ConfigDict):
      parent = ".".join(parts[:depth])
      raise ConfigKeyError(f"unknown config key {key!r} ({parent!r} is {_type_name(type(holder))}, "
                           "which has no keys)")
    if part not in holder:
      raise ConfigKeyError(f"unknown config key {key!r} ({_suggest(config, parts[:depth], part)})")
    if depth < len(parts) - 1:
      holder = holder[part]
  return holder, parts[-1]


def _suggest(config: ml_collections.ConfigDict, parents: list[str], name: str) -> str:
  """Close names beside the missing one, else keys of that name elsewhere (``fsdp``: ``parallel.fsdp``)."""
  holder = config
  for parent in parents:
    holder = holder[parent]
  prefix = "".join(f"{parent}." for parent in parents)
  close = [prefix + match for match in difflib.get_close_matches(name, list(holder.keys()), n=3)]
  if not close:
    paths = list(_dotted_keys(config))
    leaves = difflib.get_close_matches(name, {path.rsplit(".", 1)[-1] for path in paths}, n=3, cutoff=0.8)
    close = [path for path in paths if path.rsplit(".", 1)[-1] in leaves][:3]
  if close:
    return "did you mean " + " or ".join(map(repr, close)) + "?"
  return f"known keys{' of ' + prefix[:-1] if prefix else ''}: {', '.join(sorted(holder.keys()))}"


def _dotted_keys(config: ml_collections.ConfigDict, prefix: str = ""):
  for key in config.keys():
    yield prefix + key
    if isinstance(config[key], ml_collections.ConfigDict):
      yield from _dotted_keys(config[key], f"{prefix}{key}.")


def _describe(error: Exception, argv: Sequence[str], config_flag: str) -> str | None:
  """The one line that says what went wrong, or None for an error that is not the command line's."""
  if isinstance(error, ConfigKeyError):
    return str(error)
  config = _load_config(argv, config_flag)
  if config is not None:
    for key in _override_keys(argv, config_flag):
      try:
        lookup(config, key)
      except ConfigKeyError as unknown:
        return str(unknown)
  if isinstance(error, OSError):
    reason = str(error).strip().splitlines()[-1].strip()
    return f"--{config_flag}={_config_argument(argv, config_flag)}: cannot load it ({reason})"
  if not isinstance(error, flags.Error):
    return None
  message = str(error)
  bad_value = re.match(rf"flag --{re.escape(config_flag)}\.([^=]+)=(.*?): ", message)
  if bad_value:
    key, value = bad_value.groups()
    if config is not None:
      holder, leaf = lookup(config, key)
      return f"config key {key!r} takes {_type_name(holder.get_type(leaf))}, not {value!r}"
    return f"bad value for config key {key!r}: {message[bad_value.end():]}"
  last_line = message.strip().splitlines()[-1]
  if message.startswith(f"flag --{config_flag}=") and last_line.startswith("ValueError: "):
    # get_config rejected its argument: its own message says why; the traceback adds nothing.
    return f"{message.split(': ', 1)[0].removeprefix('flag ')}: {last_line.removeprefix('ValueError: ')}"
  return message


def _type_name(kind: type) -> str:
  return _TYPE_NAMES.get(kind, kind.__name__)


def _config_argument(argv: Sequence[str], config_flag: str) -> str | None:
  """The last value given to ``--<config_flag>``, as absl would take it."""
  value = None
  for position, arg in enumerate(argv[1:], start=1):
    if arg in (f"-{config_flag}", f"--{config_flag}") and position + 1 < len(argv):
      value = argv[position + 1]
    elif re.match(rf"^--?{re.escape(config_flag)}=", arg):
      value = arg.split("=", 1)[1]
  return value


def _load_config(argv: Sequence[str], config_flag: str) -> ml_collections.ConfigDict | None:
  """The config that ``--<config_flag>`` names, loaded again without overrides; None if that fails."""
  value = _config_argument(argv, config_flag)
  if value is None or config_flag not in flags.FLAGS:
    return None
  try:
    config = flags.FLAGS[config_flag].parser.parse(value)
  except Exception:  # pylint: disable=broad-except  (the original error is reported instead)
    return None
  return config if isinstance(config, ml_collections.ConfigDict) else None


def _override_keys(argv: Sequence[str], config_flag: str) -> list[str]:
  keys = []
  for arg in argv[1:]:
    match = re.match(rf"^--?(?:no)?{re.escape(config_flag)}\.([^=]+)", arg)
    if match:
      keys.append(match.group(1))
  return keys
