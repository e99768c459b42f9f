"""Command-line errors are one line with exit status 2, and ``--config.KEY=None`` clears placeholders.

The end-to-end tests run a small absl program shaped like sslx/main.py (``DEFINE_config_file`` with
``lock_config=True``, then `cli.run`) in a subprocess, since flag parsing happens once per process.
"""
import json
import os
import subprocess
import sys
import textwrap

import ml_collections
from ml_collections.config_dict import placeholder
import pytest

from sslx import cli

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_MAIN = """
from absl import flags
from ml_collections import config_flags
from sslx import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  print(_CONFIG.value.to_json())


if __name__ == "__main__":
  cli.run(main)
"""

_CONFIG = """
import ml_collections
from ml_collections.config_dict import placeholder


def get_config(arg=None):
  if arg not in (None, "test"):
    raise ValueError(f"unknown config argument {arg!r} (known: test)")
  config = ml_collections.ConfigDict()
  config.batch_size = 8
  config.init_from = placeholder(str)
  config.total_steps = placeholder(int)
  config.total_steps = 20  # a placeholder the file set stays one
  config.grad_clip = placeholder(float)
  config.views = placeholder(tuple)
  config.start_from = placeholder(object)  # a run directory or (run_dir, source, target) triples
  config.parallel = ml_collections.ConfigDict(dict(fsdp=1))
  config.model = ml_collections.ConfigDict(dict(variant="B/16", width=placeholder(int)))
  config.lock()
  return config
"""


@pytest.fixture(name="program")
def fixture_program(tmp_path):
  (tmp_path / "main.py").write_text(_MAIN)
  (tmp_path / "config.py").write_text(_CONFIG)

  def run(*args, config=str(tmp_path / "config.py")):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([_REPO, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(tmp_path / "main.py"), f"--config={config}",
                           f"--workdir={tmp_path / 'run'}", *args],
                          capture_output=True, text=True, env=env, cwd=_REPO, timeout=120)
  return run


def _one_line_error(result) -> str:
  assert result.returncode == 2, result.stderr
  assert result.stdout == ""
  lines = result.stderr.splitlines()
  assert len(lines) == 1, result.stderr
  return lines[0]


@pytest.mark.parametrize("override,line", [
    ("--config.model.varaint=B/16", "unknown config key 'model.varaint' (did you mean 'model.variant'?)"),
    ("--config.batch=4", "unknown config key 'batch' (did you mean 'batch_size'?)"),
    # A key that lives elsewhere is found by its name.
    ("--config.fsdp=2", "unknown config key 'fsdp' (did you mean 'parallel.fsdp'?)"),
    ("--config.model.zzz=1", "unknown config key 'model.zzz' (known keys of model: variant, width)"),
    ("--config.model.variant.size=1", "unknown config key 'model.variant.size' ('model.variant' is a string, "
                                      "which has no keys)"),
    ("--config.foo=None", "unknown config key 'foo' (known keys: batch_size, grad_clip, init_from, model, "
                          "parallel, start_from, total_steps, views)"),
    ("--config.batch_size=abc", "config key 'batch_size' takes an int, not 'abc'"),
    ("--config.grad_clip=big", "config key 'grad_clip' takes a float, not 'big'"),
    ("--config.batch_size=None",
     "config key 'batch_size' cannot be None: only keys whose default is None can"),
])
def test_bad_override_is_one_line_and_status_2(program, override, line):
  assert _one_line_error(program(override)) == line


def test_config_argument_error_is_one_line(program, tmp_path):
  line = _one_line_error(program(config=f"{tmp_path / 'config.py'}:tset"))
  assert line == f"--config={tmp_path / 'config.py'}:tset: unknown config argument 'tset' (known: test)"


def test_missing_config_file_is_one_line(program, tmp_path):
  line = _one_line_error(program("--config.batch_size=4", config=str(tmp_path / "nowhere.py")))
  assert line.startswith(f"--config={tmp_path / 'nowhere.py'}: cannot load it (")
  assert "No such file or directory" in line


