r"""Colorization (and split-brain) pictures on real colour photographs that ship with scikit-image and
scikit-learn, so nothing is downloaded.

  python experiments/colorization_pictures.py --out=docs/images/colorization_photos.png \
      --splitbrain_out=docs/images/splitbrain_photos.png --steps=300 --image_size=64

Builds an image folder (the layout `sslx.data.folder` reads) of random square crops of the photographs:
``train/`` from `TRAIN_PHOTOS`, ``val/`` from the different photographs of `HELD_OUT_PHOTOS`, named so that
the first images in sorted order cycle through the held-out photographs. Then trains
``configs/colorization_folder.py`` (and, with ``--splitbrain_out``, ``configs/splitbrain_folder.py``)
through `sslx.train.train` for ``--steps`` steps on ``train/`` alone, and writes one grid of the first
``--num_images`` held-out crops (`sslx.viz.save_image_grid`) with the rows of the method's ``visualize``:
the grey input (L with a = b = 0), the prediction (annealed mean of the ab distribution at
``config.method.temperature``, 0.38), the truth (split-brain adds the truth's ab on the L predicted from
it). One row is added after the prediction: the plain mean of the same distribution (temperature 1), to show
what the annealing changes.

``--model=tiny`` (default) shrinks the recipe's ViT-Ti/8 (4 blocks, width 192) to 2 blocks of width 96 (4
heads: even, as the split-brain halves need) so a few hundred steps fit a few CPU minutes; ``--model=recipe``
keeps it. The recipe's learning rate (3e-4 x batch / 64) drops x0.1 at epoch 25, i.e. after
``25 * crops / batch`` steps (about 780 at the defaults, 1,000 crops at batch 32): beyond the runs this
script is for. Photos used (everyday scenes only; skimage's microscopy, retina, Hubble and synthetic colour
wheel images are left out): `TRAIN_PHOTOS` and `HELD_OUT_PHOTOS`.
"""
from __future__ import annotations

import os
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np
from PIL import Image
import skimage
import sklearn

from sslx import methods
from sslx import recipes_color
from sslx import train
from sslx import viz
from sslx.data import pipeline

SKIMAGE_DATA = os.path.join(os.path.dirname(skimage.__file__), "data")
SKLEARN_IMAGES = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images")
# The stereo pair's right view is nearly the left one, so both stay on the training side.
TRAIN_PHOTOS = {
    "astronaut": os.path.join(SKIMAGE_DATA, "astronaut.png"),
    "coffee": os.path.join(SKIMAGE_DATA, "coffee.png"),
    "motorcycle_left": os.path.join(SKIMAGE_DATA, "motorcycle_left.png"),
    "motorcycle_right": os.path.join(SKIMAGE_DATA, "motorcycle_right.png"),
    "china": os.path.join(SKLEARN_IMAGES, "china.jpg"),
}
HELD_OUT_PHOTOS = {
    "chelsea": os.path.join(SKIMAGE_DATA, "chelsea.png"),
    "rocket": os.path.join(SKIMAGE_DATA, "rocket.jpg"),
    "flower": os.path.join(SKLEARN_IMAGES, "flower.jpg"),
}
RECIPES = {"colorization": recipes_color.colorization_folder, "splitbrain": recipes_color.splitbrain_folder}
# Crop sides as fractions of the photograph's shorter side: small enough to give many distinct crops of a
# handful of photographs, large enough that a crop still shows an object.
CROP_SIDE = (0.25, 0.6)
# Training crops are stored larger than the model's input so that the recipe's random_resized_crop has
# pixels to cut from.
TRAIN_STORE_FACTOR = 1.5

flags.DEFINE_string("out", "docs/images/colorization_photos.png", "Colorization picture (PNG).")
flags.DEFINE_string("splitbrain_out", None, "Split-brain picture (PNG); None: split-brain is not trained.")
flags.DEFINE_integer("steps", 300, "Training steps of each method.")
flags.DEFINE_integer("image_size", 64, "Crop side in pixels (the model's input).")
flags.DEFINE_integer("batch_size", 32, "Training batch.")
flags.DEFINE_enum("model", "tiny", ["tiny", "recipe"],
                  "tiny: a 2-block width-96 ViT/8 (or a width-16 ResNet-18); recipe: the config's.")
flags.DEFINE_enum("encoder", "vit", list(recipes_color.ENCODERS), "The config's encoder=... argument.")
flags.DEFINE_integer("train_crops_per_photo", 200, "Random crops of each training photograph.")
flags.DEFINE_integer("held_out_crops_per_photo", 4, "Random crops of each held-out photograph.")
flags.DEFINE_integer("num_images", 8, "Held-out crops in the picture (columns).")
flags.DEFINE_string("workdir", None, "Folder for the image folder and the runs (default: a fresh temporary "
                    "one; an existing one with finished runs only redraws the pictures).")
flags.DEFINE_integer("seed", 0, "Seed of the crops and of the runs.")
FLAGS = flags.FLAGS


