"""BYOL (Grill et al. 2020; deepmind-research ``byol/``): an online network regresses a slow target network.

The online network is encoder ``f``, projector ``g`` and predictor ``q``; the target network is an encoder
and projector of the same shape, ``f'`` and ``g'``, whose parameters ``xi`` follow the online ones ``theta``
by an exponential moving average and never receive a gradient. After update ``k`` (0-based, of ``K`` =
`RunLength.total_steps`; `after_update`):

    xi <- tau_k xi + (1 - tau_k) theta,    tau_k = 1 - (1 - tau_0) (cos(pi k / K) + 1) / 2,

so tau rises from ``tau_0`` (``config.method.momentum``: 0.996 for the paper's 1000 epochs; 0.99 suits runs of
a few hundred epochs or fewer) to 1 at the end (`sslx.schedules.cosine_momentum`). Every parameter moves so, BatchNorm's scale
and bias included; the target's BatchNorm running averages come from its own forward passes, as in the
reference. The first update copies ``theta`` instead (the reference starts the target from an independent
initialisation; a copy lets an encoder that ``config.init_from`` loads after `init` reach the target at once).

For the two views ``v``, ``v'`` of each image, ``p = q(g(f(v)))`` is the online prediction and ``z' =
g'(f'(v'))`` the target projection; the loss is symmetric (`sslx.losses.byol_loss`, mean over the batch):

    L = mean_i (2 - 2 cos(p_i, sg(z'_i))) + mean_i (2 - 2 cos(p'_i, sg(z_i))).

Each view is its own forward pass, through the online and through the target network, as the reference
applies its network once per view: every BatchNorm (encoder, projector, predictor) normalises one view of the
global batch (``N`` rows) at a time, never a batch mixing both views, and its running averages take two
updates per step, the first view's then the second's. The views are drawn differently (ImageNet's view 1 is
always blurred, only view 2 is ever solarised), so each is normalised with its own statistics; their crops
may even differ in size. BYOL has no negatives, so the SimCLR/MoCo worry of a positive pair recognising each
other through shared statistics does not arise. The statistics are over the global batch, as the reference's
cross-replica BatchNorm computes them: the loop shards the batch under ``jax.jit``, so 1 and N devices agree.

Metrics: ``loss``; ``cosine``, the mean cosine between predictions and target projections (``1 - L / 4``,
1 when the prediction is perfect); ``projection_std``, the per-dimension standard deviation over the batch
of the L2-normalised target projections times ``sqrt(D)``: about 1 for spread-out projections, 0 when the
representation has collapsed to a constant (SimSiam's collapse monitor, Chen & He 2021).

`Method.embed` reads the online encoder, as the paper's evaluations do; ``config.method.embed_from='target'``
makes it read the target encoder (in ``method_state['target']``) instead, for kNN, linear probes, monitors and
``init_from``. A finished run's target is also reachable by ``init_from`` triples, e.g. ``(run,
'method_state/target/params/encoder', 'params/encoder')`` and the same for ``batch_stats``.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from sslx import config as config_lib
from sslx import losses
from sslx import models
from sslx import numerics
from sslx import schedules
from sslx.methods import (Method, RunLength, apply_train, frozen_encoder, online_encoder, split_variables,
                          subtree_variables)
from sslx.models import heads
from sslx.models import vit

NUM_VIEWS = 2
EMBED_FROM = ("online", "target")
_PREDICTOR = "predictor"  # the one online scope the target network lacks


def default_config() -> ml_collections.ConfigDict:
  """``config.method`` of BYOL: tau_0 = 0.996; projector and predictor 4096 hidden, 256 out
  (`heads.byol_head`); evaluation reads the online encoder."""
  return ml_collections.ConfigDict(dict(
      name="byol", momentum=0.996, embed_from="online", projector=heads.byol_head(),
      predictor=heads.byol_head()))


def validate_config(config) -> None:
  """Raises a ValueError naming the first bad ``config.method`` key (or ``config.model.bn_groups``)."""
  mc = config.method
  config_lib.check_number(mc.momentum, "method.momentum", lambda v: 0 <= v < 1, "in [0, 1)")
  if mc.embed_from not in EMBED_FROM:
    raise ValueError(f"config.method.embed_from={mc.embed_from!r} is not one of {EMBED_FROM}")
  heads.validate_head_config(mc.projector, "method.projector")
  heads.validate_head_config(mc.predictor, "method.predictor")
  if mc.predictor.out_dim != mc.projector.out_dim:
    raise ValueError(f"config.method.predictor.out_dim={mc.predictor.out_dim} must equal "
                     f"config.method.projector.out_dim={mc.projector.out_dim}: the prediction regresses onto "
                     "the target's projection")
  heads.check_bn_groups(config, config.batch_size, f"one view of config.batch_size={config.batch_size}")


class Network(nn.Module):
  """Encoder -> projector -> predictor (the online network), or without ``predictor`` (the target).

  Returns the predictor's output, or the projector's when there is no predictor. Variables:
  ``{'encoder', 'projector', 'predictor'}`` in every collection, so the target's are the online ones less
  ``'predictor'``.
  """
  encoder: nn.Module
  projector: heads.ProjectionHead
  predictor: Optional[heads.ProjectionHead] = None

  @nn.compact
  def __call__(self, images, *, train: bool):
    features, _ = self.encoder(images, train=train)
    out = self.projector(features, train=train)
    return out if self.predictor is None else self.predictor(out, train=train)


def networks(config) -> tuple[Network, Network]:
  """``(online, target)``: the encoder of ``config.model`` under the projector and predictor of
  ``config.method``; the heads compute in the encoder's dtype and group BatchNorm as it does."""
  dtype = vit.resolve_dtype(config.model.get("dtype", "auto"))
  groups = int(config.model.get("bn_groups", 1))
  encoder = models.encoder_from_config(config.model)
  projector = heads.from_config(config.method.projector, dtype, groups)
  predictor = heads.from_config(config.method.predictor, dtype, groups)
  return Network(encoder, projector, predictor), Network(encoder, projector)


