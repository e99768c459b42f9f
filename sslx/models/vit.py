"""Vision Transformer (ViT) encoder with the MAE / timm initialisation.

Every parameter carries logical axis names (``nn.with_logical_partitioning``) drawn only from
``'embed'`` (model width), ``'mlp'`` (MLP hidden), ``'heads'``, ``'head_dim'``, ``'patch'`` (patch pixel
vector) and ``'layers'`` (the leading axis of stacked blocks); ``sslx.parallel`` maps them onto the mesh.

Blocks come in two parameter layouts (`run_blocks`): unrolled, ``block_0 ... block_{L-1}`` (a Python loop:
the compiled program holds every block), or stacked, one ``blocks`` subtree whose leaves have a leading
``L`` axis (``config.model.scan_blocks``: one ``nn.scan``, so the program holds one block, compiled once).
`sslx.convert.scan_layout` converts between them exactly; both compute the same function (to float32
rounding: XLA may order a few additions differently inside a loop).
"""
from __future__ import annotations

import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from ml_collections.config_dict import placeholder

from sslx import config as config_lib
from sslx.models import attention as attention_lib
from sslx.models import pos_embed as pos_embed_lib
from sslx.models import relative_position

Dtype = Any

STACKED_BLOCKS = "blocks"  # the scanned blocks' subtree; unrolled blocks are `block_{i}`
LAYERS_AXIS = "layers"  # logical name of the stacked blocks' leading axis
REMATS = ("none", "matmuls", "full")

VIT_VARIANTS = {
    "Ti": dict(width=192, depth=12, num_heads=3, mlp_dim=768),
    "S": dict(width=384, depth=12, num_heads=6, mlp_dim=1536),
    "B": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
    "L": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096),
    "H": dict(width=1280, depth=32, num_heads=16, mlp_dim=5120),
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# MAE initialises every linear layer (and the patch projection viewed as one) with xavier-uniform; the
# fused qkv matrix is one (D, 3D) linear layer, as in MAE/timm.
xavier_init = nn.initializers.xavier_uniform()
_patch_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=-1)
token_init = nn.initializers.normal(stddev=0.02)


def parse_variant(variant: str) -> dict:
  """Parses a variant string such as ``"B/16"`` into model dimensions.

  Returns:
    dict with ``width``, ``depth``, ``num_heads``, ``mlp_dim`` and ``patch_size``.
  """
  match = re.fullmatch(r"(\w+)/(\d+)", variant.strip()) if isinstance(variant, str) else None
  if match is None or match.group(1) not in VIT_VARIANTS or int(match.group(2)) < 1:
    raise ValueError(f"Unknown ViT variant {variant!r}: expected '<name>/<patch size>' with name one of "
                     f"{list(VIT_VARIANTS)} and a positive patch size, e.g. 'B/16'.")
  return dict(VIT_VARIANTS[match.group(1)], patch_size=int(match.group(2)))


def resolve_dtype(name: str) -> Dtype:
  """Maps ``'float32' | 'bfloat16' | 'float16' | 'auto'`` to a dtype.

  ``'auto'`` is bfloat16 on accelerators and float32 on CPU, where bfloat16 matmuls are slow.
  """
  if name == "auto":
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  if name not in _DTYPES:
    raise ValueError(f"Unknown dtype {name!r}; choose one of {[*_DTYPES, 'auto']}.")
  return _DTYPES[name]


def partitioned(init, names):
  """Wraps an initializer so its parameter carries logical axis ``names``."""
  return nn.with_logical_partitioning(init, names)


def layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
  """LayerNorm over the model width (scale 1, bias 0)."""
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype,
                      scale_init=partitioned(nn.initializers.ones, ("embed",)),
                      bias_init=partitioned(nn.initializers.zeros, ("embed",)), name=name)


