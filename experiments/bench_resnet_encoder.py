r"""Forward + backward of the contrastive Fashion-MNIST encoder (ResNet-18, small-image stem, width 32) in
training mode, sslx beside PyTorch, in interleaved rounds on one machine.

  python experiments/bench_resnet_encoder.py [--batch=512] [--rounds=3]

Rows (the loss is the mean square of the pooled features; gradients of every parameter):
  sslx                         as `sslx.train` compiles it: `sslx.xla_options`, `sslx.models.norm_ops`
  sslx, XLA's CPU defaults     YNNPACK convolutions (what `sslx.xla_options` turns off)
  sslx, composed BatchNorm     BatchNorm written as its formula and differentiated by JAX
  sslx, no BatchNorm           convolutions and ReLUs only: what the convolutions cost
  torch, NCHW / channels-last  the same network in PyTorch eager (BatchNorm2d), as lightly's peer runs it
Each row prints the median over rounds of its median step time in ms, as one JSON line.
"""
from __future__ import annotations

import json
import statistics

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import step_timing
from sslx import xla_options
from sslx.models import resnet

_BATCH = flags.DEFINE_integer("batch", 512, "Images per step (SimCLR's 256 pairs: 512).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved rounds over the rows.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps per row and round.")
WIDTH, SIZE = 32, 28


class ComposedBatchNorm(resnet.BatchNorm):
  """`resnet.BatchNorm` in training mode as the plain formula (JAX differentiates it); groups of 1."""

  @nn.compact
  def __call__(self, x, *, train: bool):
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
    self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
    self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
    mean = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
    return (x - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias


class Identity(resnet.BatchNorm):
  """No normalisation at all."""

  @nn.compact
  def __call__(self, x, *, train: bool):
    return x


def _sslx_step(compiler_options, batch_norm=None):
  """A zero-argument call running one forward + backward, and its sync."""
  original = resnet.BatchNorm
  if batch_norm is not None:
    resnet.BatchNorm = batch_norm  # the blocks look it up when traced, below
  try:
    model = resnet.ResNet(stage_sizes=(2, 2, 2, 2), bottleneck=False, small_images=True, width=WIDTH)
    images = jnp.asarray(np.random.default_rng(0).random((_BATCH.value, SIZE, SIZE, 1)), jnp.float32)
    variables = model.init(jax.random.PRNGKey(0), images[:2], train=False)
    params, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}

    def loss(params, state, images):
      (features, _), new_state = model.apply({"params": params, **state}, images, train=True,
                                             mutable=["batch_stats"])
      return jnp.mean(jnp.square(features)), new_state

    step = jax.jit(jax.grad(loss, has_aux=True), compiler_options=compiler_options)
    jax.block_until_ready(step(params, state, images))
  finally:
    resnet.BatchNorm = original
  holder = {}
  return lambda: holder.update(out=step(params, state, images)), lambda: jax.block_until_ready(holder["out"])


def _torch_step(channels_last: bool):
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn as tnn  # pylint: disable=g-import-not-at-top

  class Block(tnn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1, self.bn1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False), tnn.BatchNorm2d(cout)
      self.conv2, self.bn2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False), tnn.BatchNorm2d(cout)
      self.shortcut = tnn.Sequential()
      if stride != 1 or cin != cout:
        self.shortcut = tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride, bias=False), tnn.BatchNorm2d(cout))

    def forward(self, x):
      y = torch.relu(self.bn1(self.conv1(x)))
      return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))

  layers, cin = [tnn.Conv2d(1, WIDTH, 3, 1, 1, bias=False), tnn.BatchNorm2d(WIDTH), tnn.ReLU()], WIDTH
  for i, cout in enumerate(WIDTH * 2 ** i for i in range(4)):
    layers += [Block(cin, cout, 1 if i == 0 else 2), Block(cout, cout, 1)]
    cin = cout
  net = tnn.Sequential(*layers, tnn.AdaptiveAvgPool2d(1), tnn.Flatten())
  images = torch.rand(_BATCH.value, 1, SIZE, SIZE)
  if channels_last:
    net, images = net.to(memory_format=torch.channels_last), images.to(memory_format=torch.channels_last)

  def run():
    net.zero_grad()
    net(images).square().mean().backward()
  run()
  return run, lambda: None


def main(argv):
  del argv
  cpu_options = xla_options.compiler_options()
  rows = {
      "sslx": lambda: _sslx_step(cpu_options),
      "sslx, XLA's CPU defaults": lambda: _sslx_step(None),
      "sslx, composed BatchNorm": lambda: _sslx_step(cpu_options, ComposedBatchNorm),
      "sslx, no BatchNorm": lambda: _sslx_step(cpu_options, Identity),
      "torch, NCHW": lambda: _torch_step(False),
      "torch, channels-last": lambda: _torch_step(True),
  }
  steps = {name: build() for name, build in rows.items()}
  times = {name: [] for name in rows}
  for _ in range(_ROUNDS.value):
    for name, (run, sync) in steps.items():
      times[name].append(step_timing.median_step_seconds(run, sync, warmup=1, steps=_STEPS.value))
  for name, values in times.items():
    print(json.dumps({"row": name, "batch": _BATCH.value, "ms": round(1e3 * statistics.median(values)),
                      "rounds_ms": [round(1e3 * v) for v in values], "backend": jax.default_backend()}))


if __name__ == "__main__":
  app.run(main)
