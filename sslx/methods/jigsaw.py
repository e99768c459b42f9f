"""Jigsaw puzzles (Noroozi & Favaro, 2016): learn features by telling which permutation shuffled 9 tiles.

Inputs (`sslx.pretext.jigsaw`, on the device, inside ``loss_fn``): the augmented image (the paper's 225 px
crop) is cut into a 3 x 3 grid of cells (75 px); inside each cell a tile of ``tile_size`` pixels (64) is cut
at a random offset (with ``channel_jitter``, each colour channel at its own), each tile is standardised by its
own mean and standard deviation, and the 9 tiles are shuffled by a permutation drawn uniformly from the fixed
set of ``num_permutations`` (`sslx.pretext.permutations`: greedy, maximal minimum Hamming distance); the
label is that permutation's index.

Network (the paper's context-free network): the registry's encoder, one set of weights, encodes all ``9B``
tiles in one call; its pooled features, optionally through a shared ReLU layer of ``tile_dim`` (the paper's
fc6, 1024), are concatenated in the puzzle's place order; an MLP (``hidden_dim``: the paper's fc7, 4096;
dropout ``dropout`` after both) gives ``num_permutations`` logits. Loss: the mean softmax cross-entropy
against the permutation index (`sslx.methods.rotation.classification_loss`), logged with its top-1 accuracy.

Evaluation (`Method.embed`): the encoder's pooled features (``aux['pooled']``) of the whole image, untiled,
in evaluation mode, as the kNN and linear-probe commands read them. The tile encoder is the part of the
network that learns what a patch shows; the head only orders tiles. As in the paper's transfer experiments,
the trained encoder is then applied to whole images, larger than the tiles it saw (three times the cell
side: a ViT sees a grid of patches 3 x 3 times larger, a ConvNet averages over a larger feature map), and
to images normalised by the data mean and std rather than by tile.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from sslx import config as config_lib
from sslx import models
from sslx.methods import Method, RunLength, apply_train, online_encoder
from sslx.methods.rotation import KERNEL_AXES, ClassifierMLP, classification_loss, dense_layer, hidden_dims
from sslx.models import heads
from sslx.pretext import jigsaw
from sslx.pretext import permutations


class JigsawNet(nn.Module):
  """``(B, 9, t, t, C)`` puzzles -> ``(B, num_permutations)`` logits. Variables: ``{'encoder': ...,
  'tile_fc': ... (with tile_dim), 'head': ...}``."""
  encoder: nn.Module
  num_permutations: int
  tile_dim: Optional[int] = None
  hidden_dims: Sequence[int] = ()
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, puzzles, *, train: bool):
    batch, num_tiles, tile, _, channels = puzzles.shape
    _, aux = self.encoder(puzzles.reshape(batch * num_tiles, tile, tile, channels), train=train)
    features = aux["pooled"].astype(jnp.float32)
    if self.tile_dim is not None:
      features = nn.relu(dense_layer(self.tile_dim, KERNEL_AXES, "tile_fc")(features))
      if self.dropout_rate:
        features = nn.Dropout(self.dropout_rate, deterministic=not train)(features)
    # Rows b * 9 + i -> one row per puzzle: the features of places 0..8, in order.
    features = features.reshape(batch, num_tiles * features.shape[-1])
    head = ClassifierMLP(self.num_permutations, self.hidden_dims, self.dropout_rate, name="head")
    return head(features, train=train)


def default_config() -> ml_collections.ConfigDict:
  """``config.method`` of the jigsaw task at the paper's ImageNet sizes: 1000 permutations, 64 px tiles (of 75
  px cells: 225 px images), the paper's fc6 (1024 per tile) and fc7 (4096) with dropout 0.5; no channel
  jitter (a grey image has none to undo)."""
  return ml_collections.ConfigDict(dict(
      name="jigsaw", num_permutations=1000, tile_size=64, channel_jitter=0,
      tile_dim=ml_collections.FieldReference(1024, field_type=int),
      hidden_dim=ml_collections.FieldReference(4096, field_type=int), dropout=0.5))


def validate_config(config) -> None:
  """Raises a ValueError naming the first bad ``config.method`` key (or ``config.data.image_size``)."""
  method = config.method
  config_lib.check_section_keys(method, default_config(), "method", "Jigsaw")
  permutations.check_num_permutations(method.num_permutations)
  image_size = config.data.image_size
  if image_size % jigsaw.GRID:
    raise ValueError(f"config.data.image_size={image_size} does not split into 3 x 3 equal cells; the jigsaw "
                     "task needs a multiple of 3")
  config_lib.check_int(method.tile_size, "method.tile_size")
  cell = image_size // jigsaw.GRID
  if method.tile_size > cell:
    raise ValueError(f"config.method.tile_size={method.tile_size} is larger than the {cell} px cells of "
                     f"config.data.image_size={image_size} (3 x 3 cells)")
  try:
    models.validate_config(config.model, method.tile_size)
  except ValueError as error:
    raise ValueError(f"config.method.tile_size={method.tile_size}: the encoder encodes each tile, and not at "
                     f"that size: {error}") from error
  config_lib.check_int(method.channel_jitter, "method.channel_jitter", minimum=0)
  config_lib.check_int(method.tile_dim, "method.tile_dim", none_means="no per-tile layer")
  config_lib.check_int(method.hidden_dim, "method.hidden_dim", none_means="a linear classifier")
  config_lib.check_number(method.dropout, "method.dropout", lambda v: 0 <= v < 1, "in [0, 1)")
  heads.check_bn_groups(config, jigsaw.NUM_TILES * config.batch_size,
                        f"the 9 tiles of config.batch_size={config.batch_size} images")


def model_from_config(config) -> JigsawNet:
  method = config.method
  return JigsawNet(models.encoder_from_config(config.model), int(method.num_permutations),
                   tile_dim=None if method.tile_dim is None else int(method.tile_dim),
                   hidden_dims=hidden_dims(method.hidden_dim), dropout_rate=float(method.dropout))


def build(config, run_length: RunLength) -> Method:
  """The jigsaw bundle; reads ``config.method`` (see `default_config`)."""
  del run_length  # no schedule of its own
  model = model_from_config(config)
  permutation_set = permutations.permutation_set(int(config.method.num_permutations)).permutations
  tile_size, channel_jitter = int(config.method.tile_size), int(config.method.channel_jitter)
  embed, encoder_variables = online_encoder(model.encoder)

  def init(rng, batch):
    images = batch["image"]
    puzzles = jnp.zeros((images.shape[0], jigsaw.NUM_TILES, tile_size, tile_size, images.shape[-1]),
                        jnp.float32)
    return dict(model.init({"params": rng}, puzzles, train=False)), {}

  def loss_fn(variables, method_state, batch, rng):
    puzzle_rng, dropout_rng = jax.random.split(rng)
    puzzles, labels = jigsaw.make_puzzles(puzzle_rng, batch["image"], permutation_set, tile_size=tile_size,
                                          channel_jitter=channel_jitter)
    logits, model_state = apply_train(model, variables, puzzles, rngs={"dropout": dropout_rng})
    loss, top1 = classification_loss(logits, labels)
    return loss, ({"loss": loss, "jigsaw_top1": top1}, method_state, model_state)

  return Method(name="jigsaw", num_views=1, init=init, loss_fn=loss_fn, embed=embed,
                encoder_variables=encoder_variables)
