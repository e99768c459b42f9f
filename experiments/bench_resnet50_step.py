r"""ResNet-50 training-step throughput: sslx (JAX) against torchvision (PyTorch eager), same device, same run.

One step is the forward pass of ResNet-50 plus a 1000-way linear classifier on a fixed synthetic batch,
softmax cross-entropy on random labels, the backward pass, and an SGD update (momentum 0.9, weight decay
1e-4), with BatchNorm in training mode on both sides; no input pipeline is timed. sslx runs one jitted
step with a donated state; torchvision runs eager (``--torch_compile`` for ``torch.compile``). After
``--warmup`` untimed steps (and, for JAX, a separate compilation), each of ``--steps`` steps is timed on
its own, waiting for the device (``jax.block_until_ready`` / ``torch.cuda.synchronize``); the table
reports the median. On CPU, torch gets as many threads as cores this process may use, which is what
XLA's CPU backend uses. On GPU (JAX picks it; torch takes cuda when available) ``--dtype=bfloat16``
computes in bfloat16 (torch through autocast) with float32 parameters on both sides.

  python experiments/bench_resnet50_step.py --batch_size=32 --steps=3 --warmup=1             # CPU check
  python experiments/bench_resnet50_step.py --batch_size=256 --dtype=bfloat16 --torch_channels_last \
      --out=resnet50_step.json                                                                 # GPU
"""
import datetime
import json
import os
import platform
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from absl import app, flags

from sslx import xla_options
from sslx.models import resnet

from step_timing import median_step_seconds
from torch_peers import torchvision_resnet50

_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Images per step.", lower_bound=1)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Image side in pixels.", lower_bound=32)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed training steps; the median is reported.", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps before timing (after JAX's compilation).",
                               lower_bound=0)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Compute dtype of both sides; parameters stay float32. bfloat16 is for GPUs.")
_PEER = flags.DEFINE_enum("peer", "torchvision", ["torchvision", "none"], "Peer implementation to time.")
_TORCH_COMPILE = flags.DEFINE_bool("torch_compile", False, "Wrap the torchvision model in torch.compile.")
_TORCH_CHANNELS_LAST = flags.DEFINE_bool("torch_channels_last", False,
                                         "torch.channels_last memory format (faster convolutions on GPU).")
_OUT = flags.DEFINE_string("out", None, "Write every number as one JSON object to this file.")

NUM_CLASSES = 1000
# A small rate keeps the loss on random labels finite over the timed steps; the values do not change the cost.
LEARNING_RATE, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 1e-4


class Classifier(nn.Module):
  """ResNet-50 and a linear classifier on its pooled features, as torchvision's ``resnet50`` is."""
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, images, *, train: bool):
    features, _ = resnet.ResNet(**resnet.VARIANTS["50"], dtype=self.dtype, name="encoder")(images, train=train)
    return nn.Dense(NUM_CLASSES, dtype=self.dtype, name="fc")(features)


def bench_sslx(dtype: str) -> dict:
  """Compiles and times sslx's jitted step; returns seconds per step, compile time and the last loss."""
  model = Classifier(jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
  tx = optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), optax.sgd(LEARNING_RATE, momentum=MOMENTUM))
  batch, size = _BATCH_SIZE.value, _IMAGE_SIZE.value
  images = jax.random.normal(jax.random.PRNGKey(1), (batch, size, size, 3))
  labels = jax.random.randint(jax.random.PRNGKey(2), (batch,), 0, NUM_CLASSES)

  def init(rng):
    variables = nn.unbox(model.init(rng, images[:1], train=False))
    return variables["params"], variables["batch_stats"], tx.init(variables["params"])

  def train_step(state, images, labels):
    params, batch_stats, opt_state = state

    def loss_fn(params):
      logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                    mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()
      return loss, updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

  state = xla_options.jit(init)(jax.random.PRNGKey(0))
  start = time.perf_counter()
  compiled = xla_options.jit(train_step, donate_argnums=(0,)).lower(state, images, labels).compile()
  compile_s = time.perf_counter() - start
  loss = None

  def run_step():
    nonlocal state, loss
    state, loss = compiled(state, images, labels)

  seconds = median_step_seconds(run_step, lambda: jax.block_until_ready(state), warmup=_WARMUP.value,
                                steps=_STEPS.value)
  return {"seconds_per_step": seconds, "compile_s": compile_s, "loss": float(loss),
          "device": jax.devices()[0].device_kind}


