"""BEiT's visual tokenizer as an ordinary sslx run: a discrete autoencoder (`sslx.models.tokenizer`).

Loss, per step, on the normalised pixels ``x`` the pipeline delivers and the reconstruction ``x^``:

    VQ (``config.method.quantizer='vq'``):  L = MSE(x^, x) + beta L_commit          (beta = 0.25)
    dVAE (``'gumbel'``):                     L = MSE(x^, x) + w_t KL(q || U)

MSE (`reconstruction_loss`) rather than L1 or DALL-E's logit-Laplace: on standardised pixels it is the
VQ-VAE's "reconstruction error / data variance", about 1 for a constant guess, so beta keeps the paper's
meaning and the logged ``recon`` reads as the fraction of pixel variance left unexplained. The commitment
term and the moving-average codebook are `sslx.models.tokenizer`'s. The codebook is not trained by the
optimizer: it lives in the non-param collection ``'codebook'``, which the training pass updates and returns as
model state, as BatchNorm's statistics are, so the loop carries and saves it beside the parameters.

The dVAE decodes Gumbel-softmax samples at a temperature annealed from ``temperature`` to
``final_temperature`` by a half-cosine over ``anneal_fraction`` of the run (DALL-E: 1 -> 1/16); its KL weight
``w_t`` rises linearly from 0 to ``kl_weight`` over ``kl_warmup_fraction`` of it. Both read
``method_state['step']``, which `after_update` advances (``loss_fn`` is given no step).

Metrics: ``recon``; ``codebook_usage``, the fraction of the vocabulary chosen at least once in the global
batch; ``perplexity``, ``exp`` of the entropy of the batch's code frequencies (the vocabulary size at best);
``commitment`` (VQ) or ``kl``, ``temperature``, ``kl_weight`` (dVAE). `Method.embed` is the encoder's last
hidden map averaged over positions, so the kNN and linear-probe commands run on a tokenizer run too; the
pictures show originals over reconstructions.

``config.model`` of a tokenizer run is the ViT its tokens are for: the token grid must equal that ViT's patch
grid at ``config.method.vit_image_size`` (checked here); the tokenizer never builds it. A BEiT run copies a
finished tokenizer into its method state with ``config.init_from = loading_triples(run_dir)``, builds the
module with `model_from_config` of that run's config.json and calls `sslx.models.tokenizer.token_ids` on its
tokenizer view, normalised with the tokenizer run's ``config.data.mean`` / ``std``. Token ids from any other
tokenizer can stand in for that call as a batch key ``(B, h, w)`` int32 of the same crop, which the data
pipeline would have to provide (sslx's views carry images and labels only).
"""
from __future__ import annotations

import collections
import math
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections.config_dict import placeholder

from sslx import config as config_lib
from sslx import init_from
from sslx import schedules
from sslx.methods import Method, RunLength, apply_train, online_encoder
from sslx.models import tokenizer as tokenizer_lib
from sslx.models import vit

QUANTIZERS = ("vq", "gumbel")
Triple = tuple[str, str, str]  # a config.init_from entry: (run_dir, source subtree, target subtree)


def default_config() -> ml_collections.ConfigDict:
  """``config.method`` of the tokenizer: a VQ-VAE with the paper's beta, gamma and eps, restarting the codes
  chosen less than once per step; the dVAE's schedules as DALL-E's, its KL weight chosen for an MSE
  reconstruction term (on `tests/test_tokenizer.py`'s learning check, not tuned further)."""
  return ml_collections.ConfigDict(dict(
      name="tokenizer",
      quantizer="vq",               # 'vq' (EMA codebook) | 'gumbel' (dVAE)
      vocab_size=8192,
      downsample=8,                 # image side / token grid side: a power of 2
      width=128,                    # channels of the encoder's and decoder's hidden maps
      num_res_blocks=2,
      dtype="auto",                 # convolutions; quantisation and losses are float32
      vit_image_size=placeholder(int),  # the ViT's input size, for the grid check; None: data.image_size
      vq=dict(code_dim=64, commitment_cost=0.25, decay=0.99, epsilon=1e-5, dead_code_threshold=1.0),
      gumbel=dict(temperature=1.0, final_temperature=1 / 16, anneal_fraction=0.5, kl_weight=0.1,
                  kl_warmup_fraction=0.1, hard=False),
  ))


