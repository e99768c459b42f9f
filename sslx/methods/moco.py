"""MoCo v2 (He et al. 2020; Chen et al. 2020): a query encoder against a momentum key encoder and a queue.

Two views of each image: the query ``q = f_q(view_0)`` (encoder + projection head, trained) and the key
``k = f_k(view_1)`` from the key encoder and key head, an exponential moving average of the query ones that
never receives a gradient: after every update ``theta_k <- m theta_k + (1 - m) theta_q`` (`after_update`;
every parameter, BatchNorm's scale and bias included; m = 0.999), except that the first update copies
``theta_q`` (so an encoder loaded by ``config.init_from`` after `init` reaches the key encoder at once).

The loss is InfoNCE with cosine logits and temperature ``t`` (`sslx.losses.info_nce` without batch
negatives): the positive of ``q_i`` is ``k_i`` and its negatives are the queue's K keys of earlier steps, as
MoCo's ``[l_pos, l_neg]`` logits. The queue is one global FIFO of the L2-normalised keys, identical on every
device: each step writes the whole global batch of keys at its pointer, ``queue[p : p + B] = k;
p <- (p + B) mod K``, after the loss has read it, so it holds exactly the keys of the last K / B steps (K
must be a multiple of the global batch B). Key encoder, queue and pointer live in ``method_state``:
checkpointed and restored with the run. Evaluation (`Method.embed`) reads the query encoder's pooled
features, as MoCo's linear evaluation does.

BatchNorm and the positive pair. Batch statistics are shared by all samples normalised together, so a
query and its positive key normalised with statistics of the same images carry a common signature; MoCo
found that the model learns to "cheat" with it (its Section 3.3) and cured it with shuffling BN: the keys
computed on a shuffled assignment of samples to GPUs. Global BN over the whole batch does not cure it here:
every query and every key of the step is normalised with statistics of the same B images (in two views),
while the queue's keys were normalised with other images' statistics, so the signature sets the positive
apart from the queue's K negatives, which then stop being hard. We keep MoCo's remedy, made independent of
the device count:

- every BatchNorm of both encoders (and of the heads, where they have some) normalises in
  ``config.model.bn_groups`` ghost groups of ``B / G`` consecutive rows of the global batch (MoCo: 8 GPUs of
  32 images; `sslx.models.resnet.BatchNorm`), the queries in batch order;
- the key encoder sees the batch in a random order (a fresh permutation each step), so key ``k_i`` is
  normalised with the statistics of a random group that shares, besides image i, on average only 1/G of
  the images whose statistics normalised ``q_i``; its outputs are put back in batch order (`shuffled_keys`).

The groups are rows of the global batch, not devices, so 1 and N devices compute the same step (up to
float32 reduction order). The running averages move towards the mean of the groups' statistics.
``config.model.bn_groups=1`` is global BN with the leak described above, for comparison. The groups live
inside BatchNorm, so every convolution still runs on the whole batch (running the encoder once per group
under ``jax.vmap`` gave gradients 0.5% off the one-device ones with the batch sharded over 8 CPU devices).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from sslx import config as config_lib
from sslx import losses
from sslx import numerics
from sslx.methods import Method, RunLength, apply_train, online_encoder
from sslx.models import heads

NUM_VIEWS = 2


def default_config() -> ml_collections.ConfigDict:
  """``config.method`` of MoCo v2: t = 0.2, m = 0.999, K = 65,536 keys, a 2-layer head without BatchNorm
  (2048 hidden, 128 out). The BatchNorm groups are the encoder's ``config.model.bn_groups`` (MoCo's recipe:
  8, its 8 GPUs)."""
  return ml_collections.ConfigDict(dict(
      name="moco", temperature=0.2, momentum=0.999, queue_size=65536, head=heads.mocov2_head()))


def validate_config(config) -> None:
  """Raises a ValueError naming the first bad ``config.method`` key (or ``config.batch_size`` beside it)."""
  mc = config.method
  config_lib.check_number(mc.temperature, "method.temperature", lambda v: v > 0, "> 0")
  config_lib.check_number(mc.momentum, "method.momentum", lambda v: 0 <= v < 1, "in [0, 1)")
  config_lib.check_int(mc.queue_size, "method.queue_size")
  heads.validate_head_config(mc.head)
  batch = config.batch_size
  if mc.queue_size % batch:
    raise ValueError(f"config.method.queue_size={mc.queue_size} must be a multiple of the global batch "
                     f"config.batch_size={batch}: each step enqueues the whole batch of keys")
  heads.check_bn_groups(config, batch, f"config.batch_size={batch}")


def enqueue(queue: jax.Array, pointer: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
  """FIFO write of a batch of keys: ``queue[p : p + B] = keys``, ``p <- (p + B) mod K``.

  ``K`` (the queue's rows) must be a multiple of ``B``, so that a write never wraps around.
  """
  queue = jax.lax.dynamic_update_slice(queue, keys.astype(queue.dtype), (pointer, jnp.zeros_like(pointer)))
  return queue, (pointer + keys.shape[0]) % queue.shape[0]


def shuffled_keys(model: nn.Module, key_variables, images: jax.Array, order: jax.Array, rng: jax.Array):
  """The key encoder in training mode on the batch in the order ``order`` (a permutation of its rows), so
  its BatchNorm groups (``config.model.bn_groups``) hold rows other than the queries' groups.

  Returns:
    ``(keys, key_state)``: the L2-normalised keys back in batch order (row i: image i) and the collections
    the pass updated (the key encoder's BatchNorm statistics), both without gradient.
  """
  shuffled = jnp.take(images, order, axis=0)
  (keys, _), key_state = apply_train(model, key_variables, shuffled, rngs={"dropout": rng})
  keys = jnp.take(keys, jnp.argsort(order), axis=0)  # row j of the shuffled batch is image order[j]
  return jax.lax.stop_gradient(numerics.l2_normalize(keys)), jax.lax.stop_gradient(key_state)


def momentum_update(key_params, query_params, momentum):
  """``theta_k <- m theta_k + (1 - m) theta_q``, leaf by leaf."""
  return jax.tree.map(lambda k, q: momentum * k + (1.0 - momentum) * q, key_params, query_params)


def build(config, run_length: RunLength) -> Method:
  """The MoCo bundle; reads ``config.method.{temperature,momentum,queue_size,head}``."""
  del run_length  # MoCo v2's momentum is constant
  model = heads.encoder_with_head(config)
  mc = config.method
  temperature, momentum = float(mc.temperature), float(mc.momentum)
  queue_size, key_dim = int(mc.queue_size), int(mc.head.out_dim)
  embed, encoder_variables = online_encoder(model.encoder)

  def init(rng, batch):
    params_rng, queue_rng = jax.random.split(rng)
    variables = dict(model.init({"params": params_rng}, batch["image"], train=False))
    # A queue of random unit vectors until the first K / B steps have filled it with keys, as in MoCo.
    queue = numerics.l2_normalize(jax.random.normal(queue_rng, (queue_size, key_dim)))
    return variables, {"key": variables, "queue": queue, "queue_pointer": jnp.zeros((), jnp.int32)}

  def loss_fn(variables, method_state, batch, rng):
    query_rng, key_rng, shuffle_rng = jax.random.split(rng, 3)
    (queries, _), model_state = apply_train(model, variables, batch["view_0"], rngs={"dropout": query_rng})
    order = jax.random.permutation(shuffle_rng, batch["view_1"].shape[0])
    keys, key_state = shuffled_keys(model, method_state["key"], batch["view_1"], order, key_rng)
    out = losses.info_nce(queries.astype(jnp.float32), keys, temperature=temperature,
                          negatives=method_state["queue"], batch_negatives=False)
    queue, pointer = enqueue(method_state["queue"], method_state["queue_pointer"], keys)
    new_state = {"key": {**method_state["key"], **key_state}, "queue": queue, "queue_pointer": pointer}
    return out.loss, ({"loss": out.loss, "contrastive_accuracy": out.accuracy}, new_state, model_state)

  def after_update(variables, method_state, step):
    # The first update copies the query encoder: `config.init_from` replaces it after `init` made the copy.
    key = method_state["key"]
    key_params = momentum_update(key["params"], variables["params"], jnp.where(step == 0, 0.0, momentum))
    return {**method_state, "key": {**key, "params": key_params}}

  return Method(name="moco", num_views=NUM_VIEWS, init=init, loss_fn=loss_fn, embed=embed,
                encoder_variables=encoder_variables, after_update=after_update)
