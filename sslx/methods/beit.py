"""BEiT (Bao et al., 2022): predict the visual tokens of masked patches from a ViT that sees every token.

Targets: a frozen tokenizer maps each image to tokens ``z in {0, ..., K - 1}``, one per patch of the ViT's
``h x w`` grid. Masking (`sslx.mask_policy`, ``config.method.mask_strategy``): by default ``block``,
`sslx.masking.blockwise_mask` masks ``M = round(r L)`` of the ``L = h w`` patches of each image in rectangular
blocks of at least ``min_block`` patches (BEiT: ``r = 75 / 196`` and ``min_block = 16`` on 14 x 14;
``min_block`` None scales 16 to the grid, ``round(16 L / 196)``: 4 on Fashion-MNIST's 7 x 7, where
``M = 19``); ``random``, ``simmim``, ``grid`` and ``importance`` (ranked by the encoder's own class-token
attention over the unmasked image: one more encoder forward pass per step) are selectable too. Each gives
every image the same static ``M``, which the head's gather needs, so a progressive ratio
(``mask_ratio_end``) is refused. The masked patch embeddings become the encoder's mask token
(``config.model.mask_token``); a linear head maps the encoder's final tokens (LayerNorm applied) at the
masked positions ``M_b`` to ``K`` logits, and the loss is the cross-entropy against the tokens there, as the
reference's ``lm_head`` on ``x[bool_masked_pos]``:

  loss = -(1 / (B M)) sum_b sum_{i in M_b} log softmax(W h_{b,i} + c)[z_{b,i}]

Visible positions never reach the head. Metrics: ``loss`` and ``mim_accuracy``, the fraction of masked
positions whose most likely token is the target.

Where the tokens come from (`config.method`):

- ``tokenizer``: a tokenizer trained as an sslx run (`sslx.methods.tokenizer`). `use_tokenizer_run` copies
  that run's ``method`` section and image size, channels, mean and std from its config.json into this key,
  so a BEiT run's own config.json describes everything it restores, and sets ``config.init_from`` to copy
  the tokenizer's encoder (and VQ codebook) into ``method_state['tokenizer']``: frozen, outside the
  optimizer's params, never updated. ``loss_fn`` tokenizes the ViT's own crop resized to the tokenizer's
  input size (lanczos3 with antialiasing, BEiT's second interpolation; 224 -> 112 px for ViT-B/16) and
  renormalised from ``config.data``'s mean and std to the tokenizer run's. Resizing on the device, rather
  than a second view from the pipeline, keeps the crop and the flip identical by construction and sends one
  image per example to the device; the reference resamples the same crop box of the original image twice.
- ``token_ids_key``: ids some other tokenizer computed beforehand, read from ``batch[token_ids_key]``
  (``(B, h, w)`` or ``(B, L)`` ints in ``[0, vocab_size)``); ``method_state`` is then empty. The data pipeline
  provides them as ``'token_ids'`` from the file ``config.data.token_ids_file`` (`sslx.token_ids`, which also
  writes one from a tokenizer run); its grid and ids are checked against the patch grid and ``vocab_size``.

`Method.embed` is the encoder's pooled output without a mask.
"""
from __future__ import annotations

import json
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn
from ml_collections.config_dict import placeholder

from sslx import config as config_lib
from sslx import init_from
from sslx import mask_policy
from sslx import token_ids as token_ids_lib
from sslx.methods import Method, RunLength, online_encoder
from sslx.methods import tokenizer as tokenizer_method
from sslx.models import tokenizer as tokenizer_lib
from sslx.models import vit

TOKENIZER_STATE = "method_state/tokenizer"  # where config.init_from puts the tokenizer's variables


