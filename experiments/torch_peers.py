"""PyTorch peers for the benchmarks, importable where this machine's torch build makes them awkward."""
import importlib.util
import sys
import types


def torchvision_resnet50():
  """``torchvision.models.resnet50``, also where torchvision's compiled ops do not load.

  PyPI's torchvision wheels are linked against CUDA torch; beside the CPU-only torch build
  ``import torchvision`` fails while registering its ops (detection ops, unused here). The model
  definitions are pure Python, so they are then imported from a bare package that skips the ops.
  """
  try:
    import torchvision  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except RuntimeError:
    package = types.ModuleType("torchvision")
    package.__path__ = list(importlib.util.find_spec("torchvision").submodule_search_locations)
    sys.modules["torchvision"] = package
  from torchvision.models import resnet50  # pylint: disable=g-import-not-at-top
  return resnet50
