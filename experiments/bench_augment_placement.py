r"""Where augmentation should run: all in the data workers, or crops there and the rest batched in JAX.

For each view spec below it times, on ``--num_images`` synthetic ImageNet-size photos (sides uniform
in [300, 500] px, decoded arrays; JPEG decoding is timed once separately, as it costs the same
either way):

  host    the whole spec per image in numpy/PIL (``transforms.build_augmentation``), then the
          per-batch normalize of ``views.ToModelInput``: what ``config.data.augment_on='host'`` runs;
  split   the host part of ``device_augment.split_spec`` (crop, flip) per image, then the device
          part as one jitted ``device_augment.apply_ops`` on a uint8 batch of ``--batch_sizes``
          (``device_put`` included, after a warm-up call, ``block_until_ready``):
          ``augment_on='device'``;

and then every op on its own, per image, on both sides (host ops on 224 px crops at the spec's
probability; device ops each jitted alone on a batch, normalize included as the uint8 -> float32
step every device chain ends with).

Times are process CPU seconds (``time.process_time``: all threads, XLA's and BLAS's included), the
currency that matters when the data workers and the model share the cores; wall seconds are in the
JSON. Images/s per core = 1 / CPU seconds per image, an image being one source photo with all its
views (SimCLR: 2; DINO: 2 global + 6 local) plus one decode. Each number is the best of
``--repeats`` passes. On a CPU-only machine the "device" is the same cores, so this compares the
CPU work of the two placements; on an accelerator, run it there to time the device part on it:

  python experiments/bench_augment_placement.py                                        # CPU
  python experiments/bench_augment_placement.py --batch_sizes=256,1024 --json_out=bench_aug.jsonl
"""
import datetime
import io
import json
import os
import platform
import time
from typing import Callable

from absl import app
from absl import flags
import jax
import numpy as np
from PIL import Image

from sslx.data import device_augment
from sslx.data import transforms

_NUM_IMAGES = flags.DEFINE_integer("num_images", 32, "Synthetic source photos.", lower_bound=1)
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["128", "256"], "Device batch sizes to time.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed passes per number; the best is kept.",
                                lower_bound=1)
_METHODS = flags.DEFINE_list("methods", ["simclr", "dino"], "Methods whose views to time.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Append one JSON line with every number here.")

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
_DINO_JITTER = "color_jitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, p=0.8)|grayscale(p=0.2)"
SPECS = {
    "simclr": ("random_resized_crop(224, scale=(0.08, 1))|hflip|color_jitter(1.0, p=0.8)|"
               "grayscale(p=0.2)|blur(p=0.5)"),
    "dino_global_1": f"random_resized_crop(224, scale=(0.4, 1))|hflip|{_DINO_JITTER}|blur(p=1.0)",
    "dino_global_2": (f"random_resized_crop(224, scale=(0.4, 1))|hflip|{_DINO_JITTER}|blur(p=0.1)|"
                      "solarize(p=0.2)"),
    "dino_local": f"random_resized_crop(96, scale=(0.05, 0.4))|hflip|{_DINO_JITTER}|blur(p=0.5)",
}
# Views per source image, by spec.
METHODS = {
    "simclr": {"simclr": 2},
    "dino": {"dino_global_1": 1, "dino_global_2": 1, "dino_local": 6},
}


def photo_like(rng: np.random.Generator) -> np.ndarray:
  """A uint8 RGB image of 300-500 px sides: a smooth random colour field plus noise."""
  height, width = (int(side) for side in rng.integers(300, 501, size=2))
  coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
  smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), np.float32)
  return np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)


def best_of(repeats: int, run: Callable[[], object]) -> tuple[float, float]:
  """(CPU seconds, wall seconds) of the fastest of ``repeats`` calls of ``run``."""
  times = []
  for _ in range(repeats):
    cpu, wall = time.process_time(), time.perf_counter()
    run()
    times.append((time.process_time() - cpu, time.perf_counter() - wall))
  return min(times)


def per_image_on_host(augment, images, repeats: int) -> tuple[float, float]:
  """CPU and wall seconds per image of ``augment(image, rng)``."""
  def run():
    for i, image in enumerate(images):
      augment(image, np.random.default_rng(i))
  cpu, wall = best_of(repeats, run)
  return cpu / len(images), wall / len(images)


def per_image_on_device(ops, crops: np.ndarray, repeats: int) -> tuple[float, float]:
  """CPU and wall seconds per image of the jitted ops on the uint8 batch ``crops``."""
  augment = jax.jit(lambda batch, key: device_augment.apply_ops(ops, batch, key))
  key = jax.random.key(0)
  augment(jax.device_put(crops), key).block_until_ready()  # compiles
  cpu, wall = best_of(repeats, lambda: augment(jax.device_put(crops), key).block_until_ready())
  return cpu / len(crops), wall / len(crops)


def batch_of(augment, images, batch_size: int) -> np.ndarray:
  """``batch_size`` outputs of ``augment``, cycling over ``images``."""
  return np.stack([augment(images[i % len(images)], np.random.default_rng(i))
                   for i in range(batch_size)])


