"""The XLA options sslx compiles its training, evaluation and feature programs with.

On CPU, XLA hands each convolution to YNNPACK by default (``xla_cpu_experimental_ynn_fusion_type`` lists
individual convolutions beside individual dots). YNNPACK's convolutions, and above all their kernel
gradients, ran 2.5-3x slower than XLA's own (Eigen) ones on this project's 2-core x86 CPU: forward, input
gradient and kernel gradient of a 3x3 convolution over 512 28x28x32 maps took 131 / 121 / 335 ms with
YNNPACK and 47 / 54 / 114 ms without, and forward + backward of a half-width ResNet-18 went from 5.7 s to
4.0 s (``experiments/bench_resnet_encoder.py``). So on CPU sslx keeps YNNPACK for dots only. Matrix
products, which is all a ViT runs, are unchanged.

An ``XLA_FLAGS`` that names the option wins: set ``--xla_cpu_experimental_ynn_fusion_type=...`` there to
choose for yourself.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

YNN_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
CPU_OPTIONS = {YNN_FUSION_OPTION: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


@functools.cache
def _cpu_accepts(options: tuple[tuple[str, str], ...]) -> bool:
  """Whether this jaxlib knows the options (older XLA versions reject an unknown one when compiling)."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(jnp.zeros(())).compile()
  except jax.errors.JaxRuntimeError:
    return False
  return True


def compiler_options() -> Optional[dict[str, str]]:
  """The options for programs on the default backend: `CPU_OPTIONS` on CPU, else None (XLA's defaults).

  Asks which backend runs, so call it when a program is built, never at import.
  """
  if jax.default_backend() != "cpu" or YNN_FUSION_OPTION in os.environ.get("XLA_FLAGS", ""):
    return None
  return CPU_OPTIONS if _cpu_accepts(tuple(CPU_OPTIONS.items())) else None


def jit(fun: Callable[..., Any], **jit_kwargs) -> Callable[..., Any]:
  """``jax.jit(fun, **jit_kwargs)`` compiled with `compiler_options`."""
  return jax.jit(fun, compiler_options=compiler_options(), **jit_kwargs)