def validate_config(config) -> None:
  """Raises a ValueError naming the first bad ``config.method`` key, before anything is built."""
  mc = config.method
  if mc.quantizer not in QUANTIZERS:
    raise ValueError(f"config.method.quantizer={mc.quantizer!r} is not one of {QUANTIZERS}")
  config_lib.check_int(mc.vocab_size, "method.vocab_size", 2)
  config_lib.check_int(mc.width, "method.width")
  config_lib.check_int(mc.num_res_blocks, "method.num_res_blocks", 0)
  _check_fsdp(config)
  _check_grid(config)
  try:
    vit.resolve_dtype(mc.dtype)
  except (ValueError, TypeError):
    raise ValueError(f"config.method.dtype={mc.dtype!r} is not one of float32, bfloat16, float16, auto"
                     ) from None
  vq, gumbel = mc.vq, mc.gumbel
  config_lib.check_int(vq.code_dim, "method.vq.code_dim")
  config_lib.check_number(vq.commitment_cost, "method.vq.commitment_cost", lambda v: v >= 0, ">= 0")
  config_lib.check_number(vq.decay, "method.vq.decay", lambda v: 0 <= v < 1, "in [0, 1)")
  config_lib.check_number(vq.epsilon, "method.vq.epsilon", lambda v: v > 0, "> 0")
  config_lib.check_number(vq.dead_code_threshold, "method.vq.dead_code_threshold", lambda v: v >= 0,
                          ">= 0 (0: no restarts)")
  for key in ("temperature", "final_temperature"):
    config_lib.check_number(gumbel[key], f"method.gumbel.{key}", lambda v: v > 0, "> 0")
  for key in ("anneal_fraction", "kl_warmup_fraction"):
    config_lib.check_number(gumbel[key], f"method.gumbel.{key}", lambda v: 0 <= v <= 1, "in [0, 1]")
  config_lib.check_number(gumbel.kl_weight, "method.gumbel.kl_weight", lambda v: v >= 0, ">= 0")
  config_lib.check_bool(gumbel.hard, "method.gumbel.hard")
  layer_decay = config.get("optimizer", {}).get("layer_decay")
  if layer_decay is not None:
    raise ValueError(f"config.optimizer.layer_decay={layer_decay} is for fine-tuning a ViT; the tokenizer "
                     "has no ViT blocks: set it to None")


def _check_fsdp(config) -> None:
  """FSDP splits the output channels of the tokenizer's ``width``-wide convolutions (the others stay whole,
  `sslx.models.tokenizer`), so the FSDP width must divide ``config.method.width``: otherwise placing the
  parameters would fail at initialisation."""
  width, fsdp = config.method.width, config.get("parallel", {}).get("fsdp", 1)
  if fsdp > 1 and width % fsdp:
    raise ValueError(f"config.parallel.fsdp={fsdp} splits the tokenizer's convolutions of config.method.width="
                     f"{width} channels over {fsdp} devices, but {width} is not divisible by {fsdp}: choose a "
                     "width that is, or a smaller config.parallel.fsdp")


def _check_grid(config) -> None:
  """The token grid ``image_size / downsample`` must be the patch grid of the ViT in ``config.model``."""
  mc, size = config.method, config.data.image_size
  factor = mc.downsample
  if not (config_lib.is_int(factor) and 2 <= factor < 2**31 and factor & (factor - 1) == 0):
    raise ValueError(f"config.method.downsample={factor!r} must be a power of 2 (2, 4, 8, ...)")
  if size % factor:
    raise ValueError(f"config.data.image_size={size} is not divisible by config.method.downsample={factor}")
  config_lib.check_int(mc.vit_image_size, "method.vit_image_size", none_means="config.data.image_size")
  if config.model.get("name") != "vit":
    raise ValueError(f"config.model.name={config.model.get('name')!r}: a tokenizer run's config.model is the "
                     "ViT whose patch grid its tokens are for, e.g. sslx.models.default_config('vit', "
                     "variant='B/16')")
  variant = config.model.variant
  patch = vit.parse_variant(variant)["patch_size"]
  vit_size = mc.vit_image_size or size
  grid, vit_grid = size // factor, vit_size / patch
  if vit_grid != grid:
    raise ValueError(f"config.method.downsample={factor} makes a {grid}x{grid} token grid of "
                     f"config.data.image_size={size}, but config.model.variant={variant!r} at "
                     f"config.method.vit_image_size={vit_size} has a {vit_grid:g}x{vit_grid:g} patch grid")


def model_from_config(config) -> tokenizer_lib.Tokenizer:
  """The `Tokenizer` of ``config.method`` for ``config.data.channels`` (also how a BEiT run builds the
  tokenizer from the tokenizer run's config.json)."""
  mc = config.method
  dtype = vit.resolve_dtype(mc.dtype)
  levels, width, blocks = int(math.log2(mc.downsample)), int(mc.width), int(mc.num_res_blocks)
  vq = mc.quantizer == "vq"
  out_dim = int(mc.vq.code_dim if vq else mc.vocab_size)  # code vectors, or logits over the vocabulary
  encoder = tokenizer_lib.ConvEncoder(width, levels, blocks, out_dim, dtype)
  decoder = tokenizer_lib.ConvDecoder(width, levels, blocks, int(config.data.channels), dtype)
  quantizer = None
  if vq:
    quantizer = tokenizer_lib.EMAQuantizer(int(mc.vocab_size), int(mc.vq.code_dim), float(mc.vq.decay),
                                           float(mc.vq.epsilon), float(mc.vq.dead_code_threshold))
  return tokenizer_lib.Tokenizer(encoder, decoder, quantizer)


