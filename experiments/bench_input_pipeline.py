r"""Input-pipeline throughput: images/s of sslx's training loader on a folder of JPEGs.

Writes (once; later runs reuse it) an image folder of ``--num_images`` JPEGs shaped like ImageNet's:
sides uniform in [300, 500] px, a smooth random colour field plus pixel noise at quality 90, so the
files weigh and decode about like photos (about 90 KB). Then, for each method's views and each
worker count, it builds ``sslx.data.pipeline.make_train_loader`` on that folder and times
``--num_batches`` batches after ``--warmup_batches`` (which also start the worker processes):

  mae     1 view:  random_resized_crop(224, scale=(0.2, 1)) | hflip
  simclr  2 views: random_resized_crop(224, scale=(0.08, 1)) | hflip | color_jitter(0.5, p=0.8)
                   | grayscale(p=0.2) | blur
  dino    2 global views at 224, scale (0.4, 1) + 6 local views at 96, scale (0.05, 0.4), with
          DINO's jitter / grayscale / blur / solarize per view

It prints images/s (an image = one source file, however many views it gives) and images/s per core,
counting one core for num_workers=0 (the main process decodes) and otherwise one per worker: the
main process only collects batches. The images are re-read every epoch from the page cache, so disk
speed is not measured.

  python experiments/bench_input_pipeline.py --num_images=200 --num_batches=30
  python experiments/bench_input_pipeline.py --num_workers=0,4,8,16 --json_out=bench_input.jsonl
"""
import datetime
import json
import os
import platform
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from sslx.data import pipeline

_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Folder for the generated JPEGs (default: a folder in the system temp dir "
    "named after --num_images); reused when it already holds them.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 200, "JPEGs to generate.", lower_bound=1)
_METHODS = flags.DEFINE_list("methods", ["mae", "simclr", "dino"], "Views to time, by method.")
_NUM_WORKERS = flags.DEFINE_list("num_workers", ["0", "1", "2"],
                                 "grain worker process counts to time (0 = decode in this process).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Images per batch.", lower_bound=1)
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 30, "Timed batches per setting.", lower_bound=1)
_WARMUP_BATCHES = flags.DEFINE_integer("warmup_batches", 3, "Untimed batches per setting.",
                                       lower_bound=1)
_JSON_OUT = flags.DEFINE_string("json_out", None, "Append one JSON line with every number here.")

NUM_CLASSES = 10
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _jitter(strength: str) -> str:
  return f"color_jitter({strength}, p=0.8)|grayscale(p=0.2)"


# DINO's per-view recipe: global view 1 always blurred, global view 2 rarely blurred but solarized
# sometimes, local views blurred half the time; jitter brightness 0.4, contrast 0.4, saturation
# 0.2, hue 0.1 everywhere.
_DINO_JITTER = "color_jitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, p=0.8)"
_DINO_GLOBAL = f"random_resized_crop(224, scale=(0.4, 1))|hflip|{_DINO_JITTER}|grayscale(p=0.2)"
_DINO_LOCAL = f"random_resized_crop(96, scale=(0.05, 0.4))|hflip|{_DINO_JITTER}|grayscale(p=0.2)"
VIEWS = {
    "mae": None,
    "simclr": (f"random_resized_crop(224, scale=(0.08, 1))|hflip|{_jitter(0.5)}|blur",) * 2,
    "dino": (f"{_DINO_GLOBAL}|blur(p=1.0)", f"{_DINO_GLOBAL}|blur(p=0.1)|solarize(p=0.2)")
            + (f"{_DINO_LOCAL}|blur(p=0.5)",) * 6,
}
MAE_AUGMENTATION = "random_resized_crop(224, scale=(0.2, 1))|hflip"


