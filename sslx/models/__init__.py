"""Encoders behind one registry: ``config.model.name`` -> module.

Every encoder module provides ``default_config()``, ``validate_config(model_config, image_size)`` and
``from_config(model_config) -> nn.Module``, and every encoder meets one output contract:

    features, aux = encoder(images, train=...)       # images (B, H, W, C)
    aux['pooled']                                     # (B, D): always; equals features
    aux['patch_tokens'], aux['cls_token']             # token models only (ViT)
    aux['feature_map']                                # ConvNets: the last (B, h, w, C) map, float32

``config.model.pooling`` decides what ``pooled`` is, with one vocabulary: ``'cls'`` (the class token) or
``'mean'`` (the mean of the patch tokens, or the global average of a ConvNet's last feature map). Non-param
collections (BatchNorm's ``batch_stats``) travel beside ``params`` in the variables every caller passes.
Nothing outside this package names an encoder class.
"""
from __future__ import annotations

import importlib
from typing import Optional

from flax import linen as nn

_REGISTRY = {
    "vit": "sslx.models.vit",
    "resnet": "sslx.models.resnet",
}


def known_encoders() -> tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


def encoder_module(name: str):
  """The module implementing encoder ``name`` (``config.model.name``)."""
  if name not in _REGISTRY:
    raise ValueError(f"config.model.name={name!r} is not one of {known_encoders()}")
  return importlib.import_module(_REGISTRY[name])


def default_config(name: str, **overrides):
  """``config.model`` for encoder ``name`` with its own defaults, then ``overrides``."""
  config = encoder_module(name).default_config()
  config.update(overrides)
  return config


def validate_config(model_config, image_size: int) -> None:
  encoder_module(model_config.get("name", "vit")).validate_config(model_config, image_size)


def encoder_from_config(model_config) -> nn.Module:
  """The encoder ``config.model`` describes."""
  return encoder_module(model_config.get("name", "vit")).from_config(model_config)


def attention_implementation(model_config) -> Optional[str]:
  """What ``jax.nn.dot_product_attention`` runs in the encoder ``config.model`` describes, on this machine:
  ``'cudnn'`` or ``'xla'``; None for an encoder without attention (ResNet). For a run's first line."""
  module = encoder_module(model_config.get("name", "vit"))
  choose = getattr(module, "attention_implementation", None)
  return None if choose is None else choose(model_config)