def time_spec(name: str, images, batch_sizes, repeats: int) -> dict:
  """The host and split costs of one view spec, and of each of its ops, per image (CPU seconds)."""
  spec = SPECS[name]
  host_spec, device_spec = device_augment.split_spec(spec)
  host = transforms.build_augmentation(spec, mean=MEAN, std=STD)
  geometric = transforms.build_augmentation(host_spec)
  crops = batch_of(geometric, images, max(batch_sizes))
  normalize_cpu, _ = best_of(repeats, lambda: transforms.normalize(crops, MEAN, STD))
  normalize_cpu /= len(crops)
  result = dict(spec=spec, host_spec=host_spec, device_spec=device_spec)
  result["host"] = per_image_on_host(host, images, repeats)[0] + normalize_cpu
  result["host_geometric"] = per_image_on_host(geometric, images, repeats)[0]
  ops = device_augment.build_device_ops(device_spec, mean=MEAN, std=STD)
  result["device"] = {size: per_image_on_device(ops, crops[:size], repeats)
                      for size in batch_sizes}
  result["ops"] = {"normalize": dict(host=normalize_cpu, device=per_image_on_device(
      ops[-1:], crops, repeats)[0])}
  # The flip stays on the host (split_spec), but it has a device version: time both.
  flips = [call.text for call in transforms.parse_ops(host_spec) if call.name == "hflip"]
  for text in flips + [call.text for call in transforms.parse_ops(device_spec)]:
    host_op = transforms.build_augmentation(text)
    device_op = device_augment.build_device_ops(text, mean=MEAN, std=STD)[0]
    result["ops"][text] = dict(host=per_image_on_host(host_op, list(crops[:64]), repeats)[0],
                               device=per_image_on_device((device_op,), crops, repeats)[0])
  return result


def decode_seconds(images, repeats: int) -> float:
  """CPU seconds to decode one of ``images`` from a quality-90 JPEG."""
  files = []
  for image in images:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    files.append(buffer.getvalue())
  cpu, _ = best_of(repeats, lambda: [np.asarray(Image.open(io.BytesIO(f)).convert("RGB"))
                                     for f in files])
  return cpu / len(files)


def main(argv):
  del argv
  for method in _METHODS.value:
    if method not in METHODS:
      raise app.UsageError(f"--methods: {method!r} is not one of {sorted(METHODS)}")
  batch_sizes = [int(size) for size in _BATCH_SIZES.value]
  rng = np.random.default_rng(0)
  images = [photo_like(rng) for _ in range(_NUM_IMAGES.value)]
  repeats = _REPEATS.value
  decode = decode_seconds(images, repeats)
  print(f"{jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} CPU cores, "
        f"load average {os.getloadavg()[0]:.1f}; {len(images)} photos; JPEG decode "
        f"{decode * 1e3:.2f} ms CPU per image", flush=True)
  names = sorted({name for method in _METHODS.value for name in METHODS[method]})
  specs = {}
  for name in names:
    specs[name] = result = time_spec(name, images, batch_sizes, repeats)
    device = ", ".join(f"{cpu * 1e3:.2f} CPU / {wall * 1e3:.2f} wall (batch {size})"
                       for size, (cpu, wall) in result["device"].items())
    print(f"\n{name}: {result['spec']}\n  ms per view: host {result['host'] * 1e3:.2f} CPU | host "
          f"geometric {result['host_geometric'] * 1e3:.2f} CPU + device {device}")
    for op, cost in result["ops"].items():
      print(f"    {op:<82} host {cost['host'] * 1e3:6.2f}  device {cost['device'] * 1e3:6.2f}")
  print(f"\n{'method':<8} {'placement':<18} {'CPU ms/image':>12} {'images/s/core':>14} "
        f"{'device wall ms/image':>20}")
  methods = {}
  for method in _METHODS.value:
    views = METHODS[method]
    rows = {"host": (decode + sum(n * specs[name]["host"] for name, n in views.items()), None)}
    for size in batch_sizes:
      cpu = decode + sum(n * (specs[name]["host_geometric"] + specs[name]["device"][size][0])
                         for name, n in views.items())
      rows[f"device (batch {size})"] = (cpu, sum(n * specs[name]["device"][size][1]
                                                 for name, n in views.items()))
    for placement, (cpu, wall) in rows.items():
      wall_text = "-" if wall is None else f"{wall * 1e3:.2f}"
      print(f"{method:<8} {placement:<18} {cpu * 1e3:>12.2f} {1 / cpu:>14.1f} {wall_text:>20}")
    methods[method] = rows
  if _JSON_OUT.value:
    record = dict(benchmark="augment_placement", date=datetime.datetime.now().isoformat(),
                  host=platform.node(), backend=jax.default_backend(),
                  device=jax.devices()[0].device_kind, cpu_count=os.cpu_count(),
                  load_average=os.getloadavg()[0], num_images=len(images), repeats=repeats,
                  decode_cpu_s=decode, specs=specs, methods_cpu_s_per_image=methods)
    with open(_JSON_OUT.value, "a") as f:
      f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
  app.run(main)
