"""Projection heads: the MLPs between an encoder's pooled features and a contrastive loss.

One module, `ProjectionHead`, built from a ``head`` config section (`head_config`); the published heads are
presets of it:

- SimCLR v2 (Chen et al. 2020b; google-research/simclr ``tf2/model.py``): 3 layers, hidden width = the
  encoder's (2048 for ResNet-50), 128 out. Every layer is a bias-free dense layer followed by BatchNorm;
  the hidden layers' BN has a bias (beta) and a ReLU after it, the last layer's BN has no bias and no ReLU.
  Kernels start from N(0, 0.01^2).
- SimCLR v1 (Chen et al. 2020a): the same with 2 layers.
- MoCo v2 (Chen et al. 2020c): 2 layers, 2048 hidden, 128 out, dense layers with biases, ReLU between, no
  BatchNorm; torch's ``nn.Linear`` initialisation (kernel and bias uniform in +-1/sqrt(fan_in)).
- BYOL (Grill et al. 2020; deepmind-research ``byol/utils/networks.py``), projector and predictor alike:
  dense 4096 -> BatchNorm (scale and bias) -> ReLU -> dense 256 without bias, no BatchNorm on the output
  (``last_batch_norm=False``). The reference's hidden dense layer has a bias, which the BatchNorm after it
  cancels (its gradient is zero), so it is left out. Kernels: torch's +-1/sqrt(fan_in) uniform, the fan-in
  scale of Haiku's default truncated normal; BatchNorm after the first layer and the cosine loss after the
  last make the loss blind to either kernel's scale.
- MoCo v3 (Chen, Xie & He 2021; facebookresearch/moco-v3 ``moco/builder.py``): bias-free dense layers, each
  followed by BatchNorm, ReLU between; the hidden layers' BN has scale and bias, the last one neither
  (torch's ``affine=False``: ``last_batch_norm_scale=False``), or there is no last BN (ResNet's predictor).
  4096 hidden, 256 out; torch's ``nn.Linear`` kernels (`mocov3_head`).

BatchNorm is `sslx.models.resnet.BatchNorm`: under ``jax.jit`` with the batch sharded over devices its
statistics are over the global batch, which SimCLR needs (per-device statistics let the positive pair leak
through them). Its running averages live in ``batch_stats`` beside the encoder's.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from sslx import config as config_lib
from sslx import models
from sslx.models import resnet
from sslx.models import vit

Dtype = Any

KERNEL_AXES = ("embed", "mlp")
SIMCLR_KERNEL_STD = 0.01


def head_config(*, num_layers: int, out_dim: int = 128, hidden_dim: Optional[int] = None,
                batch_norm: bool, kernel_init_std: Optional[float],
                last_batch_norm: bool = True, last_batch_norm_scale: bool = True) -> ml_collections.ConfigDict:
  """A ``head`` config section.

  Args:
    num_layers: dense layers (1: linear projection).
    out_dim: width of the output (the contrastive embedding).
    hidden_dim: width of the hidden layers; None: the encoder's feature width (SimCLR's choice).
    batch_norm: BatchNorm after every dense layer (SimCLR) or none (MoCo).
    kernel_init_std: kernels from N(0, std^2); None: torch's ``nn.Linear`` default (MoCo).
    last_batch_norm: with ``batch_norm``, BatchNorm after the last layer too (SimCLR) or only after the
      hidden ones (BYOL).
    last_batch_norm_scale: whether that last BatchNorm has a scale (SimCLR) or neither scale nor bias (MoCo v3).
  """
  return ml_collections.ConfigDict(dict(
      num_layers=num_layers, hidden_dim=ml_collections.FieldReference(hidden_dim, field_type=int),
      out_dim=out_dim, batch_norm=batch_norm,
      kernel_init_std=ml_collections.FieldReference(kernel_init_std, field_type=float),
      last_batch_norm=last_batch_norm, last_batch_norm_scale=last_batch_norm_scale))


def simclr_v2_head() -> ml_collections.ConfigDict:
  return head_config(num_layers=3, batch_norm=True, kernel_init_std=SIMCLR_KERNEL_STD)


def simclr_v1_head() -> ml_collections.ConfigDict:
  return head_config(num_layers=2, batch_norm=True, kernel_init_std=SIMCLR_KERNEL_STD)


def mocov2_head() -> ml_collections.ConfigDict:
  return head_config(num_layers=2, hidden_dim=2048, batch_norm=False, kernel_init_std=None)


def byol_head(hidden_dim: int = 4096, out_dim: int = 256) -> ml_collections.ConfigDict:
  """BYOL's projector, and its predictor: hidden_dim -> BatchNorm -> ReLU -> out_dim."""
  return head_config(num_layers=2, hidden_dim=hidden_dim, out_dim=out_dim, batch_norm=True,
                     last_batch_norm=False, kernel_init_std=None)


