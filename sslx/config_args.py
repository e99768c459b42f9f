"""The one convention for the ``:arg`` of ``--config=configs/<file>.py:<arg>``.

An argument is a comma-separated list of entries, e.g. ``vitb,local,steps=20,lr=1e-3``:

- ``key=value`` sets a declared key; the value is converted to the type of that key's default (``bool``
  accepts true/false/1/0 in any case; a ``None`` default takes the value as a string);
- a bare word that names a ``bool`` key sets it to True (a flag, e.g. ``local``);
- any other bare word fills the next of the ``positional`` keys (e.g. the evaluation's name in
  ``configs/eval.py:knn,local``), provided it is one of that key's ``choices`` where it has some.

``:`` separates entries as well as ``,``, because config_flags passes everything after the first ``:`` of the
flag to ``get_config``: older command lines such as ``configs/eval.py:knn:local`` keep working. Values can
therefore hold neither character.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import ml_collections

_TRUE = ("true", "1")
_FALSE = ("false", "0")
_ARTICLE = {int: "an", float: "a"}


def parse_arg(arg: str | None, *, positional: Sequence[str] = (),
              choices: Mapping[str, Sequence[str]] | None = None,
              **defaults: Any) -> ml_collections.ConfigDict:
  """Parses a config argument into a locked ConfigDict holding every key of ``defaults``.

  Args:
    arg: the text after ``configs/<file>.py:``; None or empty gives the defaults.
    positional: keys, in order, that bare words which are not flags fill.
    choices: allowed values of (string) keys, checked for defaults and given values alike.
    **defaults: every key the argument may set, with its default value (bool, int, float, str or None).

  Returns:
    The values, locked, so a misspelt key in the config file reading them is an error too.

  Raises:
    ValueError: naming the entry, for an unknown key or bare word, a value of the wrong type, a value
      outside its choices, or a key given twice.
  """
  choices = dict(choices or {})
  for key in (*positional, *choices):
    if key not in defaults:
      raise TypeError(f"{key!r} is named in positional= or choices= but has no default")
  for key, default in defaults.items():
    if default is not None and not isinstance(default, (bool, int, float, str)):
      raise TypeError(f"config argument {key!r} has a default of unsupported type {type(default).__name__}")
  values = dict(defaults)
  given = set()
  slots = list(positional)
  for entry in re.split(r"[,:]", arg or ""):
    entry = entry.strip()
    if not entry:
      continue
    key, has_value, text = entry.partition("=")
    key = key.strip()
    if has_value:
      if key not in defaults:
        raise ValueError(f"unknown config argument {key!r} ({_known(defaults, choices)})")
      value = _convert(key, text.strip(), defaults[key])
    elif isinstance(defaults.get(key), bool):
      value = True
    elif slots and (slots[0] not in choices or key in choices[slots[0]]):
      key, value = slots[0], _convert(slots[0], key, defaults[slots[0]])
    else:
      raise ValueError(f"unknown config argument {entry!r} ({_known(defaults, choices)})")
    if key in given:
      raise ValueError(f"config argument {key!r} is given twice in {arg!r}")
    given.add(key)
    if key in slots:
      slots.remove(key)
    values[key] = value
  for key, allowed in choices.items():
    if values[key] not in allowed:
      raise ValueError(f"config argument {key}={values[key]!r} is not one of {', '.join(map(str, allowed))}")
  config = ml_collections.ConfigDict(values)
  config.lock()
  return config


def _known(defaults: Mapping[str, Any], choices: Mapping[str, Sequence[str]]) -> str:
  names = [f"{key}={'|'.join(map(str, choices[key]))}" if key in choices else key for key in sorted(defaults)]
  return f"known: {', '.join(names)}" if names else "this config takes no argument"


def _convert(key: str, text: str, default: Any) -> Any:
  """``text`` as the type of ``default``; bool is tested before int because it is a subclass of it."""
  if isinstance(default, bool):
    if text.lower() in _TRUE:
      return True
    if text.lower() in _FALSE:
      return False
    raise ValueError(f"config argument {key}={text!r} is not a bool (true/false/1/0)")
  if default is None or isinstance(default, str):
    return text
  kind = type(default)
  try:
    return kind(text)
  except ValueError:
    raise ValueError(f"config argument {key}={text!r} is not {_ARTICLE[kind]} {kind.__name__}") from None
