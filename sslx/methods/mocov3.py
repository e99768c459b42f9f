"""MoCo v3 (Chen, Xie & He 2021; facebookresearch/moco-v3): contrast an online prediction with a momentum key.

Networks. The online network is the base encoder ``f``, projector ``g`` and predictor ``h``; the momentum
encoder is an encoder and projector of the same shape, ``f'`` and ``g'``, whose parameters ``xi`` follow the
online ones ``theta`` and never receive a gradient. This is BYOL's pair of networks (`sslx.methods.byol`'s
`Network`, variables, target state and evaluation switch are reused as they are): the momentum encoder lives
in ``method_state['target']``. The heads (`sslx.models.heads.mocov3_head`) are bias-free dense layers with
BatchNorm after each and ReLU between, the last BatchNorm without scale or bias; ViT: a 3-layer projector and
a 2-layer predictor (4096 hidden, 256 out); ResNet-50: a 2-layer projector and a 2-layer predictor without
the last BatchNorm.

Loss (`sslx.losses.mocov3_loss`). With ``q_v = h(g(f(x_v)))`` and ``k_v = sg(g'(f'(x_v)))`` for the two views
``v`` of each image, L2-normalised:

    L = 2t (CE(q_1, k_2) + CE(q_2, k_1)),   CE(q, k) = -1/N sum_i log(exp(q_i.k_i / t) / sum_j exp(q_i.k_j / t)),

``i`` and ``j`` over the global batch of ``N`` images (the other images' keys are the negatives; no queue),
``t = 0.2`` for ViT and 1.0 for ResNet-50 (``config.method.temperature``).

Momentum. After update ``k`` (0-based, of ``K`` = `RunLength.total_steps`; `after_update`):

    xi <- m_{k+1} xi + (1 - m_{k+1}) theta,    m_s = 1 - (1 - m_0) (cos(pi s / K) + 1) / 2

(`sslx.schedules.cosine_momentum`; ``m_0`` = ``config.method.momentum``, 0.99), on every parameter of the
encoder and projector, BatchNorm's scale and bias included; the momentum encoder's BatchNorm running averages
come from its own forward passes. The reference moves the momentum encoder at the start of each iteration with
that iteration's ``m`` (its ``--moco-m-cos``) before computing the keys; here it moves after update ``k`` for
the keys of step ``k + 1``, hence ``m_{k+1}``. The first update copies ``theta`` instead (as in `moco` and
`byol`, so an encoder that ``config.init_from`` loads after `init` reaches the momentum encoder at once); the
reference's first move is a copy as well, its second averages the initial and the once-updated parameters.

One pass per view. As the reference applies its networks once per view (``predictor(base_encoder(x1))``, then
``x2``), each view is its own forward pass through the online network and through the momentum encoder, so
every BatchNorm (the heads'; a ResNet's too) normalises one view of the global batch at a time (global
statistics under ``jax.jit``, as the reference's SyncBatchNorm) and its running averages take two updates per
step. Why it matters: a query ``q_1`` is scored against the keys ``k_2`` of every image, all normalised with
the same statistics (those of view 2), so the statistics mark no key apart from the others and the positive
cannot be found through them (MoCo v2's queue needed shuffled BN for that; here nothing leaks). Passing both
views as one batch of ``2N`` would instead mix the views' statistics, which is not the published model.

stop-grad-conv1 (the paper's fix for ViT training instability): the random patch projection stays as
initialised. It is an optimizer rule, ``config.optimizer.frozen = (PATCH_EMBED_PATTERN,)`` (no update and no
optimizer state), which the ViT recipes set; the momentum encoder then keeps the same projection (up to
float32 rounding), being an average of copies of it.

Metrics: ``loss``; ``contrastive_accuracy``, how often a query's positive key is its most similar key of the
global batch (mean over both directions). `Method.embed` reads the online (base) encoder, as the reference's
linear evaluation does; ``config.method.embed_from='target'`` reads the momentum encoder instead.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from sslx import config as config_lib
from sslx import losses
from sslx import schedules
from sslx.methods import Method, RunLength, byol
from sslx.models import heads

NUM_VIEWS = 2
ENCODERS = ("vit", "resnet")
# The ViT's patch projection (kernel and bias), for config.optimizer.frozen: stop-grad-conv1.
PATCH_EMBED_PATTERN = r"encoder/patch_embed/.*"


def default_config(encoder: str = "vit") -> ml_collections.ConfigDict:
  """``config.method`` of MoCo v3 for ``encoder``: ``'vit'`` (t = 0.2, projector of 3 layers, predictor of 2) or
  ``'resnet'`` (t = 1.0, projector of 2 layers, predictor of 2 without its last BatchNorm); m_0 = 0.99, 4096
  hidden, 256 out; evaluation reads the online encoder."""
  if encoder not in ENCODERS:
    raise ValueError(f"MoCo v3 heads exist for the encoders {ENCODERS}; got {encoder!r}")
  vit = encoder == "vit"
  return ml_collections.ConfigDict(dict(
      name="mocov3", temperature=0.2 if vit else 1.0, momentum=0.99, embed_from="online",
      projector=heads.mocov3_head(3 if vit else 2), predictor=heads.mocov3_head(2, last_batch_norm=vit)))


def validate_config(config) -> None:
  """Raises a ValueError naming the first bad ``config.method`` key (or ``config.model.bn_groups``)."""
  config_lib.check_number(config.method.temperature, "method.temperature", lambda v: v > 0, "> 0")
  byol.validate_config(config)  # momentum, embed_from, the two heads and BatchNorm groups read as BYOL's


def build(config, run_length: RunLength) -> Method:
  """The MoCo v3 bundle; reads ``config.method.{temperature,momentum,embed_from,projector,predictor}``."""
  online, momentum_encoder = byol.networks(config)
  temperature, base_momentum = float(config.method.temperature), float(config.method.momentum)
  total_steps = int(run_length.total_steps)
  embed, encoder_variables = byol.encoder_readers(online.encoder, config.method.embed_from)

  def init(rng, batch):
    variables = dict(online.init({"params": rng}, batch["image"], train=False))
    return variables, {"target": byol.without_predictor(variables)}

  def loss_fn(variables, method_state, batch, rng):
    views = [batch[f"view_{i}"] for i in range(NUM_VIEWS)]
    rngs = jax.random.split(rng, 2 * NUM_VIEWS)
    queries, model_state = byol.per_view(online, variables, views, rngs[:NUM_VIEWS])
    keys, key_state = byol.per_view(momentum_encoder, method_state["target"], views, rngs[NUM_VIEWS:])
    out = losses.mocov3_loss(*queries, *keys, temperature=temperature)  # stops the keys' gradient
    metrics = {"loss": out.loss, "contrastive_accuracy": out.accuracy}
    new_target = {**method_state["target"], **jax.lax.stop_gradient(key_state)}
    return out.loss, (metrics, {**method_state, "target": new_target}, model_state)

  def after_update(variables, method_state, step):
    # The first update copies the online network: `config.init_from` replaces it after `init` made the copy.
    momentum = jnp.where(step == 0, 0.0, schedules.cosine_momentum(step + 1, total_steps, base_momentum))
    return byol.update_target(variables, method_state, momentum)

  return Method(name="mocov3", num_views=NUM_VIEWS, init=init, loss_fn=loss_fn, embed=embed,
                encoder_variables=encoder_variables, after_update=after_update)