def mocov3_head(num_layers: int, *, last_batch_norm: bool = True, hidden_dim: int = 4096,
                out_dim: int = 256) -> ml_collections.ConfigDict:
  """MoCo v3's projector or predictor: ``num_layers`` bias-free dense layers, BatchNorm after the hidden ones and,
  with ``last_batch_norm``, a last BatchNorm without scale or bias."""
  return head_config(num_layers=num_layers, hidden_dim=hidden_dim, out_dim=out_dim, batch_norm=True,
                     last_batch_norm=last_batch_norm, last_batch_norm_scale=False, kernel_init_std=None)


def validate_head_config(head, key: str = "method.head") -> None:
  """Raises a ValueError naming the first bad key of the head section found at ``config.<key>``."""
  config_lib.check_int(head.num_layers, f"{key}.num_layers")
  config_lib.check_int(head.out_dim, f"{key}.out_dim")
  config_lib.check_int(head.hidden_dim, f"{key}.hidden_dim", none_means="the encoder's feature width")
  config_lib.check_bool(head.batch_norm, f"{key}.batch_norm")
  config_lib.check_number(head.kernel_init_std, f"{key}.kernel_init_std", lambda v: v > 0, "> 0",
                          none_means="torch's nn.Linear initialisation")
  config_lib.check_bool(head.get("last_batch_norm", True), f"{key}.last_batch_norm")
  config_lib.check_bool(head.get("last_batch_norm_scale", True), f"{key}.last_batch_norm_scale")