class BEiT(nn.Module):
  """A ViT with a mask token and a linear head to the vocabulary. Params: ``{'encoder', 'head'}``."""
  encoder: vit.VisionTransformer
  vocab_size: int

  @nn.compact
  def __call__(self, images, mask, positions, *, train: bool):
    """``(B, M, K)`` float32 logits at ``positions`` ``(B, M)``; ``mask``: ``(B, L)`` bool, True = masked."""
    _, aux = self.encoder(images, train=train, mask=mask)
    tokens = jnp.take_along_axis(aux["patch_tokens"], positions[..., None], axis=1)
    head = vit.dense(self.vocab_size, ("embed", None), self.encoder.dtype, self.encoder.param_dtype, "head")
    return head(tokens).astype(jnp.float32)


def default_config() -> ml_collections.ConfigDict:
  """``config.method`` of BEiT: the paper's 75 of 196 patches in blocks of 16 or more (the other masking keys
  of `sslx.mask_policy` with their defaults); no token source."""
  return ml_collections.ConfigDict(dict(
      name="beit",
      **mask_policy.config_keys("block", mask_ratio=75 / 196),
      vocab_size=placeholder(int),  # None: the tokenizer's; required with token_ids_key
      tokenizer=None,               # a tokenizer run's sections, set by `use_tokenizer_run`
      token_ids_key=placeholder(str),  # or: the batch key of precomputed token ids
  ))


# ---------------------------------------------------------------------------------------------------------
# The tokenizer of another run.

def tokenizer_section(run_config: ml_collections.ConfigDict, run_dir: str) -> ml_collections.ConfigDict:
  """``config.method.tokenizer`` for the tokenizer run ``run_dir`` whose config is ``run_config``."""
  data = run_config.data
  return ml_collections.ConfigDict(dict(
      run_dir=run_dir, method=run_config.method.to_dict(),
      data=dict(image_size=data.image_size, channels=data.channels, mean=tuple(data.mean),
                std=tuple(data.std))))


def use_tokenizer_run(config: ml_collections.ConfigDict, run_dir: str) -> None:
  """Points a BEiT config at the tokenizer trained in ``run_dir``: ``config.method.tokenizer`` and
  ``config.init_from`` (what a config file's ``tokenizer=RUN_DIR`` argument does)."""
  run_config = init_from.load_run_config(run_dir)
  if run_config.method.get("name") != "tokenizer":
    raise ValueError(f"tokenizer={run_dir!r} is a {run_config.method.get('name')!r} run, not a tokenizer "
                     "run")
  config.method.tokenizer = tokenizer_section(run_config, run_dir)
  config.init_from = tokenizer_method.loading_triples(run_dir, TOKENIZER_STATE, run_config)


def tokenizer_view(images, tokenizer, data) -> jax.Array:
  """The tokenizer's input: ``images`` (normalised by ``data.mean``, ``data.std``) resized to its image
  size (lanczos3, antialiased) and renormalised by the tokenizer run's mean and std. Resizing commutes with
  the per-channel affine map, as the kernel's weights sum to 1."""
  x = jnp.asarray(images, jnp.float32)
  size = int(tokenizer.data.image_size)
  if x.shape[1:3] != (size, size):
    x = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), method="lanczos3", antialias=True)
  std, mean = jnp.asarray(tokenizer.data.std, jnp.float32), jnp.asarray(tokenizer.data.mean, jnp.float32)
  scale = jnp.asarray(data.std, jnp.float32) / std
  shift = (jnp.asarray(data.mean, jnp.float32) - mean) / std
  return x * scale + shift