def test_none_clears_every_kind_of_placeholder(program):
  result = program("--config.init_from=None", "--config.total_steps=None", "--config.grad_clip=None",
                   "--config.views=None", "--config.model.width=None", "--config.start_from=None")
  assert result.returncode == 0, result.stderr
  config = json.loads(result.stdout)
  keys = ("init_from", "total_steps", "grad_clip", "views", "start_from")
  assert [config[key] for key in keys] == [None] * len(keys)
  assert config["model"]["width"] is None


def test_eval_split_of_a_real_config_can_be_none(program):
  # Its default is a string, so without a FieldReference config_flags would store the string 'None'.
  result = program("--config.data.eval_split=None",
                   config=os.path.join(_REPO, "configs", "mae_fashion_mnist.py") + ":test")
  assert result.returncode == 0, result.stderr
  assert json.loads(result.stdout)["data"]["eval_split"] is None


def test_last_override_of_a_key_wins(program):
  result = program("--config.total_steps=None", "--config.total_steps=3", "--config.model.width=4",
                   "--config.model.width=None")
  assert result.returncode == 0, result.stderr
  config = json.loads(result.stdout)
  assert config["total_steps"] == 3 and config["model"]["width"] is None


@pytest.mark.parametrize("value,expected", [
    ("runs/a", "runs/a"),
    ("/abs/run_1", "/abs/run_1"),
    ("(('runs/a','params/encoder','params/teacher'),)", [["runs/a", "params/encoder", "params/teacher"]]),
])
def test_object_placeholder_takes_a_path_or_triples(program, value, expected):
  # The type recommended for config.init_from: a literal parser keeps what is not a Python literal a string.
  result = program(f"--config.start_from={value}")
  assert result.returncode == 0, result.stderr
  assert json.loads(result.stdout)["start_from"] == expected


def test_unknown_key_of_a_real_config(program):
  line = _one_line_error(program("--config.model.varaint=B/16", config="configs/mae_fashion_mnist.py:test"))
  assert line == "unknown config key 'model.varaint' (did you mean 'model.variant'?)"


def _config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(dict(batch_size=8, init_from=placeholder(str), plain=None,
                                          model=dict(variant="B/16", width=placeholder(int))))
  config.model.width = 64
  config.lock()
  return config


def test_set_to_none_on_a_config():
  config = _config()
  cli.set_to_none(config, "init_from")
  cli.set_to_none(config, "model.width")
  cli.set_to_none(config, "plain")
  assert config.init_from is None and config.model.width is None and config.plain is None
  config.model.width = 32  # still a typed placeholder afterwards
  with pytest.raises(TypeError):
    config.model.width = "wide"
  with pytest.raises(cli.ConfigKeyError, match="config key 'batch_size' cannot be None"):
    cli.set_to_none(config, "batch_size")
  with pytest.raises(cli.ConfigKeyError,
                     match=r"unknown config key 'model.widht' \(did you mean 'model.width'\?\)"):
    cli.set_to_none(config, "model.widht")


def test_split_none_overrides():
  argv = ["prog", "--config=c.py", "--config.a=None", "--config.b=None", "--config.b=2", "-config.c=None",
          "--other=None", "--config.d=3", "--config.d=None", "--config.e=Nonesuch"]
  kept, keys = cli.split_none_overrides(argv)
  assert keys == ["a", "c", "d"]
  assert kept == ["prog", "--config=c.py", "--config.b=2", "--other=None", "--config.d=3",
                  "--config.e=Nonesuch"]


def test_lookup_returns_the_holder():
  config = _config()
  holder, leaf = cli.lookup(config, "model.variant")
  assert holder is config.model and leaf == "variant"


def test_run_passes_remaining_arguments_to_main(program, tmp_path):
  (tmp_path / "echo.py").write_text(textwrap.dedent("""
      from ml_collections import config_flags
      from sslx import cli
      config_flags.DEFINE_config_file("config", None, "Run config.", lock_config=True)
      cli.run(lambda argv: print(argv[1:]))
  """))
  env = dict(os.environ, PYTHONPATH=_REPO)
  result = subprocess.run([sys.executable, str(tmp_path / "echo.py"), f"--config={tmp_path / 'config.py'}",
                           "--config.init_from=None", "extra"],
                          capture_output=True, text=True, env=env, timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "['extra']"
