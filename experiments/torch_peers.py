"""PyTorch peers for the benchmarks, importable where this machine's torch build makes them awkward."""
import importlib.util
import sys
import types


def _torchvision_without_compiled_ops() -> None:
  """Makes ``torchvision``'s pure-Python submodules importable, also where its compiled ops do not load.

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


def torchvision_resnet50():
  """``torchvision.models.resnet50``, also where torchvision's compiled ops do not load
  (`_torchvision_without_compiled_ops`)."""
  _torchvision_without_compiled_ops()
  from torchvision.models import resnet50  # pylint: disable=g-import-not-at-top
  return resnet50


def timm_vision_transformer():
  """timm's ``VisionTransformer`` class (``timm.models.vision_transformer``), beside this CPU torch.

  timm is no dependency of sslx: install it outside the venv with ``pip install --no-deps --target=/tmp/timm
  timm`` and torchvision with ``pip install --no-deps --target=/tmp/tvt torchvision==0.28.0``, then put both on
  ``PYTHONPATH``. ``import timm`` imports ``torchvision.ops.misc`` (for ``FrozenBatchNorm2d``, which no ViT
  uses) and so needs torchvision, whose compiled ops do not load here: it gets the bare package of
  `_torchvision_without_compiled_ops`, under which ``torchvision.ops`` imports without calling a compiled op.
  """
  _torchvision_without_compiled_ops()
  from timm.models.vision_transformer import VisionTransformer  # pylint: disable=g-import-not-at-top
  return VisionTransformer