def target_fn(config):
  """``(init_state(rng), targets(method_state, batch) -> (B, L) int32)`` of the token source."""
  mc, grid = config.method, _grid(config)
  if mc.token_ids_key is not None:
    key = mc.token_ids_key

    def batch_ids(method_state, batch):
      del method_state
      if key not in batch:
        raise ValueError(f"config.method.token_ids_key={key!r}, but the batch has only {sorted(batch)}: set "
                         f"{token_ids_lib.CONFIG_KEY} to a file of ids (sslx/token_ids.py), which the data "
                         f"pipeline delivers as {token_ids_lib.BATCH_KEY!r}")
      ids = jnp.asarray(batch[key])
      if ids.size != ids.shape[0] * grid * grid:
        # A gather at a position past the end would clamp silently.
        raise ValueError(f"batch[{key!r}] (config.method.token_ids_key) has shape {ids.shape}; the "
                         f"{grid}x{grid} patch grid needs {grid * grid} ids per image")
      return ids.reshape(ids.shape[0], -1).astype(jnp.int32)

    return lambda rng: {}, batch_ids
  tokenizer = mc.tokenizer
  module = tokenizer_method.model_from_config(tokenizer)
  size, channels = int(tokenizer.data.image_size), int(tokenizer.data.channels)

  def init_state(rng):
    example = jnp.zeros((1, size, size, channels), jnp.float32)
    variables = module.init({"params": rng}, example, method=tokenizer_lib.Tokenizer.ids)
    return {"tokenizer": dict(variables)}

  def tokenize(method_state, batch):
    view = tokenizer_view(batch["image"], tokenizer, config.data)
    ids = tokenizer_lib.token_ids(module, method_state["tokenizer"], view)
    return ids.reshape(ids.shape[0], -1)

  return init_state, tokenize


# ---------------------------------------------------------------------------------------------------------
# Validation.

def validate_config(config) -> None:
  """Raises a ValueError naming the first bad ``config.method`` key (or model or init_from key BEiT needs)."""
  config_lib.check_section_keys(config.method, default_config(), "method", "BEiT")
  mask_policy.check_mask_token_encoder(config, "BEiT")
  mask_policy_of(config)
  _check_targets(config)
  layer_decay = config.get("optimizer", {}).get("layer_decay")
  if layer_decay is not None:
    raise ValueError(f"config.optimizer.layer_decay={layer_decay} is for fine-tuning; BEiT pretrains: set it "
                     "to None")


def _grid(config) -> int:
  return config.data.image_size // vit.parse_variant(config.model.variant)["patch_size"]


def mask_policy_of(config) -> mask_policy.MaskPolicy:
  """The run's masking, checked: a static count ``M`` per image for every strategy."""
  return mask_policy.from_config(config, default_config(),
                                 static_count="BEiT's head gathers a static number of masked positions")


def mask_counts(config) -> tuple[int, Optional[int], Optional[int]]:
  """``(M, min_block, max_block)`` of the run's masking (the block sizes are None unless
  ``config.method.mask_strategy='block'``); ``M = round(mask_ratio * L)`` for blocks."""
  policy = mask_policy_of(config)
  return policy.num_masked, policy.min_block, policy.max_block


def _check_targets(config) -> None:
  """Exactly one token source; precomputed ids need the vocabulary size, a tokenizer run the checks below."""
  mc = config.method
  if mc.tokenizer is None and mc.token_ids_key is None:
    raise ValueError("config.method.tokenizer and config.method.token_ids_key are both None: BEiT needs "
                     "token targets, from a tokenizer run (the config argument tokenizer=RUN_DIR, e.g. "
                     "configs/beit_fashion_mnist.py:tokenizer=runs/tokenizer) or precomputed in the batch "
                     "(config.method.token_ids_key)")
  if mc.tokenizer is not None and mc.token_ids_key is not None:
    raise ValueError(f"config.method.token_ids_key={mc.token_ids_key!r} and config.method.tokenizer are both "
                     "set; BEiT reads one token source")
  if mc.token_ids_key is not None:
    if not isinstance(mc.token_ids_key, str) or mc.token_ids_key in ("image", "label", ""):
      raise ValueError(f"config.method.token_ids_key={mc.token_ids_key!r} must name a batch key other than "
                       "'image' and 'label'")
    config_lib.check_int(mc.vocab_size, "method.vocab_size", 2)
    _check_token_ids_file(config)
    return
  path = config.data.get("token_ids_file")
  if path is not None:
    raise ValueError(f"{token_ids_lib.CONFIG_KEY}={path!r}, but BEiT reads its targets from "
                     f"config.method.tokenizer; set config.method.token_ids_key={token_ids_lib.BATCH_KEY!r} (and "
                     "no tokenizer) to train on the file's ids")
  _check_tokenizer(config)
  _check_tokenizer_is_loaded(config)