def _torch_linear_bias_init(fan_in: int):
  """torch's ``nn.Linear`` bias: uniform in +-1/sqrt(fan_in)."""
  bound = 1.0 / fan_in ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class ProjectionHead(nn.Module):
  """``num_layers`` dense layers; BatchNorm after each when ``batch_norm`` (the last one's only with
  ``last_batch_norm``, with a scale only with ``last_batch_norm_scale``); ReLU after all but the last.

  Dense layers are ``layer_{i}``, their BatchNorms ``bn_{i}``. With BatchNorm the dense layers have no bias
  (BN's own bias replaces it) and the last BN has none either, so nothing shifts the output embedding.

  Attributes:
    out_dim: output width.
    num_layers: dense layers.
    hidden_dim: hidden width; None: the input's.
    batch_norm: BatchNorm after every dense layer.
    last_batch_norm: with ``batch_norm``, after the last one too.
    last_batch_norm_scale: that last BatchNorm has a scale (else no affine parameters at all).
    kernel_init_std: N(0, std^2) kernels and zero biases; None: torch's ``nn.Linear`` initialisation.
    bn_groups: ghost BatchNorm groups in training (`sslx.models.resnet.BatchNorm`), the encoder's.
  """
  out_dim: int
  num_layers: int
  hidden_dim: Optional[int] = None
  batch_norm: bool = True
  last_batch_norm: bool = True
  last_batch_norm_scale: bool = True
  kernel_init_std: Optional[float] = SIMCLR_KERNEL_STD
  bn_groups: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features, *, train: bool):
    """``(B, D_in)`` features to the ``(B, out_dim)`` projection (compute dtype)."""
    x = features.astype(self.dtype)
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      width = self.out_dim if last else self.hidden_dim or x.shape[-1]
      x = self._dense(width, x.shape[-1], f"layer_{i}")(x)
      if self.batch_norm and (self.last_batch_norm or not last):
        x = resnet.BatchNorm(use_bias=not last, use_scale=not last or self.last_batch_norm_scale,
                             groups=self.bn_groups, dtype=self.dtype,
                             param_dtype=self.param_dtype, name=f"bn_{i}")(x, train=train)
      if not last:
        x = nn.relu(x)
    return x

  def _dense(self, width: int, fan_in: int, name: str) -> nn.Dense:
    if self.kernel_init_std is None:
      # variance_scaling(1/3, fan_in, uniform) is uniform in +-sqrt(3 * (1/3) / fan_in) = +-1/sqrt(fan_in).
      kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
      bias_init = _torch_linear_bias_init(fan_in)
    else:
      kernel_init, bias_init = nn.initializers.normal(self.kernel_init_std), nn.initializers.zeros
    return nn.Dense(width, use_bias=not self.batch_norm, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=vit.partitioned(kernel_init, KERNEL_AXES),
                    bias_init=vit.partitioned(bias_init, (KERNEL_AXES[1],)), name=name)


def from_config(head, dtype: Dtype = jnp.float32, bn_groups: int = 1) -> ProjectionHead:
  """The head a ``head`` section (`head_config`) describes, computing in ``dtype``; params float32."""
  return ProjectionHead(
      out_dim=int(head.out_dim), num_layers=int(head.num_layers),
      hidden_dim=None if head.hidden_dim is None else int(head.hidden_dim), batch_norm=bool(head.batch_norm),
      last_batch_norm=bool(head.get("last_batch_norm", True)),  # absent from runs that predate it
      last_batch_norm_scale=bool(head.get("last_batch_norm_scale", True)),
      kernel_init_std=None if head.kernel_init_std is None else float(head.kernel_init_std),
      bn_groups=bn_groups, dtype=dtype)


class EncoderWithHead(nn.Module):
  """An encoder and a projection head: ``(projection, features)`` with ``features`` the encoder's pooled
  vector (SimCLR's h, what evaluation reads) and ``projection`` the head's output (z, what the loss reads).
  Variables: ``{'encoder': ..., 'head': ...}`` in every collection."""
  encoder: nn.Module
  head: ProjectionHead

  @nn.compact
  def __call__(self, images, *, train: bool):
    features, _ = self.encoder(images, train=train)
    return self.head(features, train=train), features


def check_bn_groups(config, rows: int, rows_are: str) -> None:
  """Raises a ValueError naming ``config.model.bn_groups`` unless it splits the ``rows`` of one encoder pass
  (``rows_are`` says which) into equal groups of 2 or more (one row has no variance to normalise by)."""
  groups = config.model.get("bn_groups", 1)
  if config_lib.is_int(groups) and groups >= 1 and (rows % groups or rows // groups < 2):
    raise ValueError(f"config.model.bn_groups={groups} must split the {rows} rows of each pass ({rows_are}) "
                     "into equal BatchNorm groups of 2 or more rows")


def encoder_with_head(config) -> EncoderWithHead:
  """The encoder of ``config.model`` under the head of ``config.method.head``; the head computes in the
  encoder's dtype and groups its BatchNorms as the encoder does (``config.model.bn_groups``)."""
  dtype = vit.resolve_dtype(config.model.get("dtype", "auto"))
  head = from_config(config.method.head, dtype, int(config.model.get("bn_groups", 1)))
  return EncoderWithHead(models.encoder_from_config(config.model), head)