def without_predictor(variables):
  """The target network's share of the online variables: every collection less the predictor's scope."""
  return {name: {scope: tree for scope, tree in collection.items() if scope != _PREDICTOR}
          for name, collection in variables.items()}


def per_view(model: Network, variables, views, rngs) -> tuple[list[jax.Array], dict]:
  """``model`` in training mode on each view in turn, as its own batch; the BatchNorm running averages the
  first pass updates are the ones the second pass starts from. Returns the float32 outputs and the
  collections the passes updated (``{}`` for models without any)."""
  (params, state), outputs = split_variables(variables), []
  for images, rng in zip(views, rngs, strict=True):
    out, state = apply_train(model, {"params": params, **state}, images, rngs={"dropout": rng})
    outputs.append(out.astype(jnp.float32))
  return outputs, state


def encoder_readers(encoder, embed_from: str):
  """``(embed, encoder_variables)`` of `Method`: the online encoder, or for ``embed_from='target'`` the target
  network's (``method_state['target']['encoder']``)."""
  if embed_from == "target":
    return frozen_encoder(encoder, lambda variables, method_state: subtree_variables(method_state["target"], "encoder"))
  return online_encoder(encoder)


def update_target(variables, method_state, tau):
  """``xi <- tau xi + (1 - tau) theta`` for every target parameter (``tau = 0`` copies the online network); the
  target's BatchNorm averages are left to its own passes."""
  target = method_state["target"]
  online_params = without_predictor({"params": variables["params"]})["params"]
  params = optax.incremental_update(online_params, target["params"], 1.0 - tau)
  return {**method_state, "target": {**target, "params": params}}


def projection_std(projections: jax.Array) -> jax.Array:
  """``sqrt(D)`` times the mean over dimensions of the batch standard deviation of the L2-normalised rows:
  about 1 for rows spread over the sphere, 0 for a collapsed, constant output."""
  unit = numerics.l2_normalize(projections)
  return jnp.mean(jnp.std(unit, axis=0)) * jnp.sqrt(float(unit.shape[-1]))


def build(config, run_length: RunLength) -> Method:
  """The BYOL bundle; reads ``config.method.{momentum,embed_from,projector,predictor}``."""
  online, target = networks(config)
  base_momentum, total_steps = float(config.method.momentum), int(run_length.total_steps)
  embed, encoder_variables = encoder_readers(online.encoder, config.method.embed_from)

  def init(rng, batch):
    variables = dict(online.init({"params": rng}, batch["image"], train=False))
    return variables, {"target": without_predictor(variables)}

  def loss_fn(variables, method_state, batch, rng):
    views = [batch[f"view_{i}"] for i in range(NUM_VIEWS)]
    rngs = jax.random.split(rng, 2 * NUM_VIEWS)
    predictions, model_state = per_view(online, variables, views, rngs[:NUM_VIEWS])
    projections, target_state = per_view(target, method_state["target"], views, rngs[NUM_VIEWS:])
    projections = jax.lax.stop_gradient(projections)
    # Each view's prediction regresses the target's projection of the other view.
    loss = losses.byol_loss(predictions[0], projections[1]).loss + losses.byol_loss(predictions[1], projections[0]).loss
    metrics = {"loss": loss, "cosine": 1.0 - loss / 4.0,  # each term is 2 - 2 x its mean cosine
               "projection_std": projection_std(projections[0])}
    new_target = {**method_state["target"], **jax.lax.stop_gradient(target_state)}
    return loss, (metrics, {**method_state, "target": new_target}, model_state)

  def after_update(variables, method_state, step):
    # The first update copies the online network: `config.init_from` replaces it after `init` made the copy.
    tau = jnp.where(step == 0, 0.0, schedules.cosine_momentum(step, total_steps, base_momentum))
    return update_target(variables, method_state, tau)

  return Method(name="byol", num_views=NUM_VIEWS, init=init, loss_fn=loss_fn, embed=embed,
                encoder_variables=encoder_variables, after_update=after_update)
