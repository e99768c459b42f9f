"""DINO's projection head (Caron et al. 2021, facebookresearch/dino ``DINOHead``): an MLP to a bottleneck,
L2-normalised, then a weight-normalised linear layer onto ``K`` prototypes.

  h = GELU(x W_0 + b_0),  h = GELU(h W_i + b_i) (i < n - 1),  z = h W_{n-1} + b_{n-1}     (n = num_layers)
  z <- z / max(||z||, 1e-12)
  logits_k = z . w_k,   w_k = g_k v_k / ||v_k||                                (weight norm, per prototype k)

Defaults as DINO's: ``in -> 2048 -> 2048 -> 256`` (``num_layers=3``; 1 is a single ``in -> 256`` layer), exact
(erf) GELU, ``K = 65536``. ``batch_norm`` (DINO's ``use_bn``, off by default) puts a BatchNorm
(`sslx.models.resnet.BatchNorm`, global batch statistics as DINO's SyncBatchNorm) after every hidden
layer, before its GELU; the dense layers keep their biases either way, as DINO's do. Kernels start from
DINO's truncated normal: std 0.02 cut at +-2 (absolute bounds, as timm's ``trunc_normal_`` takes them, so at
100 std: in effect a normal), biases from 0. The prototypes ``v_k`` start as torch's ``nn.Linear`` default
(uniform in +-1/sqrt(bottleneck)), since DINO creates them after initialising the MLP.

``norm_last_layer=True`` fixes every ``g_k = 1`` (no parameter: each logit is a cosine); ``False`` makes ``g``
a trainable ``(K,)`` parameter starting at 1. Parameters: ``layer_{i}`` (``kernel``, ``bias``), ``bn_{i}`` with
``batch_norm``, and ``last_layer`` (``kernel`` = ``V`` of shape ``(bottleneck, K)``, ``scale`` = ``g``). DINO
freezes the whole last layer for its first epoch: ``config.optimizer.freeze_epochs = ((LAST_LAYER_PATTERN,
1),)``, with `LAST_LAYER_PATTERN` = ``(.*/)?last_layer/.*`` matching ``<scope>/last_layer/kernel`` and
``.../scale`` wherever the head sits.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from sslx import config as config_lib
from sslx.models import resnet
from sslx.models import vit

Dtype = Any

LAST_LAYER = "last_layer"
LAST_LAYER_PATTERN = r"(.*/)?last_layer/.*"  # for config.optimizer.freeze_epochs / frozen
KERNEL_AXES = ("embed", "mlp")
KERNEL_STD = 0.02
KERNEL_BOUND = 2.0  # absolute, as DINO's trunc_normal_(std=0.02) bounds
NORMALIZE_EPS = 1e-12  # torch's F.normalize


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """``x / max(||x||, 1e-12)`` along ``axis``, in float32."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), NORMALIZE_EPS)


# flax's bounds are in units of the std.
_kernel_init = nn.initializers.truncated_normal(KERNEL_STD, lower=-KERNEL_BOUND / KERNEL_STD,
                                                upper=KERNEL_BOUND / KERNEL_STD)


def _torch_linear_kernel_init(key, shape, dtype=jnp.float32):
  """torch's ``nn.Linear`` weight: uniform in +-1/sqrt(fan_in), ``fan_in = shape[0]`` for a flax kernel."""
  bound = shape[0] ** -0.5
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class WeightNormDense(nn.Module):
  """``x W`` without bias, ``W[:, k] = g_k V[:, k] / ||V[:, k]||``; ``g`` a ``scale`` parameter (init 1) only
  when ``trainable_scale``, else 1. The normalisation is in float32, the product in ``dtype``."""
  features: int
  trainable_scale: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    direction = self.param("kernel", vit.partitioned(_torch_linear_kernel_init, KERNEL_AXES),
                           (x.shape[-1], self.features), self.param_dtype)
    weight = l2_normalize(direction, axis=0)
    if self.trainable_scale:
      scale = self.param("scale", vit.partitioned(nn.initializers.ones, KERNEL_AXES[1:]), (self.features,),
                         self.param_dtype)
      weight = weight * scale.astype(jnp.float32)
    return jnp.dot(x.astype(self.dtype), weight.astype(self.dtype))


class DINOHead(nn.Module):
  """DINO's head (module docstring): ``(B, D_in)`` features to ``(B, out_dim)`` prototype logits.

  Attributes:
    out_dim: ``K``, the number of prototypes.
    hidden_dim: width of the hidden layers.
    bottleneck_dim: width of the L2-normalised bottleneck ``z``.
    num_layers: dense layers of the MLP (the last one outputs ``z``).
    batch_norm: BatchNorm after every hidden dense layer.
    norm_last_layer: fix the prototypes' norms ``g`` at 1 instead of training them.
    bn_groups: ghost BatchNorm groups in training (`sslx.models.resnet.BatchNorm`).
  """
  out_dim: int = 65536
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  num_layers: int = 3
  batch_norm: bool = False
  norm_last_layer: bool = True
  bn_groups: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features, *, train: bool):
    x = features.astype(self.dtype)
    for i in range(self.num_layers - 1):
      x = self._dense(self.hidden_dim, f"layer_{i}")(x)
      if self.batch_norm:
        x = resnet.BatchNorm(groups=self.bn_groups, dtype=self.dtype, param_dtype=self.param_dtype,
                             name=f"bn_{i}")(x, train=train)
      x = nn.gelu(x, approximate=False)
    z = self._dense(self.bottleneck_dim, f"layer_{self.num_layers - 1}")(x)
    return WeightNormDense(self.out_dim, not self.norm_last_layer, self.dtype, self.param_dtype,
                           name=LAST_LAYER)(l2_normalize(z))

  def _dense(self, width: int, name: str) -> nn.Dense:
    return nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=vit.partitioned(_kernel_init, KERNEL_AXES),
                    bias_init=vit.partitioned(nn.initializers.zeros, KERNEL_AXES[1:]), name=name)


def dino_head_config(*, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                     num_layers: int = 3, batch_norm: bool = False,
                     norm_last_layer: bool = True) -> ml_collections.ConfigDict:
  """A DINO ``head`` config section (`DINOHead`'s attributes; defaults as DINO's ViT recipes)."""
  return ml_collections.ConfigDict(dict(
      out_dim=out_dim, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim, num_layers=num_layers,
      batch_norm=batch_norm, norm_last_layer=norm_last_layer))


def validate_dino_head_config(head, key: str = "method.head") -> None:
  """Raises a ValueError naming the first bad key of the DINO head section found at ``config.<key>``."""
  for name in ("out_dim", "hidden_dim", "bottleneck_dim", "num_layers"):
    config_lib.check_int(head.get(name), f"{key}.{name}")
  for name in ("batch_norm", "norm_last_layer"):
    config_lib.check_bool(head.get(name), f"{key}.{name}")


def from_config(head, dtype: Dtype = jnp.float32, bn_groups: int = 1) -> DINOHead:
  """The head a ``head`` section (`dino_head_config`) describes, computing in ``dtype``; params float32."""
  return DINOHead(out_dim=int(head.out_dim), hidden_dim=int(head.hidden_dim),
                  bottleneck_dim=int(head.bottleneck_dim), num_layers=int(head.num_layers),
                  batch_norm=bool(head.batch_norm), norm_last_layer=bool(head.norm_last_layer),
                  bn_groups=bn_groups, dtype=dtype)