def _photo_like(rng: np.random.Generator) -> np.ndarray:
  """A uint8 RGB image: a bicubic-upsampled random colour grid (smooth gradients) plus noise."""
  height, width = rng.integers(300, 501, size=2)
  grid = int(rng.integers(3, 9))
  coarse = Image.fromarray(rng.integers(0, 256, (grid, grid, 3), dtype=np.uint8))
  smooth = np.asarray(coarse.resize((int(width), int(height)), Image.Resampling.BICUBIC),
                      np.float32)
  noise = rng.normal(0, rng.uniform(12, 36), smooth.shape).astype(np.float32)
  return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def make_image_folder(root: str, num_images: int) -> float:
  """Writes ``num_images`` JPEGs into ``root/<class>/`` unless done before; returns mean KB."""
  done = os.path.join(root, ".complete")
  if not os.path.exists(done):
    rng = np.random.default_rng(0)
    for i in range(num_images):
      directory = os.path.join(root, f"class_{i % NUM_CLASSES}")
      os.makedirs(directory, exist_ok=True)
      Image.fromarray(_photo_like(rng)).save(os.path.join(directory, f"{i:06d}.jpg"), quality=90)
    # Written last, so an interrupted generation is redone rather than reused half-made.
    with open(done, "w") as f:
      f.write(str(num_images))
  sizes = [entry.stat().st_size for directory in os.scandir(root) if directory.is_dir()
           for entry in os.scandir(directory.path)]
  if len(sizes) != num_images:
    raise ValueError(f"{root} holds {len(sizes)} images, not --num_images={num_images}; pass "
                     "another --data_dir")
  return float(np.mean(sizes)) / 1e3


def data_config(root: str, method: str, num_workers: int):
  return pipeline.default_data_config(
      source="folder", dataset="bench", data_dir=root, image_size=224, channels=3,
      mean=IMAGENET_MEAN, std=IMAGENET_STD, num_workers=num_workers,
      augmentation=MAE_AUGMENTATION if VIEWS[method] is None else None, views=VIEWS[method])


def time_loader(config, batch_size: int, num_batches: int, warmup_batches: int) -> float:
  """Seconds for ``num_batches`` batches, after ``warmup_batches`` untimed ones."""
  loader = pipeline.make_train_loader(config, global_batch_size=batch_size, seed=0)
  try:
    for _ in range(warmup_batches):
      next(loader)
    start = time.perf_counter()
    for _ in range(num_batches):
      next(loader)
    return time.perf_counter() - start
  finally:
    loader.close()


def main(argv):
  del argv
  for method in _METHODS.value:
    if method not in VIEWS:
      raise app.UsageError(f"--methods: {method!r} is not one of {sorted(VIEWS)}")
  worker_counts = [int(value) for value in _NUM_WORKERS.value]
  root = _DATA_DIR.value or os.path.join(tempfile.gettempdir(),
                                         f"sslx_bench_jpegs_{_NUM_IMAGES.value}")
  mean_kb = make_image_folder(root, _NUM_IMAGES.value)
  print(f"{_NUM_IMAGES.value} JPEGs in {root}, {mean_kb:.0f} KB on average; "
        f"{os.cpu_count()} CPU cores; batch {_BATCH_SIZE.value}, {_NUM_BATCHES.value} timed batches",
        flush=True)
  print(f"{'method':<8} {'views':>5} {'workers':>7} {'images/s':>9} {'per core':>9}")
  results = []
  for method in _METHODS.value:
    for num_workers in worker_counts:
      config = data_config(root, method, num_workers)
      seconds = time_loader(config, _BATCH_SIZE.value, _NUM_BATCHES.value,
                            _WARMUP_BATCHES.value)
      images_per_s = _BATCH_SIZE.value * _NUM_BATCHES.value / seconds
      per_core = images_per_s / max(num_workers, 1)
      num_views = len(VIEWS[method] or (None,))
      print(f"{method:<8} {num_views:>5} {num_workers:>7} {images_per_s:>9.1f} {per_core:>9.1f}",
            flush=True)
      results.append(dict(method=method, num_views=num_views, num_workers=num_workers,
                          images_per_s=images_per_s, images_per_s_per_core=per_core,
                          seconds=seconds))
  if _JSON_OUT.value:
    record = dict(benchmark="input_pipeline", date=datetime.datetime.now().isoformat(),
                  host=platform.node(), cpu_count=os.cpu_count(), num_images=_NUM_IMAGES.value,
                  mean_jpeg_kb=mean_kb, batch_size=_BATCH_SIZE.value,
                  num_batches=_NUM_BATCHES.value, warmup_batches=_WARMUP_BATCHES.value,
                  results=results)
    with open(_JSON_OUT.value, "a") as f:
      f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
  app.run(main)
