"""The ``:arg`` convention of every config: types from the defaults, flags, positional choices, errors."""
import pytest

from sslx.config_args import parse_arg

_EVALUATIONS = ("knn", "linear_probe", "imagenet_knn", "imagenet_linear_probe")


def _eval_arg(arg):
  # The shape configs/eval.py needs: a named evaluation, then an optional size flag.
  return parse_arg(arg, positional=("name",), choices={"name": _EVALUATIONS}, name="knn", local=False)


@pytest.mark.parametrize("arg", [None, "", " , "])
def test_empty_argument_gives_the_defaults(arg):
  assert parse_arg(arg, local=False, steps=20).to_dict() == {"local": False, "steps": 20}


def test_values_take_the_type_of_their_default():
  args = parse_arg("steps=7,lr=1e-3,name=foo,local=true,ema=0,tag=x", steps=20, lr=0.1, name="bar",
                   local=False, ema=True, tag=None)
  assert args.to_dict() == {"steps": 7, "lr": 1e-3, "name": "foo", "local": True, "ema": False, "tag": "x"}
  assert isinstance(args.steps, int) and isinstance(args.lr, float)


@pytest.mark.parametrize("text,expected", [("true", True), ("True", True), ("1", True), ("FALSE", False),
                                           ("0", False)])
def test_bool_spellings(text, expected):
  assert parse_arg(f"local={text}", local=not expected).local is expected


def test_bare_word_sets_a_bool_flag():
  assert parse_arg("local", local=False, test=False).to_dict() == {"local": True, "test": False}


def test_positional_choice_and_flag_in_either_order():
  assert _eval_arg("imagenet_knn,local").to_dict() == {"name": "imagenet_knn", "local": True}
  assert _eval_arg("local,linear_probe").to_dict() == {"name": "linear_probe", "local": True}
  assert _eval_arg("local").to_dict() == {"name": "knn", "local": True}
  assert _eval_arg("name=linear_probe").name == "linear_probe"


def test_colon_separates_entries_like_a_comma():
  # config_flags hands get_config everything after the first ':', so 'eval.py:knn:local' arrives so.
  expected = {"name": "imagenet_linear_probe", "local": True}
  assert _eval_arg("imagenet_linear_probe:local").to_dict() == expected


def test_positional_without_choices_takes_any_word():
  assert parse_arg("vitb", positional=("variant",), variant="vitl").variant == "vitb"


def test_result_is_locked():
  args = parse_arg("local", local=False)
  with pytest.raises(AttributeError):
    args.lcoal = True


def test_unknown_key_names_it_and_the_known_ones():
  with pytest.raises(ValueError, match=r"unknown config argument 'lcoal' \(known: local, steps\)"):
    parse_arg("lcoal", local=False, steps=20)
  with pytest.raises(ValueError, match=r"unknown config argument 'stesp' \(known: local, steps\)"):
    parse_arg("stesp=3", local=False, steps=20)


def test_word_outside_the_choices_lists_them():
  with pytest.raises(ValueError, match=r"unknown config argument 'knnn' \(known: local, "
                                       r"name=knn\|linear_probe\|imagenet_knn\|imagenet_linear_probe\)"):
    _eval_arg("knnn")
  with pytest.raises(ValueError, match=r"config argument name='knnn' is not one of knn, linear_probe"):
    _eval_arg("name=knnn")


def test_bare_word_for_a_valued_key_is_unknown():
  with pytest.raises(ValueError, match="unknown config argument 'steps'"):
    parse_arg("steps", steps=20)


def test_config_without_arguments_says_so():
  with pytest.raises(ValueError, match=r"unknown config argument 'local' \(this config takes no argument\)"):
    parse_arg("local")


@pytest.mark.parametrize("arg,message", [
    ("steps=abc", r"config argument steps='abc' is not an int"),
    ("lr=fast", r"config argument lr='fast' is not a float"),
    ("local=yes", r"config argument local='yes' is not a bool \(true/false/1/0\)"),
])
def test_bad_values_name_the_key(arg, message):
  with pytest.raises(ValueError, match=message):
    parse_arg(arg, steps=20, lr=0.1, local=False)


def test_key_given_twice():
  with pytest.raises(ValueError, match="config argument 'name' is given twice"):
    _eval_arg("knn,name=linear_probe")


def test_declaration_mistakes_are_type_errors():
  with pytest.raises(TypeError, match="'name' is named in positional= or choices= but has no default"):
    parse_arg(None, positional=("name",))
  with pytest.raises(TypeError, match="unsupported type tuple"):
    parse_arg(None, sizes=(1, 2))
