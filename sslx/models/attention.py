"""Which implementation ``jax.nn.dot_product_attention`` runs: cuDNN flash attention or XLA's.

The choice is made once, when a model is built from its config, and stays fixed for the run: XLA's
implementation is always available; cuDNN's (``implementation='cudnn'``) only on an NVIDIA GPU for
float16 / bfloat16 inputs whose head dimension it supports, and it raises at compile time otherwise, so it
is only picked where these conditions (those ``jax._src.cudnn.fused_attention_stablehlo`` checks) hold:

- the backend is CUDA (``jax.default_backend() == 'gpu'`` and a CUDA platform version);
- the device has compute capability >= 8.0 (Ampere; cuDNN's flash kernels need it);
- the compute dtype is float16 or bfloat16 (cuDNN rejects float32 inputs);
- the head dimension is a multiple of 8 and at most 128, or 256 from compute capability 9.0 (Hopper).

`self_attention` runs the chosen one on a fused ``(B, T, 3, N, H)`` projection.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

ATTENTIONS = ("auto", "xla", "cudnn")
_CUDNN_DTYPES = (jnp.float16, jnp.bfloat16)


def _capability(version: Optional[str]) -> tuple[int, ...]:
  return tuple(int(part) for part in version.split(".")) if version else ()


def cudnn_unsupported_reason(platform: str, dtype: Any, head_dim: int,
                             compute_capability: Optional[str]) -> Optional[str]:
  """Why cuDNN flash attention cannot run here, or None when it can (pure: no device is queried).

  Args:
    platform: ``'cuda'`` for an NVIDIA GPU backend; anything else (``'cpu'``, ``'tpu'``, ``'rocm'``) rules
      cuDNN out.
    dtype: the compute dtype of queries, keys and values.
    head_dim: width of one attention head.
    compute_capability: the device's, e.g. ``'9.0'``; None where unknown.
  """
  if platform != "cuda":
    return f"the backend is {platform!r}, not an NVIDIA GPU"
  capability = _capability(compute_capability)
  if capability < (8, 0):
    return f"compute capability {compute_capability} is below 8.0"
  if jnp.dtype(dtype) not in [jnp.dtype(d) for d in _CUDNN_DTYPES]:
    return f"the compute dtype is {jnp.dtype(dtype).name}, not float16 or bfloat16"
  largest = 256 if capability >= (9, 0) else 128
  if head_dim % 8 or head_dim > largest:
    return f"the head dimension {head_dim} is not a multiple of 8 up to {largest}"
  return None


def select_attention(requested: str, *, platform: str, dtype: Any, head_dim: int,
                     compute_capability: Optional[str]) -> str:
  """``'cudnn'`` or ``'xla'``: ``requested`` (``config.model.attention``) resolved on the given platform.

  ``'auto'`` takes cuDNN wherever `cudnn_unsupported_reason` finds nothing against it; ``'cudnn'`` where it
  cannot run is a ValueError naming the key and the reason.
  """
  if requested not in ATTENTIONS:
    raise ValueError(f"config.model.attention={requested!r} is not one of {ATTENTIONS}")
  if requested == "xla":
    return "xla"
  reason = cudnn_unsupported_reason(platform, dtype, head_dim, compute_capability)
  if reason is None:
    return "cudnn"
  if requested == "cudnn":
    raise ValueError(f"config.model.attention='cudnn' cannot run here: {reason}; use 'auto' or 'xla'")
  return "xla"


def local_platform() -> tuple[str, Optional[str]]:
  """``(platform, compute capability)`` of this process's first device, as `select_attention` reads them."""
  backend = jax.default_backend()
  if backend == "gpu":
    device = jax.local_devices()[0]
    kind = "cuda" if "cuda" in device.client.platform_version.lower() else "rocm"
    return kind, getattr(device, "compute_capability", None)
  return backend, None


def resolve(requested: str, dtype: Any, head_dim: int) -> str:
  """`select_attention` on this machine's first device."""
  platform, capability = local_platform()
  return select_attention(requested, platform=platform, dtype=dtype, head_dim=head_dim,
                          compute_capability=capability)


def self_attention(qkv, implementation: str):
  """``softmax(q k^T / sqrt(H)) v`` of every head: ``qkv`` ``(B, T, 3, N, H)`` -> ``(B, T, N, H)``.

  ``'cudnn'`` is ``jax.nn.dot_product_attention``'s fused kernel on the token-major layout it takes as is.
  ``'xla'`` moves the heads ahead of the tokens first, once for q, k and v together: XLA then runs the two
  batched matmuls and their gradients on contiguous ``(T, H)`` tiles: on CPU 1.1x faster than
  ``jax.nn.dot_product_attention(implementation='xla')``, which transposes inside every einsum and its
  backward pass, at 13-50 tokens and 1.6x at 197 (docs/benchmarks.md). Logits and softmax are float32, as in that function.
  """
  if implementation == "cudnn":
    return jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], implementation="cudnn")
  if implementation != "xla":
    raise ValueError(f"Unknown attention implementation {implementation!r}; choose 'xla' or 'cudnn'.")
  query, key, value = jnp.transpose(qkv, (2, 0, 3, 1, 4))
  query = query * np.asarray(qkv.shape[-1] ** -0.5, qkv.dtype)
  logits = jnp.einsum("bnth,bnsh->bnts", query, key, preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
  return jnp.transpose(jnp.einsum("bnts,bnsh->bnth", probs, value), (0, 2, 1, 3))