def dense(features: int, axes: tuple, dtype: Dtype, param_dtype: Dtype, name: str):
  """A linear layer with MAE's init (xavier-uniform kernel, zero bias) and logical axes ``(in, out)``.

  Returns ``x (..., in) -> (..., features)``, applied to ``x`` as one matrix of rows: over ``(B, T, in)``
  the weight gradient would contract two axes, and XLA:CPU then copies the output gradient into a transposed
  layout first (that copy was a third of the quick-start MLP's backward pass, docs/benchmarks.md).
  """
  layer = nn.Dense(features, dtype=dtype, param_dtype=param_dtype, kernel_init=partitioned(xavier_init, axes),
                   bias_init=partitioned(nn.initializers.zeros, axes[1:]), name=name)
  return lambda x: layer(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], features)


class Attention(nn.Module):
  """Multi-head self-attention with a fused, biased qkv projection.

  ``implementation``: ``'xla'`` or ``'cudnn'`` (`sslx.models.attention.self_attention`). A relative
  position bias (`sslx.models.relative_position`), from its own table for the grid ``rel_pos_grid`` or
  passed in, joins the logits.
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  implementation: str = "xla"
  rel_pos_grid: Optional[tuple[int, int]] = None

  @nn.compact
  def __call__(self, x, bias=None):
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"Width {width} is not divisible by num_heads={self.num_heads}.")
    batch, tokens = x.shape[:2]
    # 2-D kernels keep XLA's backward pass free of the transposes multi-axis DenseGeneral adds.
    qkv = dense(3 * width, ("embed", None), self.dtype, self.param_dtype, "qkv")(x)
    qkv = qkv.reshape(batch, tokens, 3, self.num_heads, width // self.num_heads)
    if self.rel_pos_grid is not None:
      bias = relative_position.RelativePositionBias(self.num_heads, self.rel_pos_grid, self.param_dtype,
                                                    name="rel_pos_bias")()
    if bias is None:
      out = attention_lib.self_attention(qkv, self.implementation)
    else:
      out = relative_position.biased_attention(qkv, bias)
    return dense(width, (None, "embed"), self.dtype, self.param_dtype, "proj")(out.reshape(batch, tokens, width))


class Mlp(nn.Module):
  """Two-layer MLP with exact (erf) GELU."""
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    hidden = dense(self.mlp_dim, ("embed", "mlp"), self.dtype, self.param_dtype, "fc1")(x)
    hidden = nn.gelu(hidden, approximate=False)
    return dense(x.shape[-1], ("mlp", "embed"), self.dtype, self.param_dtype, "fc2")(hidden)


def drop_path(x, keep_prob, key):
  """Per-sample stochastic depth: a sample's ``x`` becomes 0 with probability ``1 - keep_prob``, else
  ``x / keep_prob`` (its expectation is ``x``). ``keep_prob`` is an array, so a scan can feed each layer its own.
  """
  keep = jax.random.bernoulli(key, keep_prob, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / keep_prob.astype(x.dtype), jnp.zeros_like(x))


def drop_path_inputs(key, rate: float, depth: int):
  """``(keep_prob, key)`` of every block, each with a leading ``depth`` axis, for `run_blocks`.

  The drop rate grows linearly from 0 at the first block to ``rate`` at the last, as in timm.
  """
  keep_prob = jnp.asarray(1.0 - np.linspace(0.0, rate, depth), jnp.float32)
  return keep_prob, jax.random.split(key, depth)


class Block(nn.Module):
  """Pre-norm transformer block with optional per-sample stochastic depth (drop path) on both branches.

  ``layer_scale`` (LayerScale, Touvron et al. 2021, as in BEiT): learned per-channel ``gamma_1``, ``gamma_2``
  initialised to it scale each branch before drop path, ``x + drop_path(gamma_1 * attn(norm1(x)))`` and
  ``x + drop_path(gamma_2 * mlp(norm2(x)))``. ``rel_pos_grid``: the attention's own bias table (`Attention`).
  """
  num_heads: int
  mlp_dim: int
  layer_norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "xla"
  layer_scale: Optional[float] = None
  rel_pos_grid: Optional[tuple[int, int]] = None

  @nn.compact
  def __call__(self, x, drop=None, bias=None):
    """``drop``: None (no drop path), or this block's ``(keep_prob, key)`` (`drop_path_inputs`); ``bias``: a
    relative position bias shared by the blocks, or None."""
    # Each branch draws its own mask, as two calls of timm's DropPath do.
    keys = None if drop is None else jax.random.split(drop[1])

    def residual(y, branch):
      if self.layer_scale is not None:
        init = partitioned(nn.initializers.constant(self.layer_scale), ("embed",))
        gamma = self.param(f"gamma_{branch + 1}", init, (y.shape[-1],), self.param_dtype)
        y = y * gamma.astype(y.dtype)
      return y if drop is None else drop_path(y, drop[0], keys[branch])

    y = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, "norm1")(x)
    attention = Attention(self.num_heads, self.dtype, self.param_dtype, self.attention, self.rel_pos_grid,
                          name="attn")
    x = x + residual(attention(y, bias), 0)
    y = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, "norm2")(x)
    return x + residual(Mlp(self.mlp_dim, self.dtype, self.param_dtype, name="mlp")(y), 1)


# 'matmuls' keeps the outputs of the four weight matmuls (qkv, proj, fc1, fc2: most of a block's FLOPs)
# and recomputes the rest (norms, GELU, softmax, the attention scores: most of its activation bytes).
# `checkpoint_dots` would also keep the batched attention matmuls, whose scores grow with tokens squared.
_REMAT_POLICIES = {"matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable, "full": None}


def _block_class(remat: str, in_scan: bool):
  """`Block`, rematerialised per block unless ``remat='none'``."""
  if remat not in REMATS:
    raise ValueError(f"Unknown remat {remat!r}; choose one of {REMATS}.")
  if remat == "none":
    return Block
  # A scan's loop boundary already keeps XLA from merging the recomputation back into the forward pass.
  return nn.remat(Block, policy=_REMAT_POLICIES[remat], prevent_cse=not in_scan)


def run_blocks(x, drops, bias=None, *, depth: int, scan: bool, remat: str, **block_fields):
  """``depth`` `Block`s in sequence, inside the calling module's compact method.

  Args:
    x: ``(B, T, D)`` tokens.
    drops: None, or `drop_path_inputs` (one ``(keep_prob, key)`` per block along a leading axis).
    bias: None, or a relative position bias ``(N, T, T)`` every block adds to its attention logits.
    depth: number of blocks.
    scan: one ``nn.scan`` over stacked parameters (subtree ``blocks``, leading axis ``'layers'``) instead of
      ``block_0 ... block_{depth-1}``.
    remat: ``'none' | 'matmuls' | 'full'``: what each block keeps for the backward pass (see `_REMAT_POLICIES`).
    **block_fields: `Block`'s fields.
  """
  block = _block_class(remat, in_scan=scan)
  if not scan:
    for i in range(depth):
      layer_drop = None if drops is None else jax.tree.map(lambda a, i=i: a[i], drops)
      x = block(**block_fields, name=f"block_{i}")(x, layer_drop, bias)
    return x
  scanned = nn.scan(lambda module, carry, layer_drop, bias: (module(carry, layer_drop, bias), None),
                    variable_axes={"params": 0}, split_rngs={"params": True}, length=depth,
                    in_axes=(0, nn.broadcast),
                    metadata_params={nn.PARTITION_NAME: LAYERS_AXIS},
                    # The one broadcast input, a shared bias, is made outside the loop: no check needed.
                    check_constancy_invariants=False)
  x, _ = scanned(block(**block_fields, name=STACKED_BLOCKS), x, drops, bias)
  return x


class VisionTransformer(nn.Module):
  """ViT encoder returning ``(features, aux)`` (the contract of every sslx encoder, `sslx.models`).

  ``aux`` holds ``pooled`` (= features), ``patch_tokens`` ``(B, L', D)`` and ``cls_token`` ``(B, D)``,
  all after the final LayerNorm. ``features`` is the class token (``pooling='cls'``) or the mean patch
  token (``'mean'``). With ``use_mask_token`` the encoder owns a learned ``mask_token`` that replaces the
  patch embeddings a boolean ``mask`` marks (SimMIM, BEiT). BEiT's ``layer_scale`` (`Block`) and
  ``rel_pos_bias`` (`sslx.models.relative_position.encoder_bias`) come with ``pos_embed='none'`` in its
  pretraining. ``scan_blocks``, ``remat`` and ``attention`` change how the blocks are compiled
  (`run_blocks`, `Attention`), not what they compute.

  Any image size that the patch size divides is encoded: ``pos_embed='sincos'`` computes the table of its
  grid; a ``'learned'`` table, created for the init images' grid, is resized bicubically to it
  (`sslx.models.pos_embed`). Crops of several sizes (DINO's global and local crops) are encoded as one call
  per size.
  """
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  pos_embed: str = "sincos"
  pooling: str = "cls"
  drop_path_rate: float = 0.0
  layer_norm_eps: float = 1e-6
  use_mask_token: bool = False
  layer_scale: Optional[float] = None
  rel_pos_bias: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  scan_blocks: bool = False
  remat: str = "none"
  attention: str = "xla"

  @nn.compact
  def __call__(self, images, *, train: bool, ids_keep: Optional[jax.Array] = None,
               mask: Optional[jax.Array] = None):
    """Encodes images.

    Args:
      images: ``(B, H, W, C)``, H and W divisible by the patch size.
      train: enables drop path (needs the ``'dropout'`` rng).
      ids_keep: optional ``(B, L_keep)`` indices of the patches to encode (row-major patch order); the
        others are dropped after the position embedding is added, as the MAE encoder does.
      mask: optional boolean ``(B, L)`` (True = masked): those patch embeddings become the learned
        ``mask_token`` before the position embedding is added (needs ``use_mask_token``).
    """
    if self.pooling not in POOLINGS:
      raise ValueError(f"Unknown pooling {self.pooling!r}; choose one of {POOLINGS}.")
    batch, height, width, _ = images.shape
    p = self.patch_size
    if height % p or width % p:
      raise ValueError(f"Image size {height}x{width} is not divisible by patch size {p}.")
    grid = (height // p, width // p)
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=partitioned(_patch_init, (None, None, None, "embed")),
                bias_init=partitioned(nn.initializers.zeros, ("embed",)), name="patch_embed")(images)
    x = jnp.reshape(x, (batch, grid[0] * grid[1], self.width))

    if self.use_mask_token:
      # Created at init even when no mask is passed, so every run of this config has the same parameters.
      mask_token = self.param("mask_token", partitioned(token_init, (None, None, "embed")),
                              (1, 1, self.width), self.param_dtype)
      if mask is not None:
        x = jnp.where(mask[..., None], mask_token.astype(self.dtype), x)
    elif mask is not None:
      raise ValueError("A mask was passed to a ViT without a mask token; set config.model.mask_token=True.")

    if self.pos_embed == "sincos":
      pos = jnp.asarray(pos_embed_lib.sincos_pos_embed_2d(self.width, grid))
    elif self.pos_embed == "learned":
      # The table keeps the shape of the grid it was created for (at init); other grids get it resized.
      shape = (x.shape[1], self.width)
      if self.has_variable("params", "pos_embed"):
        shape = jnp.shape(nn.unbox(self.get_variable("params", "pos_embed")))
      pos = self.param("pos_embed", partitioned(token_init, (None, "embed")), shape, self.param_dtype)
      pos = pos_embed_lib.resize_pos_table(pos, grid)
    elif self.pos_embed == "none":
      pos = jnp.zeros((), self.dtype)
    else:
      raise ValueError(f"Unknown pos_embed {self.pos_embed!r}; choose one of {POS_EMBEDS}.")
    x = x + pos.astype(self.dtype)
    if ids_keep is not None:
      if self.rel_pos_bias != "none":
        raise ValueError("ids_keep drops tokens, and a relative position bias is laid out for all of them")
      x = jnp.take_along_axis(x, ids_keep[..., None], axis=1)

    # The class token's sincos row is zero, so the token needs no position term of its own.
    cls = self.param("cls_token", partitioned(token_init, (None, None, "embed")), (1, 1, self.width),
                     self.param_dtype)
    cls = jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, self.width))
    x = jnp.concatenate([cls, x], axis=1)

    drops = None
    if train and self.drop_path_rate > 0:
      drops = drop_path_inputs(self.make_rng("dropout"), self.drop_path_rate, self.depth)
    bias, block_grid = relative_position.encoder_bias(self.rel_pos_bias, self.num_heads, grid,
                                                      self.param_dtype)
    x = run_blocks(x, drops, bias, depth=self.depth, scan=self.scan_blocks, remat=self.remat,
                   num_heads=self.num_heads, mlp_dim=self.mlp_dim, layer_norm_eps=self.layer_norm_eps,
                   dtype=self.dtype, param_dtype=self.param_dtype, attention=self.attention,
                   layer_scale=self.layer_scale, rel_pos_grid=block_grid)
    x = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, "norm")(x)

    cls_token, patch_tokens = x[:, 0], x[:, 1:]
    features = cls_token if self.pooling == "cls" else jnp.mean(patch_tokens, axis=1)
    return features, dict(pooled=features, patch_tokens=patch_tokens, cls_token=cls_token)


POOLINGS = ("cls", "mean")
POS_EMBEDS = ("sincos", "learned", "none")


def default_config(variant: str = "B/16") -> ml_collections.ConfigDict:
  """``config.model`` of a ViT: the variant and the keys that refine it (None: from the variant)."""
  return ml_collections.ConfigDict(dict(
      name="vit",
      variant=variant,
      width=placeholder(int),
      depth=placeholder(int),
      num_heads=placeholder(int),
      mlp_dim=placeholder(int),
      pos_embed="sincos",           # 'sincos' (fixed) | 'learned' | 'none' (BEiT, beside rel_pos_bias)
      pooling=placeholder(str),     # aux['pooled']: 'cls' token | 'mean' of the patch tokens; None: 'cls'
      drop_path_rate=0.0,
      layer_norm_eps=1e-6,
      mask_token=False,             # a learned mask token for methods that mask inside the encoder
      layer_scale=placeholder(float),  # per-channel gammas on both branches of a block, initialised to this
      rel_pos_bias="none",          # BEiT's relative position bias: 'none' | 'shared' | 'per_block'
      dtype="auto",                 # 'auto': bfloat16 on accelerators, float32 on CPU
      # How the blocks compile (the MAE decoder's too), not what they compute:
      scan_blocks=False,            # one nn.scan over stacked block parameters ('blocks'): compiles once
      remat="none",                 # per block: 'none' | 'matmuls' (keep matmul outputs) | 'full'
      attention="auto",             # 'auto' (cuDNN flash where it can run, else XLA) | 'xla' | 'cudnn'
  ))


def validate_config(model_config, image_size: int) -> None:
  """Raises a ValueError naming the first bad ``config.model`` key; cheap, before anything compiles."""
  try:
    patch = parse_variant(model_config.variant)["patch_size"]
  except ValueError as error:
    raise ValueError(f"config.model.variant: {error}") from None
  if image_size % patch:
    raise ValueError(f"config.data.image_size={image_size} is not divisible by the patch size {patch} of "
                     f"config.model.variant={model_config.variant!r}")
  if (model_config.get("pooling") or "cls") not in POOLINGS:
    raise ValueError(f"config.model.pooling={model_config.pooling!r} is not one of {POOLINGS}")
  if model_config.get("pos_embed", "sincos") not in POS_EMBEDS:
    raise ValueError(f"config.model.pos_embed={model_config.pos_embed!r} is not one of {POS_EMBEDS}")
  config_lib.check_number(model_config.get("layer_scale"), "model.layer_scale", lambda v: v > 0, "> 0",
                          none_means="no layer scale")
  if model_config.get("rel_pos_bias", "none") not in relative_position.MODES:
    raise ValueError(f"config.model.rel_pos_bias={model_config.rel_pos_bias!r} is not one of "
                     f"{relative_position.MODES}")
  config_lib.check_number(model_config.get("drop_path_rate", 0.0), "model.drop_path_rate",
                          lambda v: 0.0 <= v < 1.0, "in [0, 1)")
  config_lib.check_number(model_config.get("layer_norm_eps", 1e-6), "model.layer_norm_eps", lambda v: v > 0,
                          "> 0")
  config_lib.check_bool(model_config.get("mask_token", False), "model.mask_token")
  for key in ("width", "depth", "num_heads", "mlp_dim"):
    config_lib.check_int(model_config.get(key), f"model.{key}", none_means="from config.model.variant")
  dims = _dims(model_config)
  if dims["width"] % dims["num_heads"]:
    raise ValueError(f"config.model.width={dims['width']} is not divisible by config.model.num_heads="
                     f"{dims['num_heads']}")
  if model_config.get("pos_embed", "sincos") == "sincos" and dims["width"] % 4:
    raise ValueError(f"config.model.width={dims['width']} must be divisible by 4 for sin-cos position "
                     "embeddings")
  check_dtype(model_config)
  check_compilation_keys(model_config)


def check_compilation_keys(model_config) -> None:
  """Raises a ValueError naming ``config.model.scan_blocks``, ``.remat`` or ``.attention`` if it is bad."""
  config_lib.check_bool(model_config.get("scan_blocks", False), "model.scan_blocks")
  if model_config.get("remat", "none") not in REMATS:
    raise ValueError(f"config.model.remat={model_config.remat!r} is not one of {REMATS}")
  if model_config.get("attention", "auto") not in attention_lib.ATTENTIONS:
    raise ValueError(f"config.model.attention={model_config.attention!r} is not one of "
                     f"{attention_lib.ATTENTIONS}")
  if model_config.get("attention", "auto") == "cudnn":
    attention_implementation(model_config)  # raises where cuDNN cannot run, before anything compiles


def check_dtype(model_config) -> None:
  """Raises a ValueError naming ``config.model.dtype`` unless `resolve_dtype` knows it."""
  dtype = model_config.get("dtype", "auto")
  if dtype != "auto" and not (isinstance(dtype, str) and dtype in _DTYPES):
    raise ValueError(f"config.model.dtype={dtype!r} is not one of {[*_DTYPES, 'auto']}")


def _dims(model_config) -> dict:
  dims = parse_variant(model_config.variant)
  for key in ("width", "depth", "num_heads", "mlp_dim"):
    if model_config.get(key) is not None:
      dims[key] = int(model_config.get(key))
  return dims


def attention_implementation(model_config) -> str:
  """``'cudnn'`` or ``'xla'``: what the encoder's attention runs on this machine (``config.model.attention``).

  Decided from the compute dtype and head dimension, once, when the model is built (`sslx.models.attention`).
  """
  dims = _dims(model_config)
  if model_config.get("rel_pos_bias", "none") != "none":
    # cuDNN trains with a bias on even token counts only (`sslx.models.relative_position`).
    if model_config.get("attention", "auto") == "cudnn":
      raise ValueError(f"config.model.attention='cudnn' cannot add config.model.rel_pos_bias="
                       f"{model_config.rel_pos_bias!r} to its logits; use 'auto' or 'xla'")
    return "xla"
  return attention_lib.resolve(model_config.get("attention", "auto"),
                               resolve_dtype(model_config.get("dtype", "auto")), dims["width"] // dims["num_heads"])


def from_config(model_config) -> VisionTransformer:
  """Builds the encoder described by ``config.model`` (see `default_config`); parameters are float32."""
  return VisionTransformer(
      **_dims(model_config),
      pos_embed=model_config.get("pos_embed", "sincos"),
      pooling=model_config.get("pooling") or "cls",
      drop_path_rate=float(model_config.get("drop_path_rate", 0.0)),
      layer_norm_eps=float(model_config.get("layer_norm_eps", 1e-6)),
      use_mask_token=bool(model_config.get("mask_token", False)),
      layer_scale=None if model_config.get("layer_scale") is None else float(model_config.layer_scale),
      rel_pos_bias=model_config.get("rel_pos_bias", "none"),
      dtype=resolve_dtype(model_config.get("dtype", "auto")),
      param_dtype=jnp.float32,
      scan_blocks=bool(model_config.get("scan_blocks", False)),
      remat=model_config.get("remat", "none"),
      attention=attention_implementation(model_config))
