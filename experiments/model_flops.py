"""Analytic model FLOPs of training steps, and the peak FLOP/s of known devices, for MFU.

Shared by the throughput benchmarks (``bench_throughput.py``, ``bench_mae_throughput.py``); it defines no
flags, so any script or test can import it. A matmul ``(a x b)(b x c)`` counts ``2abc`` FLOPs; a training
step counts 3 x the forward matmuls (the backward pass is twice the forward); norms, softmax, GELU, the loss
and the optimizer update are left out, so XLA's own count (``cost_analysis()['flops']``) is a little higher.
"""
from __future__ import annotations

from typing import Callable, Optional

from sslx import masking
from sslx.models import vit

# Dense bf16 peak FLOP/s by a substring of ``jax.Device.device_kind``; the first match wins, so the more
# specific names come first ('TPU v5 lite' is v5e, plain 'TPU v5' is v5p).
PEAK_BF16_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12),
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12),
    ("TPU v5", 459e12), ("TPU v6 lite", 918e12), ("TPU v6e", 918e12),
)


def peak_flops(device_kind: str, dtype: str, override_tflops: Optional[float] = None) -> Optional[float]:
  """Peak FLOP/s: ``override_tflops`` if given, else the bf16 table when computing in bf16, else None.

  The table holds bf16 peaks only: a float32 step on a GPU runs at another (TF32 or FP32) peak, so its MFU
  needs ``override_tflops``; so does any device the table does not know (CPUs among them).
  """
  if override_tflops is not None:
    return override_tflops * 1e12
  if dtype != "bfloat16":
    return None
  return next((peak for name, peak in PEAK_BF16_FLOPS if name in device_kind), None)


def _block_flops(tokens: int, width: int, mlp_dim: int) -> int:
  """Forward matmul FLOPs of one transformer block: qkv, out-projection, MLP, QK^T and AV."""
  return 2 * tokens * (4 * width * width + 2 * width * mlp_dim) + 2 * 2 * tokens * tokens * width


def _patches(config) -> tuple[vit.VisionTransformer, int, int]:
  """(encoder, number of patches L, pixels per patch P) of a ViT config."""
  encoder = vit.from_config(config.model)
  num_patches = (config.data.image_size // encoder.patch_size) ** 2
  return encoder, num_patches, encoder.patch_size ** 2 * config.data.channels


def vit_forward_flops(config) -> Optional[int]:
  """Forward matmul FLOPs of the ViT encoder on one whole image (every patch and the cls token):

    2 L P D + N * block(L + 1, D, M)        patch embedding, then the blocks

  None for an encoder that is not a ViT.
  """
  if config.model.get("name", "vit") != "vit":
    return None
  encoder, num_patches, patch_dim = _patches(config)
  return (2 * num_patches * patch_dim * encoder.width
          + encoder.depth * _block_flops(num_patches + 1, encoder.width, encoder.mlp_dim))


def mae_train_flops_per_image(config) -> int:
  """Model FLOPs of one MAE training step per image: 3 x forward matmul FLOPs (backward = 2 x forward).

  With L patches of P = p*p*C pixels, K = int(L * (1 - mask_ratio)) visible patches, encoder width D,
  depth N_e, MLP width M_e, decoder width d, depth N_d, MLP width m:

    forward = 2 L P D                                  patch embedding, on every patch
            + N_e * block(K + 1, D, M_e)               encoder on the visible patches and the cls token
            + 2 (K + 1) D d                            decoder embedding
            + N_d * block(L + 1, d, m)                 decoder on every patch and the cls token
            + 2 (L + 1) d P                            pixel prediction
    block(T, D, M) = 2 T (4 D^2 + 2 D M) + 4 T^2 D     qkv + out-projection + MLP, QK^T + AV
  """
  encoder, num_patches, patch_dim = _patches(config)
  decoder = config.method.decoder
  visible = masking.num_kept(num_patches, config.method.mask_ratio) + 1
  decoded = num_patches + 1
  forward = (2 * num_patches * patch_dim * encoder.width
             + encoder.depth * _block_flops(visible, encoder.width, encoder.mlp_dim)
             + 2 * visible * encoder.width * decoder.width
             + decoder.depth * _block_flops(decoded, decoder.width, decoder.mlp_dim)
             + 2 * decoded * decoder.width * patch_dim)
  return 3 * forward


def finetune_train_flops_per_image(config) -> Optional[int]:
  """Model FLOPs of one fine-tuning step per image: 3 x (`vit_forward_flops` + 2 D C), the encoder on
  every patch and the linear head to C classes (mixup, drop path and ``fc_norm`` add no matmuls).

  None for an encoder that is not a ViT (the caller falls back to XLA's count).
  """
  encoder_forward = vit_forward_flops(config)
  if encoder_forward is None:
    return None
  width = vit.from_config(config.model).width
  return 3 * (encoder_forward + 2 * width * int(config.method.num_classes))


# config.method.name -> train-step FLOPs per image (or None where the formula does not cover the encoder).
# A method without an entry is measured with XLA's count.
TRAIN_FLOPS_PER_IMAGE: dict[str, Callable[..., Optional[int]]] = {
    "mae": mae_train_flops_per_image,
    "finetune": finetune_train_flops_per_image,
}


def train_flops_per_image(config) -> Optional[int]:
  """The method's analytic training-step FLOPs per image, or None where there is no formula."""
  formula = TRAIN_FLOPS_PER_IMAGE.get(config.method.name)
  return formula(config) if formula is not None else None


def online_probe_rows(batch_size: int, probe_batch_size: int) -> int:
  """Rows of a batch of ``batch_size`` the online probe trains on (every ``stride``-th, at most
  ``probe_batch_size``; `sslx.monitors.OnlineProbe.update`)."""
  stride = max(batch_size // probe_batch_size, 1)
  return min(probe_batch_size, len(range(0, batch_size, stride)))


def online_probe_flops(config, batch_size: int) -> Optional[int]:
  """Forward matmul FLOPs of the online probe's features in one step of ``batch_size`` images: the
  encoder on its rows, without gradients (the linear probe itself is left out). None: not a ViT."""
  encoder_forward = vit_forward_flops(config)
  if encoder_forward is None:
    return None
  probe_batch = min(config.monitor.probe_batch_size, batch_size)
  return online_probe_rows(batch_size, probe_batch) * encoder_forward
