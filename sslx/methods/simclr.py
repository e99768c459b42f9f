"""SimCLR (Chen et al., 2020): two augmented views of each image, pulled together against every other view.

Both views of the global batch of ``N`` images go through the encoder and the projection head as one batch
of ``2N`` (as the reference code concatenates them), so BatchNorm, in the encoder and in the head, normalises
over all ``2N`` views of the global batch; per-device statistics would let a positive pair recognise each
other by the statistics of the device they share. The loss is NT-Xent (`sslx.losses.nt_xent`) on the head's
outputs ``z``; the representation kept for evaluation (`Method.embed`) is the encoder's pooled features
``h``, before the head.

The views are ``config.data.views`` (two augmentation specs, the same for both views in the paper); the
optimizer, schedule and augmentations of the published recipe are set by `sslx.recipes.simclr_imagenet`.
"""
from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from sslx import config as config_lib
from sslx import losses
from sslx.data import transforms
from sslx.methods import Method, RunLength, apply_train, online_encoder
from sslx.models import heads

NUM_VIEWS = 2


def default_config() -> ml_collections.ConfigDict:
  """``config.method`` of SimCLR: temperature 0.1 (the paper's at batch 4096) and SimCLR v2's 3-layer head."""
  return ml_collections.ConfigDict(dict(name="simclr", temperature=0.1, head=heads.simclr_v2_head()))


def validate_config(config) -> None:
  """Raises a ValueError naming the first bad ``config.method`` key, or views SimCLR cannot batch together."""
  config_lib.check_number(config.method.temperature, "method.temperature", lambda v: v > 0, "> 0")
  heads.validate_head_config(config.method.head)
  heads.check_bn_groups(config, NUM_VIEWS * config.batch_size,
                        f"both views of config.batch_size={config.batch_size}")
  check_views_share_a_size(config.data)


def check_views_share_a_size(data_config) -> None:
  """Both views run through the encoder as one batch, so their crops must have one size.

  Specs that do not parse are left to the data pipeline's validation, which names the op at fault.
  """
  specs = data_config.get("views")
  if not isinstance(specs, (tuple, list)) or len(specs) != NUM_VIEWS:
    return  # `checks.validate_views` reports a wrong number of views
  try:
    sizes = [transforms.build_augmentation(spec).output_size for spec in specs]
  except ValueError:
    return
  if sizes[0] != sizes[1]:
    raise ValueError(f"config.data.views[1]={specs[1]!r} makes {sizes[1]}x{sizes[1]} crops but views[0] "
                     f"makes {sizes[0]}x{sizes[0]}; SimCLR encodes both views as one batch, so they must "
                     "match")


def build(config, run_length: RunLength) -> Method:
  """The SimCLR bundle; reads ``config.method.temperature`` and ``config.method.head``."""
  del run_length  # SimCLR follows no schedule of its own
  model = heads.encoder_with_head(config)
  temperature = float(config.method.temperature)
  embed, encoder_variables = online_encoder(model.encoder)

  def init(rng, batch):
    return dict(model.init({"params": rng}, batch["image"], train=False)), {}

  def loss_fn(variables, method_state, batch, rng):
    images = jnp.concatenate([batch["view_0"], batch["view_1"]])
    (projections, _), model_state = apply_train(model, variables, images, rngs={"dropout": rng})
    z1, z2 = jnp.split(projections.astype(jnp.float32), NUM_VIEWS)
    out = losses.nt_xent(z1, z2, temperature=temperature)
    return out.loss, ({"loss": out.loss, "contrastive_accuracy": out.accuracy}, method_state, model_state)

  return Method(name="simclr", num_views=NUM_VIEWS, init=init, loss_fn=loss_fn, embed=embed,
                encoder_variables=encoder_variables)
