"""ResNet-18/34/50/101/152 encoders (He et al., 2016), laid out and initialised as torchvision's.

Module names follow torchvision's so its checkpoints convert by renaming (`sslx.convert.torchvision_resnet`):
``stem_conv`` / ``stem_bn`` are ``conv1`` / ``bn1``; ``stage{i}_block{j}`` is ``layer{i}.{j}`` with the same
``conv1``, ``bn1``, ... inside and ``downsample_conv`` / ``downsample_bn`` for ``downsample.0`` / ``.1``.
Bottleneck blocks stride their 3x3 convolution ("ResNet v1.5"), as torchvision does.

Every parameter carries logical axis names (``nn.with_logical_partitioning``): convolution kernels
``(None, None, 'conv_in', 'conv_out')`` (HWIO) and BatchNorm scale and bias ``('conv_out',)``;
``sslx.parallel`` maps them onto the device mesh. BatchNorm's running averages live in the
``batch_stats`` collection: pass ``mutable=['batch_stats']`` with ``train=True``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from sslx import config as config_lib
from sslx.models import norm_ops
from sslx.models.vit import check_dtype, partitioned, resolve_dtype

Dtype = Any

CONV_AXES = (None, None, "conv_in", "conv_out")
CHANNEL_AXES = ("conv_out",)
STAGE_WIDTHS = (64, 128, 256, 512)  # the published widths: base width 64, doubled at every stage
BOTTLENECK_EXPANSION = 4

# Variant strings are the depths; blocks per stage as in the paper's Table 1, and ResNet-10 (one basic block
# per stage, as timm's resnet10t): the same code at half ResNet-18's compile time, for the :test configs.
VARIANTS = {
    "10": {"stage_sizes": (1, 1, 1, 1), "bottleneck": False},
    "18": {"stage_sizes": (2, 2, 2, 2), "bottleneck": False},
    "34": {"stage_sizes": (3, 4, 6, 3), "bottleneck": False},
    "50": {"stage_sizes": (3, 4, 6, 3), "bottleneck": True},
    "101": {"stage_sizes": (3, 4, 23, 3), "bottleneck": True},
    "152": {"stage_sizes": (3, 8, 36, 3), "bottleneck": True},
}

# torchvision's kaiming_normal_(mode='fan_out', nonlinearity='relu'): N(0, 2 / (k_h k_w C_out)), untruncated.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(features: int, kernel: int, stride: int, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Conv:
  """Bias-free ``kernel x kernel`` convolution padded by ``kernel // 2`` on each side, as torchvision's.

  Explicit padding matters: 'SAME' would pad stride-2 convolutions of even-sized inputs asymmetrically.
  """
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                 use_bias=False, dtype=dtype, param_dtype=param_dtype,
                 kernel_init=partitioned(conv_init, CONV_AXES), name=name)


class BatchNorm(nn.Module):
  """BatchNorm over the batch and spatial axes with PyTorch's semantics.

  With ``train=True`` it normalises with the batch statistics over the ``n = B H W`` values per channel,

    y = scale * (x - mu_B) / sqrt(var_B + eps) + bias,   var_B = mean((x - mu_B)^2)   (biased),

  and updates the running averages (``batch_stats``) as ``torch.nn.BatchNorm2d`` with torch momentum
  ``1 - momentum``:

    mean <- momentum * mean + (1 - momentum) * mu_B
    var  <- momentum * var  + (1 - momentum) * var_B * n / (n - 1)        (unbiased, unlike flax's)

  With ``train=False`` it normalises with the running averages. Statistics are float32 whatever the
  compute dtype. Under ``jax.jit`` with the batch sharded over devices the means are over the global
  batch (XLA inserts the all-reduce), so no axis name is needed. ``use_bias=False`` drops ``bias`` (Keras'
  ``center=False``, as the last layer of SimCLR's projection head); ``use_scale=False`` drops ``scale`` too
  (torch's ``affine=False``, as the last layer of MoCo v3's heads).

  ``groups > 1`` is ghost BatchNorm: in training, each of ``groups`` consecutive equal slices of the batch is
  normalised with its own statistics (``n`` then counts one slice's values), and the running averages move
  towards the mean over the slices of their statistics, which is the mean of the slices' own updates.
  MoCo uses it to keep a query and its positive key from sharing statistics (`sslx.methods.moco`).
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  zero_scale: bool = False
  use_bias: bool = True
  use_scale: bool = True
  groups: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    channels = x.shape[-1]
    scale_init = nn.initializers.zeros if self.zero_scale else nn.initializers.ones
    scale = jnp.ones((channels,), self.param_dtype)
    if self.use_scale:
      scale = self.param("scale", partitioned(scale_init, CHANNEL_AXES), (channels,), self.param_dtype)
    bias = jnp.zeros((channels,), self.param_dtype)
    if self.use_bias:
      bias = self.param("bias", partitioned(nn.initializers.zeros, CHANNEL_AXES), (channels,),
                        self.param_dtype)
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)

    x32 = x.astype(jnp.float32)
    scale32, bias32 = scale.astype(jnp.float32), bias.astype(jnp.float32)
    if not train:
      # One multiply-add per element: scale and shift folded per channel.
      multiplier = scale32 * jax.lax.rsqrt(running_var.value + self.epsilon)
      return (x32 * multiplier + (bias32 - running_mean.value * multiplier)).astype(self.dtype)
    if x.shape[0] % self.groups:
      raise ValueError(f"a batch of {x.shape[0]} rows cannot be split into {self.groups} BatchNorm groups")
    # One slice per group rather than a (groups, B / groups, ...) reshape of the batch axis: with the batch
    # sharded over 8 CPU devices, XLA got the gradients of that reshape wrong (conv kernels 2% off).
    size = x.shape[0] // self.groups
    outputs = [norm_ops.batch_norm_train(x32[g * size:(g + 1) * size], scale32, bias32, self.epsilon)
               for g in range(self.groups)]
    if not self.is_initializing():
      n = x.size // (channels * self.groups)
      mean, var = (sum(values) / self.groups for values in zip(*(moments for _, *moments in outputs), strict=True))
      running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
      running_var.value = (self.momentum * running_var.value
                           + (1 - self.momentum) * var * (n / max(n - 1, 1)))
    return jnp.concatenate([y for y, *_ in outputs]).astype(self.dtype)


def _batch_norm(module: nn.Module, name: str, zero_scale: bool = False) -> BatchNorm:
  return BatchNorm(zero_scale=zero_scale, groups=module.bn_groups, dtype=module.dtype,
                   param_dtype=module.param_dtype, name=name)


def _shortcut(module: nn.Module, x, features: int, stride: int, train: bool):
  """Identity, or a strided 1x1 projection + BN where the block changes resolution or width."""
  if stride == 1 and x.shape[-1] == features:
    return x
  x = conv(features, 1, stride, module.dtype, module.param_dtype, "downsample_conv")(x)
  return _batch_norm(module, "downsample_bn")(x, train=train)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""
  features: int
  stride: int = 1
  zero_init_last_bn: bool = False
  bn_groups: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    y = conv(self.features, 3, self.stride, self.dtype, self.param_dtype, "conv1")(x)
    y = nn.relu(_batch_norm(self, "bn1")(y, train=train))
    y = conv(self.features, 3, 1, self.dtype, self.param_dtype, "conv2")(y)
    y = _batch_norm(self, "bn2", self.zero_init_last_bn)(y, train=train)
    return nn.relu(y + _shortcut(self, x, self.features, self.stride, train))


class Bottleneck(nn.Module):
  """1x1 reduce, strided 3x3, 1x1 expand to ``4 * features``, plus the shortcut."""
  features: int
  stride: int = 1
  zero_init_last_bn: bool = False
  bn_groups: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    out_features = BOTTLENECK_EXPANSION * self.features
    y = conv(self.features, 1, 1, self.dtype, self.param_dtype, "conv1")(x)
    y = nn.relu(_batch_norm(self, "bn1")(y, train=train))
    y = conv(self.features, 3, self.stride, self.dtype, self.param_dtype, "conv2")(y)
    y = nn.relu(_batch_norm(self, "bn2")(y, train=train))
    y = conv(out_features, 1, 1, self.dtype, self.param_dtype, "conv3")(y)
    y = _batch_norm(self, "bn3", self.zero_init_last_bn)(y, train=train)
    return nn.relu(y + _shortcut(self, x, out_features, self.stride, train))


class ResNet(nn.Module):
  """ResNet encoder returning ``(features, aux)`` (the contract of every sslx encoder, `sslx.models`).

  ``features`` is the ``(B, D)`` global average of the last feature map (D = 512 for basic blocks, 2048
  for bottlenecks), in float32 whatever the compute dtype; ``aux = {'pooled': features, 'feature_map': ...}``,
  the last feature map ``(B, h, w, D)`` (float32) that ``features`` averages, for dense per-position uses
  (video colourisation's embeddings).

  Attributes:
    stage_sizes: blocks in each of the four stages.
    bottleneck: bottleneck blocks (ResNet-50 and deeper) instead of basic ones.
    small_images: the stem for 28-32 px inputs: one 3x3 stride-1 convolution and no max-pool, instead of
      a 7x7 stride-2 convolution and a 3x3 stride-2 max-pool (which shrink the input 4x).
    zero_init_last_bn: start the last BN scale of every residual branch at zero, so each block starts as
      the identity (Goyal et al., 2017; torchvision's ``zero_init_residual``).
    width: channels of the stem and the first stage (64 as published); stage ``i`` has ``width * 2^(i-1)``.
    bn_groups: ghost BatchNorm groups of every BatchNorm in training (see `BatchNorm`); 1: the whole batch.
  """
  stage_sizes: Sequence[int]
  bottleneck: bool
  width: int = STAGE_WIDTHS[0]
  small_images: bool = False
  zero_init_last_bn: bool = False
  bn_groups: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool):
    """Encodes ``(B, H, W, C)`` images; ``train=True`` normalises with batch statistics and updates them."""
    x = images.astype(self.dtype)
    stem_kernel, stem_stride = (3, 1) if self.small_images else (7, 2)
    x = conv(self.width, stem_kernel, stem_stride, self.dtype, self.param_dtype, "stem_conv")(x)
    x = nn.relu(_batch_norm(self, "stem_bn")(x, train=train))
    if not self.small_images:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    block = Bottleneck if self.bottleneck else BasicBlock
    widths = [self.width * 2 ** i for i in range(len(self.stage_sizes))]
    for i, (num_blocks, width) in enumerate(zip(self.stage_sizes, widths, strict=True), start=1):
      for j in range(num_blocks):
        # Every stage but the first halves the resolution in its first block.
        stride = 2 if i > 1 and j == 0 else 1
        x = block(width, stride, self.zero_init_last_bn, self.bn_groups, self.dtype, self.param_dtype,
                  name=f"stage{i}_block{j}")(x, train=train)

    feature_map = x.astype(jnp.float32)
    features = jnp.mean(feature_map, axis=(1, 2))
    return features, {"pooled": features, "feature_map": feature_map}


POOLINGS = ("mean",)


def default_config(variant: str = "50") -> ml_collections.ConfigDict:
  """``config.model`` of a ResNet; ``variant`` is the depth as a string: '18', '34', '50', '101', '152'."""
  return ml_collections.ConfigDict({
      "name": "resnet",
      "variant": variant,
      "width": STAGE_WIDTHS[0],     # channels of the stem and stage 1 (64 as published; smaller for tests)
      "small_images": False,        # 3x3 stride-1 stem, no max-pool: for 28-32 px inputs
      "zero_init_last_bn": False,   # residual branches start at zero (Goyal et al.)
      "bn_groups": 1,               # ghost BatchNorm in training: statistics per consecutive 1/G of the batch
      "pooling": "mean",            # global average of the last feature map: aux['pooled']; None: 'mean'
      "dtype": "auto",              # 'auto': bfloat16 on accelerators, float32 on CPU
  })


def _variant(model_config) -> dict:
  variant = model_config.get("variant")
  if variant not in VARIANTS:
    raise ValueError(f"config.model.variant={variant!r} is not one of {tuple(VARIANTS)} (ResNet depths)")
  return VARIANTS[variant]


def validate_config(model_config, image_size: int) -> None:
  """Raises a ValueError naming the first bad ``config.model`` key."""
  _variant(model_config)
  for key in ("small_images", "zero_init_last_bn"):
    config_lib.check_bool(model_config.get(key, False), f"model.{key}")
  config_lib.check_int(model_config.get("width", STAGE_WIDTHS[0]), "model.width")
  config_lib.check_int(model_config.get("bn_groups", 1), "model.bn_groups")
  if (model_config.get("pooling") or "mean") not in POOLINGS:
    raise ValueError(f"config.model.pooling={model_config.pooling!r} is not one of {POOLINGS}: a ResNet "
                     "has no class token")
  if image_size < 1:
    raise ValueError(f"config.data.image_size={image_size} must be positive")
  check_dtype(model_config)


def feature_dim(model_config) -> int:
  """Width ``D`` of the pooled features: 512 for ResNet-18/34, 2048 for ResNet-50 and deeper."""
  bottleneck = _variant(model_config)["bottleneck"]
  width = int(model_config.get("width", STAGE_WIDTHS[0])) * 2 ** (len(STAGE_WIDTHS) - 1)
  return width * (BOTTLENECK_EXPANSION if bottleneck else 1)


def from_config(model_config) -> ResNet:
  """Builds the encoder described by ``config.model`` (see `default_config`); parameters are float32."""
  return ResNet(
      **_variant(model_config),
      width=int(model_config.get("width", STAGE_WIDTHS[0])),
      small_images=bool(model_config.get("small_images", False)),
      zero_init_last_bn=bool(model_config.get("zero_init_last_bn", False)),
      bn_groups=int(model_config.get("bn_groups", 1)),
      dtype=resolve_dtype(model_config.get("dtype", "auto")),
      param_dtype=jnp.float32)
