"""Self-supervised methods as small bundles of pure functions.

A method is one file in this package exposing ``default_config()`` (its ``config.method`` section),
``validate_config(config)`` and ``build(config, run_length) -> Method``. The generic loop in ``sslx.train``
only ever talks to the ``Method`` fields below, so it never branches on a method's or an encoder's name.

Variables are Flax's: ``{'params': ..., 'batch_stats': ..., ...}``. The loop differentiates with respect
to ``variables['params']`` only and carries every other collection (``TrainState.model_state``) through
the step, the checkpoints and every frozen-feature consumer.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

Variables = Any
MethodState = Any


@dataclasses.dataclass(frozen=True)
class RunLength:
  """How long the run is, so schedules (momentum, temperature) can be pure functions of the step."""
  steps_per_epoch: int
  total_steps: int


@dataclasses.dataclass(frozen=True)
class Method:
  """The callables every method provides.

  Attributes:
    name: the method's registry name (``config.method.name``).
    num_views: how many augmented views of each image the method consumes (``config.data.views`` must
      list that many specs when it is more than one).
    init: ``(rng, batch) -> (variables, method_state)``. Params may carry ``nn.LogicallyPartitioned``
      boxes (logical axis names); the loop derives shardings from them and unboxes.
    loss_fn: ``(variables, method_state, batch, rng) -> (loss, (metrics, method_state, model_state))``;
      pure, jittable, runs the model in training mode; ``model_state`` is every collection but
      ``'params'`` after the forward pass (the BatchNorm statistics it updated; ``{}`` when there are none).
    embed: ``(variables, method_state, images) -> (B, D)`` float32: the frozen representation the method
      stands for (evaluation mode, no masking). The online probe, the monitors, the evaluation commands
      and the random-init baseline read encoders only through it.
    encoder_variables: ``(variables, method_state) -> variables`` of the encoder ``embed`` runs, e.g.
      ``{'params': params['encoder']}``; what ``config.init_from``'s ``'encoder'`` subtree copies.
    after_update: ``(variables, method_state, step) -> method_state`` (EMA teachers, queues, ...), with
      the new variables.
    visualize: optional ``(variables, method_state, batch, rng) -> OrderedDict[str, array]`` of image
      batches in the normalised input space, one PNG-grid row each.
    evaluate: optional ``(variables, method_state, batch) -> dict of per-batch sums`` on a held-out batch
      (``batch['mask']`` marks real rows); the loop sums them over the split and logs ``name / count``
      for every name but ``count``. Used by supervised bundles.
  """
  name: str
  num_views: int
  init: Callable[..., tuple[Variables, MethodState]]
  loss_fn: Callable[..., tuple[Any, tuple[dict, MethodState, dict]]]
  embed: Callable[[Variables, MethodState, Any], Any]
  encoder_variables: Callable[[Variables, MethodState], Variables]
  after_update: Callable[[Variables, MethodState, Any], MethodState] = lambda variables, state, step: state
  visualize: Optional[Callable[..., dict]] = None
  evaluate: Optional[Callable[..., dict]] = None


def split_variables(variables: Variables) -> tuple[Any, dict]:
  """``(params, model_state)``: the trained parameters and every other collection."""
  return variables["params"], {name: tree for name, tree in variables.items() if name != "params"}


def subtree_variables(variables: Variables, scope: str) -> Variables:
  """``variables[collection][scope]`` for every collection that has ``scope`` (e.g. the encoder's)."""
  return {name: tree[scope] for name, tree in variables.items() if scope in tree}


def apply_train(module, variables: Variables, *args, **kwargs) -> tuple[Any, dict]:
  """``module.apply`` in training mode; returns ``(output, model_state)`` with every non-param collection
  the pass updated (BatchNorm statistics), ``{}`` for models that have none."""
  _, model_state = split_variables(variables)
  if not model_state:
    return module.apply(variables, *args, train=True, **kwargs), {}
  out, updated = module.apply(variables, *args, train=True, mutable=list(model_state), **kwargs)
  return out, dict(updated)


def frozen_encoder(encoder, select: Callable[[Variables, MethodState], Variables]):
  """``(embed, encoder_variables)`` for a method whose representation is ``encoder`` at ``select``."""

  def embed(variables, method_state, images):
    _, aux = encoder.apply(select(variables, method_state), images, train=False)
    return jax.lax.stop_gradient(aux["pooled"]).astype(jnp.float32)

  return embed, select


def online_encoder(encoder, scope: str = "encoder"):
  """`frozen_encoder` for the online encoder living under ``scope`` of the method's own variables."""
  return frozen_encoder(encoder, lambda variables, method_state: subtree_variables(variables, scope))


_REGISTRY = {
    "mae": "sslx.methods.mae",
    "simclr": "sslx.methods.simclr",
    "moco": "sslx.methods.moco",
    "byol": "sslx.methods.byol",
    "mocov3": "sslx.methods.mocov3",
    "dino": "sslx.methods.dino",
    "simmim": "sslx.methods.simmim",
    "tokenizer": "sslx.methods.tokenizer",
    "beit": "sslx.methods.beit",
    "rotation": "sslx.methods.rotation",
    "jigsaw": "sslx.methods.jigsaw",
    "video_colorization": "sslx.methods.video_colorization",
    "relpos": "sslx.methods.relpos",
    "inpainting": "sslx.methods.inpainting",
    "colorization": "sslx.methods.colorization",
    "splitbrain": "sslx.methods.splitbrain",
    # Supervised training of an encoder (fine-tuning a pretrained one, or from scratch) is the same kind of
    # bundle, trained by the same loop.
    "finetune": "sslx.methods.finetune",
}


def known_methods() -> tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


def method_module(name: str):
  if name not in _REGISTRY:
    raise ValueError(f"config.method.name={name!r} is not one of {known_methods()}")
  return importlib.import_module(_REGISTRY[name])


def default_config(name: str):
  """``config.method`` of method ``name`` with its defaults."""
  return method_module(name).default_config()


def validate_config(config) -> None:
  method_module(config.method.name).validate_config(config)


def build_method(config, run_length: Optional[RunLength] = None) -> Method:
  """Builds the method named by ``config.method.name``; ``run_length`` None: a nominal one-step run
  (evaluation commands, which never train)."""
  return method_module(config.method.name).build(config, run_length or RunLength(1, 1))