def bench_torchvision(dtype: str, threads: int) -> dict:
  """Times ``torchvision.models.resnet50`` with ``torch.optim.SGD``; returns seconds per step."""
  import torch  # pylint: disable=g-import-not-at-top  (the peer is optional)
  resnet50 = torchvision_resnet50()

  device = "cuda" if torch.cuda.is_available() else "cpu"
  if device == "cpu":
    torch.set_num_threads(threads)
  else:
    torch.backends.cudnn.benchmark = True
  memory_format = torch.channels_last if _TORCH_CHANNELS_LAST.value else torch.contiguous_format
  model = resnet50(weights=None).to(device, memory_format=memory_format).train()
  optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM,
                              weight_decay=WEIGHT_DECAY)
  step_model = torch.compile(model) if _TORCH_COMPILE.value else model
  generator = torch.Generator().manual_seed(1)
  batch, size = _BATCH_SIZE.value, _IMAGE_SIZE.value
  images = torch.randn(batch, 3, size, size, generator=generator).to(device, memory_format=memory_format)
  labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator).to(device)
  loss = None

  def run_step():
    nonlocal loss
    with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
      loss = torch.nn.functional.cross_entropy(step_model(images).float(), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

  sync = torch.cuda.synchronize if device == "cuda" else lambda: None
  # One extra untimed step stands in for JAX's separate compilation (and torch.compile's).
  run_step()
  seconds = median_step_seconds(run_step, sync, warmup=_WARMUP.value, steps=_STEPS.value)
  device_name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
  return {"seconds_per_step": seconds, "loss": loss.item(), "device": device_name, "torch": torch.__version__,
          "threads": torch.get_num_threads() if device == "cpu" else None}


def _cpu_threads() -> int:
  """Cores this process may run on: the size of XLA's CPU thread pool."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _summarise(result: dict) -> dict:
  seconds = result["seconds_per_step"]
  return dict(result, ms_per_step=1e3 * seconds, images_per_s=_BATCH_SIZE.value / seconds)


def main(argv):
  del argv
  dtype = _DTYPE.value
  print(f"ResNet-50 train step | batch {_BATCH_SIZE.value} | {_IMAGE_SIZE.value} px | {dtype} | "
        f"{jax.default_backend()} ({jax.devices()[0].device_kind}) | {_cpu_threads()} CPU threads | "
        f"median of {_STEPS.value} steps after {_WARMUP.value} warm-up", flush=True)
  results = {"sslx": _summarise(bench_sslx(dtype))}
  print(f"sslx train step compiled in {results['sslx']['compile_s']:.1f}s", flush=True)
  if _PEER.value == "torchvision":
    results["torchvision"] = _summarise(bench_torchvision(dtype, _cpu_threads()))

  print("\n| implementation | batch | image | dtype | device | ms/step | images/s | loss |\n"
        "|---|---|---|---|---|---|---|---|")
  for name, result in results.items():
    print(f"| {name} | {_BATCH_SIZE.value} | {_IMAGE_SIZE.value} | {dtype} | {result['device']} | "
          f"{result['ms_per_step']:.1f} | {result['images_per_s']:.1f} | {result['loss']:.4f} |")
  if "torchvision" in results:
    results["sslx_over_torchvision"] = results["sslx"]["images_per_s"] / results["torchvision"]["images_per_s"]
    print(f"\nsslx / torchvision throughput: {results['sslx_over_torchvision']:.2f}x")

  if _OUT.value:
    record = dict(date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                  batch_size=_BATCH_SIZE.value, image_size=_IMAGE_SIZE.value, dtype=dtype, steps=_STEPS.value,
                  warmup=_WARMUP.value, backend=jax.default_backend(), cpu_threads=_cpu_threads(),
                  load_average=os.getloadavg() if hasattr(os, "getloadavg") else None,
                  jax=jax.__version__, flax=flax.__version__, **results)
    with open(_OUT.value, "w", encoding="utf-8") as f:
      json.dump(record, f, indent=2)


if __name__ == "__main__":
  app.run(main)