def _check_token_ids_file(config) -> None:
  """The ids of ``config.data.token_ids_file`` (if set) land in the batch key BEiT reads, on its patch grid, in
  its vocabulary (the file is scanned once: a wrong id would otherwise surface as a NaN loss)."""
  mc, path = config.method, config.data.get("token_ids_file")
  if path is None:
    return
  where = f"{token_ids_lib.CONFIG_KEY}={path!r}"
  if mc.token_ids_key != token_ids_lib.BATCH_KEY:
    raise ValueError(f"config.method.token_ids_key={mc.token_ids_key!r}, but the data pipeline delivers the ids "
                     f"of {where} as {token_ids_lib.BATCH_KEY!r}")
  grid, shape = _grid(config), token_ids_lib.open_ids(path).shape
  if shape[-2:] != (grid, grid):
    raise ValueError(f"{where} has shape {shape}, ids on a {shape[-2]}x{shape[-1]} grid, but "
                     f"config.model.variant={config.model.variant!r} at config.data.image_size="
                     f"{config.data.image_size} has a {grid}x{grid} patch grid")
  low, high = token_ids_lib.id_range(path)
  if low < 0 or high >= mc.vocab_size:
    raise ValueError(f"{where} holds ids from {low} to {high}, outside [0, config.method.vocab_size="
                     f"{mc.vocab_size})")


def _check_tokenizer(config) -> None:
  """The tokenizer run's token grid must be the ViT's patch grid; vocabulary and channels must agree."""
  mc, tokenizer = config.method, config.method.tokenizer
  if not all(key in tokenizer for key in ("run_dir", "method", "data")):
    raise ValueError(f"config.method.tokenizer has keys {sorted(tokenizer)}, not run_dir, method and data: "
                     "set it with sslx.methods.beit.use_tokenizer_run (config argument tokenizer=RUN_DIR)")
  vocab = tokenizer.method.vocab_size
  if mc.vocab_size is not None and mc.vocab_size != vocab:
    raise ValueError(f"config.method.vocab_size={mc.vocab_size} is not the vocabulary of the tokenizer run "
                     f"{tokenizer.run_dir} (config.method.tokenizer.method.vocab_size={vocab}); set it to "
                     "None")
  if tokenizer.data.channels != config.data.channels:
    raise ValueError(f"config.data.channels={config.data.channels}, but the tokenizer run "
                     f"{tokenizer.run_dir} reads config.method.tokenizer.data.channels="
                     f"{tokenizer.data.channels}")
  size, factor, grid = tokenizer.data.image_size, tokenizer.method.downsample, _grid(config)
  if size % factor or size // factor != grid:
    side = f"{size / factor:g}"
    raise ValueError(f"The tokenizer run {tokenizer.run_dir} makes a {side}x{side} token "
                     f"grid (config.method.tokenizer.data.image_size={size} / .method.downsample={factor}), "
                     f"but config.model.variant={config.model.variant!r} at config.data.image_size="
                     f"{config.data.image_size} has a {grid}x{grid} patch grid")