def random_crops(photo: np.ndarray, count: int, side_px: int, rng: np.random.Generator) -> list[np.ndarray]:
  """``count`` square crops of ``photo`` (H, W, 3) with sides drawn uniformly in `CROP_SIDE` of its shorter
  side, each resized (bicubic, antialiased by PIL) to ``side_px``."""
  height, width = photo.shape[:2]
  crops = []
  for _ in range(count):
    side = int(round(rng.uniform(*CROP_SIDE) * min(height, width)))
    top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
    crop = Image.fromarray(photo[top:top + side, left:left + side])
    crops.append(np.asarray(crop.resize((side_px, side_px), Image.Resampling.BICUBIC)))
  return crops


def write_folder(root: str, image_size: int, train_per_photo: int, held_out_per_photo: int,
                 seed: int) -> None:
  """``root/train`` and ``root/val`` of PNG crops (see the module docstring); kept if already there."""
  if os.path.isdir(os.path.join(root, "val")):
    return
  rng = np.random.default_rng(seed)
  splits = (("train", TRAIN_PHOTOS, train_per_photo, int(round(image_size * TRAIN_STORE_FACTOR))),
            ("val", HELD_OUT_PHOTOS, held_out_per_photo, image_size))
  for split, photos, count, side_px in splits:
    os.makedirs(os.path.join(root, split))
    for name, path in photos.items():
      photo = np.asarray(Image.open(path).convert("RGB"))
      for index, crop in enumerate(random_crops(photo, count, side_px, rng)):
        # Index first: the sorted file list (what the picture shows first) alternates between photographs.
        Image.fromarray(crop).save(os.path.join(root, split, f"{index:04d}_{name}.png"))


def run_config(method: str, data_dir: str):
  """The folder recipe of ``method`` trained on ``data_dir/train``, pictured on ``data_dir/val``."""
  config = RECIPES[method](f"encoder={FLAGS.encoder}")
  size = FLAGS.image_size
  config.data.update(dict(data_dir=data_dir, eval_split="val", eval_crop_fraction=1.0, image_size=size,
                          augmentation=f"random_resized_crop({size}, scale=(0.35, 1.0))|hflip"))
  config.batch_size = FLAGS.batch_size
  config.total_steps = FLAGS.steps
  config.seed = FLAGS.seed
  config.checkpoint.every_steps = FLAGS.steps
  config.log_every_steps = max(1, FLAGS.steps // 10)
  config.viz_every_steps = FLAGS.steps
  config.viz_num_images = FLAGS.num_images
  # The kNN monitor and the online probe need labels; the crops have none.
  config.monitor.update(dict(every_steps=0, online_probe=False))
  if FLAGS.model == "tiny":
    if FLAGS.encoder == "vit":
      config.model.update(dict(depth=2, width=96, num_heads=4, mlp_dim=384))
    else:
      config.model.width = 16
  return config


def picture_rows(config, state, batch) -> dict[str, np.ndarray]:
  """The method's picture rows in [0, 1], with the temperature-1 mean inserted after the prediction."""
  rng = jax.random.PRNGKey(config.seed)
  variables, method_state = state.variables, state.method_state
  rows = jax.device_get(methods.build_method(config).visualize(variables, method_state, batch, rng))
  plain = config.copy_and_resolve_references()
  plain.method.temperature = 1.0
  mean_rows = jax.device_get(methods.build_method(plain).visualize(variables, method_state, batch, rng))
  ordered = {}
  for name, images in rows.items():
    ordered[name] = images
    if name == "prediction":
      ordered["mean_t1"] = mean_rows["prediction"]
  mean, std = config.data.mean, config.data.std
  return {name: viz.denormalize(images, mean, std) for name, images in ordered.items()}


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
  workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="colorization_pictures_")
  data_dir = os.path.join(workdir, "photos")
  write_folder(data_dir, FLAGS.image_size, FLAGS.train_crops_per_photo, FLAGS.held_out_crops_per_photo,
               FLAGS.seed)
  print(f"training photos: {sorted(TRAIN_PHOTOS)}; held-out photos: {sorted(HELD_OUT_PHOTOS)}; "
        f"crops in {data_dir}", flush=True)
  outputs = {"colorization": FLAGS.out}
  if FLAGS.splitbrain_out:
    outputs["splitbrain"] = FLAGS.splitbrain_out
  for method, out in outputs.items():
    config = run_config(method, data_dir)
    start = time.time()
    state, scalars = train.train(config, os.path.join(workdir, method))
    batch = next(iter(pipeline.make_eval_loader(config.data, split="val", batch_size=FLAGS.num_images)))
    rows = picture_rows(config, state, {"image": batch["image"], "label": batch["label"]})
    viz.save_image_grid(out, rows)
    print(f"{method}: {FLAGS.steps} steps in {time.time() - start:.0f}s, last loss "
          f"{scalars.get('loss', float('nan')):.3f}; picture {out}, rows from the top: {', '.join(rows)}",
          flush=True)


if __name__ == "__main__":
  app.run(main)
