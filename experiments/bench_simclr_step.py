r"""SimCLR ResNet-50 training-step throughput: sslx against a PyTorch SimCLR step, same device, same run.

One step: both views of a fixed synthetic batch of ``N`` images through ResNet-50 and SimCLR v2's 3-layer
projection head as one batch of ``2N`` (BatchNorm in training mode), NT-Xent at temperature 0.1, the
backward pass and the optimizer update. sslx runs `configs/simclr_resnet50.py`'s recipe (LARS) through
``sslx.train.make_train_step``, jitted with a donated state. The peer is torchvision's ``resnet50`` with
the same head (bias-free linear + BatchNorm [+ ReLU] per layer) and lightly's ``NTXentLoss``, eager, with
``torch.optim.SGD`` (momentum 0.9): PyTorch has no LARS, whose per-layer trust ratios cost a few
elementwise passes over the parameters, far below a ResNet-50 step. No input pipeline is timed; ``images/s``
counts images, i.e. ``N`` per step (each seen in two views).

  python experiments/bench_simclr_step.py --batch_size=8 --image_size=64 --steps=2 --warmup=1    # CPU check
  python experiments/bench_simclr_step.py --batch_size=256 --dtype=bfloat16 --torch_channels_last  # GPU

torchvision is imported as in `bench_resnet50_step.py` (its compiled ops need not load) and lightly as in
``tests/lightly_peer.py`` (installed with ``--no-deps``).
"""
import datetime
import json
import os
import sys

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp

from sslx import optim
from sslx import recipes
from sslx import train
from sslx import xla_options
from sslx.methods import RunLength, build_method

from step_timing import median_step_seconds, time_sslx_step
from torch_peers import torchvision_resnet50

_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Images per step (each in two views).", lower_bound=2)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "View side in pixels.", lower_bound=32)
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps; the median is reported.", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps before timing (after JAX's compilation).",
                               lower_bound=0)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of both sides.")
_TORCH_CHANNELS_LAST = flags.DEFINE_bool("torch_channels_last", False, "torch.channels_last memory format.")
_OUT = flags.DEFINE_string("out", None, "Append every number as one JSON line to this file.")

IMAGENET_TRAIN_EXAMPLES = 1_281_167  # sets the length of the recipe's learning-rate schedule
TEMPERATURE = 0.1


def _config():
  config = recipes.simclr_imagenet(None)
  config.unlock()
  config.batch_size = _BATCH_SIZE.value
  config.data.image_size = _IMAGE_SIZE.value
  config.model.dtype = _DTYPE.value
  config.method.temperature = TEMPERATURE
  return config


def bench_sslx() -> dict:
  config = _config()
  steps_per_epoch, total_steps = train.schedule_length(config, IMAGENET_TRAIN_EXAMPLES)
  tx, schedules = optim.build_optimizer(config, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  method = build_method(config, RunLength(steps_per_epoch, total_steps))
  batch, size = config.batch_size, config.data.image_size
  state = xla_options.jit(lambda rng: nn.unbox(train.init_train_state(method, tx, rng, (size, size, 3))))(
      jax.random.PRNGKey(config.seed))
  views = jax.random.normal(jax.random.PRNGKey(1), (2, batch, size, size, 3))
  inputs = {"view_0": views[0], "view_1": views[1], "label": jnp.zeros((batch,), jnp.int32)}
  return time_sslx_step(method, tx, schedules, state, inputs, warmup=_WARMUP.value, steps=_STEPS.value)


def _lightly_ntxent_class():
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
  from lightly_peer import ntxent_loss_class  # pylint: disable=g-import-not-at-top
  return ntxent_loss_class()


def bench_torch() -> dict:
  import torch  # pylint: disable=g-import-not-at-top  (the peer is optional)
  from torch import nn as tnn  # pylint: disable=g-import-not-at-top

  device = "cuda" if torch.cuda.is_available() else "cpu"
  if device == "cpu":
    torch.set_num_threads(len(os.sched_getaffinity(0)))
  else:
    torch.backends.cudnn.benchmark = True
  head_config = _config().method.head
  encoder = torchvision_resnet50()(weights=None)
  encoder.fc = tnn.Identity()
  layers, width = [], 2048
  for i in range(head_config.num_layers):
    last = i == head_config.num_layers - 1
    out = head_config.out_dim if last else (head_config.hidden_dim or width)
    layers += [tnn.Linear(width, out, bias=False), tnn.BatchNorm1d(out)]
    layers += [] if last else [tnn.ReLU()]
    width = out
  memory_format = torch.channels_last if _TORCH_CHANNELS_LAST.value else torch.contiguous_format
  model = tnn.Sequential(encoder, *layers).to(device, memory_format=memory_format).train()
  criterion = _lightly_ntxent_class()(temperature=TEMPERATURE)
  optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-6)
  batch, size = _BATCH_SIZE.value, _IMAGE_SIZE.value
  views = torch.randn(2 * batch, 3, size, size, generator=torch.Generator().manual_seed(1))
  views = views.to(device, memory_format=memory_format)
  loss = None

  def run_step():
    nonlocal loss
    with torch.autocast(device, dtype=torch.bfloat16, enabled=_DTYPE.value == "bfloat16"):
      z1, z2 = model(views).float().chunk(2)
    loss = criterion(z1, z2)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

  sync = torch.cuda.synchronize if device == "cuda" else lambda: None
  run_step()  # stands in for JAX's separate compilation
  seconds = median_step_seconds(run_step, sync, warmup=_WARMUP.value, steps=_STEPS.value)
  return dict(seconds_per_step=seconds, loss=loss.item(), torch=torch.__version__,
              device=torch.cuda.get_device_name() if device == "cuda" else "cpu")


def main(argv):
  del argv
  print(f"SimCLR ResNet-50 step | batch {_BATCH_SIZE.value} (x2 views) | {_IMAGE_SIZE.value} px | "
        f"{_DTYPE.value} | {jax.default_backend()} | median of {_STEPS.value} steps", flush=True)
  results = {"sslx": bench_sslx()}
  print(f"sslx compiled in {results['sslx']['compile_s']:.1f}s", flush=True)
  results["torch"] = bench_torch()
  print("\n| implementation | batch | image | dtype | ms/step | images/s | loss |\n|---|---|---|---|---|---|---|")
  for name, result in results.items():
    result["images_per_s"] = _BATCH_SIZE.value / result["seconds_per_step"]
    print(f"| {name} | {_BATCH_SIZE.value} | {_IMAGE_SIZE.value} | {_DTYPE.value} | "
          f"{1e3 * result['seconds_per_step']:.0f} | {result['images_per_s']:.2f} | {result['loss']:.4f} |")
  ratio = results["sslx"]["images_per_s"] / results["torch"]["images_per_s"]
  print(f"\nsslx / torch throughput: {ratio:.2f}x")
  if _OUT.value:
    record = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  batch_size=_BATCH_SIZE.value, image_size=_IMAGE_SIZE.value, dtype=_DTYPE.value,
                  jax=jax.__version__, sslx_over_torch=ratio, **results)
    with open(_OUT.value, "a", encoding="utf-8") as f:
      f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
  app.run(main)
