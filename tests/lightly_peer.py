"""Loads the PyTorch peer ``lightly`` (``pip install --no-deps lightly==1.6.0``) without torchvision.

Only a few losses are needed (``NTXentLoss``, ``NegativeCosineSimilarity``, ``DINOLoss``), but the package
``__init__``s on their import paths (``lightly.loss``, ``lightly.models``, ``lightly.models.modules``) import
every loss and model, and with them torchvision. torchvision cannot be installed beside this CPU torch
(PyPI's wheel is linked against CUDA torch and breaks ``transformers``). So this loader registers those three
packages as bare modules that only point at their directories (their ``__init__`` never runs), and a stand-in
``torchvision.ops`` for the one symbol ``lightly.models.utils`` imports at module level (``StochasticDepth``,
used by none of the code loaded here). The stand-ins leave ``sys.modules`` once a loss is loaded: nothing else
(``transformers`` asks whether torchvision is installed) may see a fake torchvision, and a later
``import lightly.loss`` fails the ordinary way instead of finding a half-empty package.
"""
import importlib
import os
import sys
import types

_BARE_PACKAGES = ("lightly.loss", "lightly.models", "lightly.models.modules")


class _StochasticDepthStandIn:
  def __init__(self, *args, **kwargs):
    raise RuntimeError("torchvision is not installed; lightly_peer loads lightly without it")


def _stand_ins(lightly_dir: str) -> dict[str, types.ModuleType]:
  modules = {}
  for name in _BARE_PACKAGES:
    package = types.ModuleType(name)
    package.__path__ = [os.path.join(lightly_dir, *name.split(".")[1:])]
    modules[name] = package
  ops = types.ModuleType("torchvision.ops")
  ops.StochasticDepth = _StochasticDepthStandIn
  torchvision = types.ModuleType("torchvision")
  torchvision.ops = ops
  modules.update({"torchvision": torchvision, "torchvision.ops": ops})
  return modules


def _lightly_class(module_name: str, class_name: str):
  """``class_name`` from lightly's ``module_name``, with stand-ins for its package ``__init__``s and torchvision."""
  loaded = sys.modules.get(module_name)
  if loaded is not None:
    return getattr(loaded, class_name)
  import lightly  # its own __init__ only sets the version
  stand_ins = {name: module for name, module in _stand_ins(os.path.dirname(lightly.__file__)).items()
               if name not in sys.modules}
  sys.modules.update(stand_ins)
  try:
    return getattr(importlib.import_module(module_name), class_name)
  finally:
    for name, module in stand_ins.items():
      if sys.modules.get(name) is module:
        del sys.modules[name]


def ntxent_loss_class():
  """lightly's ``NTXentLoss`` (``lightly.loss.ntx_ent_loss``), loaded without torchvision."""
  return _lightly_class("lightly.loss.ntx_ent_loss", "NTXentLoss")


def negative_cosine_similarity_class():
  """lightly's ``NegativeCosineSimilarity`` (``lightly.loss.negative_cosine_similarity``)."""
  return _lightly_class("lightly.loss.negative_cosine_similarity", "NegativeCosineSimilarity")


def dino_loss_class():
  """lightly's ``DINOLoss`` (``lightly.loss.dino_loss``), loaded without torchvision."""
  return _lightly_class("lightly.loss.dino_loss", "DINOLoss")