def _check_tokenizer_is_loaded(config) -> None:
  """``config.init_from`` must fill every part of ``method_state['tokenizer']`` (`sslx.methods.tokenizer.loading_triples`; a parent
  subtree will do) from the run ``config.method.tokenizer`` describes: a random tokenizer, or a random
  codebook, would train on noise without an error. That run's config.json must agree with the section."""
  tokenizer = config.method.tokenizer
  mappings = init_from.parse_mappings(config.init_from)
  for mapping in mappings:
    if mapping.target.startswith(TOKENIZER_STATE) and mapping.run_dir != tokenizer.run_dir:
      raise ValueError(f"config.init_from loads {mapping.target} from {mapping.run_dir!r}, but "
                       f"config.method.tokenizer describes the run {tokenizer.run_dir!r}")
  for _, _, target in tokenizer_method.loading_triples(tokenizer.run_dir, TOKENIZER_STATE, tokenizer):
    if not any(target == m.target or target.startswith(m.target + "/") for m in mappings):
      raise ValueError(f"config.init_from={config.init_from!r} loads nothing into {target}, so the tokenizer "
                       "of config.method.tokenizer would be random there: set both with the config argument "
                       f"tokenizer={tokenizer.run_dir} (sslx.methods.beit.use_tokenizer_run)")
  recorded = tokenizer_section(init_from.load_run_config(tokenizer.run_dir), tokenizer.run_dir)
  if _as_json(recorded) != _as_json(tokenizer):
    raise ValueError(f"config.method.tokenizer differs from the config.json of the tokenizer run "
                     f"{tokenizer.run_dir}: set it with the config argument tokenizer={tokenizer.run_dir}")


def _as_json(section) -> str:
  return json.dumps(json.loads(section.to_json()), sort_keys=True)


# ---------------------------------------------------------------------------------------------------------
# The bundle.

def model_from_config(config) -> BEiT:
  """The encoder of ``config.model`` (with its mask token) and a head to the vocabulary."""
  mc = config.method
  vocab = mc.vocab_size if mc.vocab_size is not None else mc.tokenizer.method.vocab_size
  return BEiT(vit.from_config(config.model), int(vocab))


def masked_positions(mask: jax.Array, num_masked: int) -> jax.Array:
  """``(B, M)`` int32 indices of the masked patches of each row of ``mask``, ascending (``M`` per row)."""
  return jnp.argsort(~mask, axis=1, stable=True)[:, :num_masked].astype(jnp.int32)


def masked_token_loss(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(loss, accuracy)`` over ``(B, M, K)`` logits and ``(B, M)`` targets at the masked positions:
  ``-(1 / (B M)) sum log softmax(logits)[target]`` and the fraction whose argmax is the target."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  loss = -jnp.mean(jnp.take_along_axis(log_probs, targets[..., None], axis=-1))
  accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32))
  return loss, accuracy


def build(config, run_length: RunLength) -> Method:
  """The BEiT bundle (module docstring)."""
  del run_length  # BEiT follows no schedule of its own
  model = model_from_config(config)
  policy = mask_policy_of(config)
  num_masked = policy.num_masked
  init_state, targets = target_fn(config)
  embed, encoder_variables = online_encoder(model.encoder)
  masks = mask_policy.method_masks(policy, model.encoder, encoder_variables)

  def init(rng, batch):
    # Split in three as when the third key drew the init mask, so the parameters are the same: they depend on
    # shapes only, and any mask of M patches will do (importance has no encoder to score with yet).
    params_rng, state_rng, _ = jax.random.split(rng, 3)
    images = batch["image"]
    mask = mask_policy.placeholder_mask(policy, images.shape[0])
    positions = masked_positions(mask, num_masked)
    variables = model.init({"params": params_rng}, images, mask, positions, train=False)
    return dict(variables), init_state(state_rng)

  def loss_fn(variables, method_state, batch, rng):
    masking_rng, dropout_rng = jax.random.split(rng)
    images = batch["image"]
    mask = masks(masking_rng, variables, method_state, images)
    positions = masked_positions(mask, num_masked)
    ids = jnp.take_along_axis(targets(method_state, batch), positions, axis=1)
    logits = model.apply(variables, images, mask, positions, train=True, rngs={"dropout": dropout_rng})
    loss, accuracy = masked_token_loss(logits, ids)
    return loss, ({"loss": loss, "mim_accuracy": accuracy}, method_state, {})

  return Method(name="beit", num_views=1, init=init, loss_fn=loss_fn, embed=embed,
                encoder_variables=encoder_variables)