def reconstruction_loss(reconstruction, images) -> jax.Array:
  """``(1 / (B H W C)) sum (x^ - x)^2`` in float32 over the normalised pixels ``x``."""
  return jnp.mean(jnp.square(reconstruction.astype(jnp.float32) - images.astype(jnp.float32)))


def gumbel_schedules(gumbel, total_steps: int):
  """``(temperature(step), kl_weight(step))`` of the dVAE: the half-cosine anneal and the linear warm-up."""
  anneal_steps = float(gumbel.anneal_fraction) * total_steps
  warmup_steps = float(gumbel.kl_warmup_fraction) * total_steps
  start, end, weight = float(gumbel.temperature), float(gumbel.final_temperature), float(gumbel.kl_weight)
  return (lambda step: schedules.cosine_decay(step, anneal_steps, start, end),
          lambda step: schedules.linear_warmup(step, warmup_steps, 0.0, weight))


def build(config, run_length: RunLength) -> Method:
  """The tokenizer bundle; reads ``config.method`` and ``config.data.channels``."""
  model = model_from_config(config)
  mc = config.method
  vq, vocab_size = mc.quantizer == "vq", int(mc.vocab_size)
  commitment_cost, hard = float(mc.vq.commitment_cost), bool(mc.gumbel.hard)
  temperature, kl_weight = gumbel_schedules(mc.gumbel, int(run_length.total_steps))
  embed, encoder_variables = online_encoder(model.encoder)

  def init(rng, batch):
    variables = model.init({"params": rng}, batch["image"], train=False)
    return dict(variables), ({} if vq else {"step": jnp.zeros((), jnp.int32)})

  def loss_fn(variables, method_state, batch, rng):
    images = batch["image"]
    if vq:
      out, model_state = apply_train(model, variables, images, rngs={tokenizer_lib.CODEBOOK: rng})
      metrics = {"commitment": out["commitment"]}
      regulariser = commitment_cost * out["commitment"]
    else:
      step = method_state["step"]
      tau, weight = temperature(step), kl_weight(step)
      out, model_state = apply_train(model, variables, images, temperature=tau, hard=hard,
                                     rngs={"gumbel": rng})
      kl = tokenizer_lib.kl_to_uniform(out["pre_quantization"])
      metrics = {"kl": kl, "temperature": tau, "kl_weight": weight}
      regulariser = weight * kl
    recon = reconstruction_loss(out["reconstruction"], images)
    usage, perplexity = tokenizer_lib.code_statistics(out["ids"], vocab_size)
    loss = recon + regulariser
    metrics.update(loss=loss, recon=recon, codebook_usage=usage, perplexity=perplexity)
    return loss, (metrics, method_state, model_state)

  def after_update(variables, method_state, step):
    del variables
    return method_state if vq else {"step": step + 1}

  def visualize(variables, method_state, batch, rng):
    del method_state, rng
    images = jnp.asarray(batch["image"], jnp.float32)
    out = model.apply(variables, images, train=False)
    # An OrderedDict keeps its row order through jit (a plain dict comes back with sorted keys).
    return collections.OrderedDict(original=images, reconstruction=out["reconstruction"])

  return Method(name="tokenizer", num_views=1, init=init, loss_fn=loss_fn, embed=embed,
                encoder_variables=encoder_variables, after_update=after_update, visualize=visualize)


def loading_triples(run_dir: str, target: str = "method_state/tokenizer",
                    run_config: Optional[ml_collections.ConfigDict] = None) -> tuple[Triple, ...]:
  """``config.init_from`` triples that copy what `sslx.models.tokenizer.token_ids` reads of the tokenizer run
  in ``run_dir`` to ``target``: the encoder's parameters to ``<target>/params/encoder`` and, for a VQ tokenizer,
  the codebook collection to ``<target>/codebook`` (not the decoder). ``<target>`` then holds the variables
  ``module.init(..., method=Tokenizer.ids)`` makes, which is how the loading run creates it."""
  run_config = init_from.load_run_config(run_dir) if run_config is None else run_config
  triples = ((run_dir, "params/encoder", f"{target}/params/encoder"),)
  if run_config.method.quantizer == "vq":
    codebook = tokenizer_lib.CODEBOOK
    triples += ((run_dir, f"model_state/{codebook}", f"{target}/{codebook}"),)
  return triples
