"""Port torchvision ResNet weights into the variables of `sslx.models.resnet.ResNet`.

Works without PyTorch: a state dict's tensors may be numpy arrays or torch tensors (read through
``.numpy()``). torchvision's module names map one to one onto sslx's (see `sslx.models.resnet`);
convolution kernels go from torch's ``(out, in, h, w)`` to flax's ``(h, w, in, out)``.

Typical use::

  import torch, torchvision
  from sslx.convert import torchvision_resnet
  from sslx.models import resnet

  state_dict = torchvision.models.resnet50(weights="IMAGENET1K_V2").state_dict()
  variables = torchvision_resnet.variables_from_torchvision(state_dict)
  config = resnet.default_config(torchvision_resnet.variant_from_torchvision(state_dict))   # '50'
  features, aux = resnet.from_config(config).apply(variables, images_nhwc, train=False)

The images must be normalised as the checkpoint expects (ImageNet mean and std for torchvision's own).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from sslx.models import resnet

_BLOCK = re.compile(r"layer(\d)\.(\d+)\.(.+)")
_BLOCK_LAYERS = {**{name: name for name in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")},
                 "downsample.0": "downsample_conv", "downsample.1": "downsample_bn"}
_STEM = {"conv1": "stem_conv", "bn1": "stem_bn"}
# torch parameter / buffer name -> (flax collection, flax leaf name).
_LEAVES = {"running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var"),
           "bias": ("params", "bias")}


def _numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor: maybe on an accelerator, requiring grad, or bfloat16
    value = value.detach().cpu().float().numpy()
  # A copy: numpy views of torch tensors would follow later in-place updates of the torch model.
  return np.array(value, dtype=np.float32)


def _module_path(module: str, key: str) -> tuple[str, ...]:
  """``'layer2.0.downsample.1'`` -> ``('stage2_block0', 'downsample_bn')``; ``'bn1'`` -> ``('stem_bn',)``."""
  if module in _STEM:
    return (_STEM[module],)
  match = _BLOCK.fullmatch(module)
  if match is None or match.group(3) not in _BLOCK_LAYERS:
    raise ValueError(f"Unexpected key {key!r}: not part of a torchvision ResNet")
  stage, block, layer = match.groups()
  return (f"stage{stage}_block{block}", _BLOCK_LAYERS[layer])


def variables_from_torchvision(state_dict: Mapping[str, Any]) -> dict:
  """Flax variables ``{'params': ..., 'batch_stats': ...}`` of the sslx ResNet matching ``state_dict``.

  The classifier (``fc.*``) and the ``num_batches_tracked`` counters are dropped; every array becomes
  float32 numpy. The result is unboxed: it has the structure of ``nn.unbox(model.init(...))``.

  Args:
    state_dict: ``torchvision.models.resnet{18,34,50,101,152}(...).state_dict()``, or a mapping with the
      same keys and numpy values.
  """
  variables = {"params": {}, "batch_stats": {}}
  for key, value in state_dict.items():
    if key.startswith("fc.") or key.endswith(".num_batches_tracked"):
      continue
    module, leaf = key.rsplit(".", 1)
    array = _numpy(value)
    if leaf == "weight":
      # A 4-D weight is a convolution kernel; a 1-D one is a BatchNorm scale.
      collection, name = ("params", "kernel") if array.ndim == 4 else ("params", "scale")
      array = array.transpose(2, 3, 1, 0) if array.ndim == 4 else array
    elif leaf in _LEAVES:
      collection, name = _LEAVES[leaf]
    else:
      raise ValueError(f"Unexpected key {key!r}: not part of a torchvision ResNet")
    node = variables[collection]
    for part in _module_path(module, key):
      node = node.setdefault(part, {})
    node[name] = array
  return variables


def variant_from_torchvision(state_dict: Mapping[str, Any]) -> str:
  """The sslx variant string (``'18'`` ... ``'152'``) of a torchvision ResNet ``state_dict``."""
  blocks = {}
  for key in state_dict:
    match = _BLOCK.fullmatch(key.rsplit(".", 1)[0])
    if match:
      blocks.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
  stage_sizes = tuple(len(blocks.get(stage, ())) for stage in range(1, 5))
  bottleneck = "layer1.0.conv3.weight" in state_dict
  for variant, spec in resnet.VARIANTS.items():
    if spec == {"stage_sizes": stage_sizes, "bottleneck": bottleneck}:
      return variant
  raise ValueError(f"No sslx ResNet variant has {stage_sizes} {'bottleneck' if bottleneck else 'basic'} "
                   "blocks per stage")
