"""Self-supervised methods as small bundles of pure functions.

A method is one file in this package exposing ``build(config) -> Method``. The generic loop in
``sslx.train`` only ever talks to the ``Method`` fields below, so it never branches on a method's name.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Optional

Params = Any
MethodState = Any


@dataclasses.dataclass(frozen=True)
class Method:
  """The callables every method provides.

  Attributes:
    name: the method's registry name (``config.method.name``).
    num_views: how many augmented views of each image the method consumes.
    init: ``(rng, batch) -> (params, method_state)``. Params may carry ``nn.LogicallyPartitioned``
      boxes (logical axis names); the loop derives shardings from them and unboxes.
    loss_fn: ``(params, method_state, batch, rng) -> (loss, (metrics, method_state))``; pure, jittable,
      runs the model in training mode.
    after_update: ``(params, method_state, step) -> method_state`` (EMA teachers, queues, ...).
    visualize: optional ``(params, method_state, batch, rng) -> OrderedDict[str, array]`` of image batches in
      the normalised input space, one PNG-grid row each, e.g. original / masked / reconstruction for MAE.
    evaluate: optional ``(params, method_state, batch) -> dict of per-batch sums`` on a held-out batch
      (``batch['mask']`` marks real rows); the loop sums them over the split and logs ``name / count``
      for every name but ``count`` (e.g. a classifier's ``correct_top1``). Used by supervised bundles.
  """
  name: str
  num_views: int
  init: Callable[..., tuple[Params, MethodState]]
  loss_fn: Callable[..., tuple[Any, tuple[dict, MethodState]]]
  after_update: Callable[[Params, MethodState, Any], MethodState] = lambda params, state, step: state
  visualize: Optional[Callable[..., dict]] = None
  evaluate: Optional[Callable[..., dict]] = None


_REGISTRY = {
    "mae": "sslx.methods.mae",
    # Supervised fine-tuning of a pretrained encoder is the same kind of bundle, trained by the same loop.
    "finetune": "sslx.evaluate.finetune",
}


def known_methods() -> tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


def build_method(config) -> Method:
  """Builds the method named by ``config.method.name``."""
  name = config.method.name
  if name not in _REGISTRY:
    raise ValueError(f"config.method.name={name!r} is not a known method; choose one of {known_methods()}")
  return importlib.import_module(_REGISTRY[name]).build(config)
