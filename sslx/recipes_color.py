"""Recipes of the colour pretext tasks, colorization (Zhang, Isola & Efros 2016) and the split-brain
autoencoder
(Zhang, Isola & Efros 2017), shared by configs in ``configs/``.

Facts from richzhang/colorization: ``train/solver.prototxt`` (Adam, lr 3e-5, momentum 0.9 / 0.99, weight decay
1e-3, x0.1 at 225k iterations, 500k iterations) and ``models/colorization_train_val_v2.prototxt`` (batch 40,
random 176 px crops of 256 px images with mirroring, ab targets at a quarter of the resolution, the grey
mask). The split-brain paper's own solver is not in that repository; its recipe here reuses the colorization
one (an assumption, said where it is used). Colour data only: Fashion-MNIST is grey.
"""
from __future__ import annotations

import ml_collections

from sslx import config as config_lib
from sslx import config_args
from sslx import methods
from sslx import models
from sslx import recipes

# ImageNet's 1,281,167 training images at batch 40: 32,029 steps per epoch; the reference's 225k-iteration
# step, in epochs, lands on step 225,000 exactly.
ZHANG_BATCH = 40
ZHANG_STEPS = 500_000
ZHANG_MILESTONE_EPOCHS = (225_000 / (1_281_167 // ZHANG_BATCH),)
# The reference crops 176 px squares from images stored at 256 x 256 (squashed): 47% of the area, aspect 1.
ZHANG_VIEW = "random_resized_crop(176, scale=(0.47, 0.47), ratio=(1.0, 1.0), interpolation='bilinear')|hflip"
ENCODERS = ("vit", "resnet")


def zhang_optimizer(config: ml_collections.ConfigDict, base_lr: float = 3e-5,
                    lr_batch_base: int = ZHANG_BATCH,
                    milestone_epochs: tuple[float, ...] = ZHANG_MILESTONE_EPOCHS) -> None:
  """The reference's Adam (betas 0.9 / 0.99), lr ``base_lr`` x batch / ``lr_batch_base``, no warm-up, x0.1 at
  each milestone, weight decay 1e-3 on kernels. Caffe's weight decay is an L2 term added to the gradient
  before Adam; sslx's AdamW decays decoupled (``lr * 1e-3 * w`` per step), much weaker at this lr: a known
  difference."""
  config.optimizer.update(dict(name="adamw", base_lr=base_lr, lr_batch_base=lr_batch_base, b1=0.9, b2=0.99,
                               weight_decay=1e-3))
  config.schedule.update(dict(warmup_epochs=0.0, min_lr=0.0, decay="multistep",
                              milestone_epochs=milestone_epochs, gamma=0.1))


def _imagenet(method: str, arg: str | None) -> ml_collections.ConfigDict:
  """``method`` on ImageNet-1k at the reference's settings (see `colorization_imagenet`)."""
  args = config_args.parse_arg(arg, local=False, encoder="vit", choices=dict(encoder=ENCODERS))
  config = config_lib.base_config()
  if args.encoder == "vit":
    config.model = models.default_config("vit", variant="B/16")
  else:
    config.model = models.default_config("resnet", variant="50")
  config.method = methods.default_config(method)
  recipes.use_imagenet(config)
  config.data.update(dict(image_size=176, augmentation=ZHANG_VIEW))
  config.batch_size = ZHANG_BATCH
  config.total_steps = ZHANG_STEPS
  zhang_optimizer(config)
  config.checkpoint.every_steps = 5000
  config.log_every_steps = 100
  config.viz_every_steps = 5000
  if args.local:
    if args.encoder == "vit":
      config.model.update(dict(variant="Ti/16", depth=2))
    else:
      config.model.width = 8
    config.data.update(dict(image_size=64, num_workers=0, prefetch=1,
                            augmentation=ZHANG_VIEW.replace("176", "64")))
    recipes.shrink_run_length(config)
    config.viz_every_steps = 10
  return config_lib.finalize(config)


def colorization_imagenet(arg: str | None = None) -> ml_collections.ConfigDict:
  """Colorization on ImageNet-1k with the reference's training (Zhang et al. 2016; richzhang/colorization).

  Random 176 px crops (`ZHANG_VIEW`) with mirroring, batch 40, 500k steps (15.6 epochs), `zhang_optimizer`,
  soft encoding on 10 neighbours (sigma 5), class rebalancing with lambda 0.5 once ``config.method.ab_prior``
  names a prior (``python -m sslx.pretext.ab_bins --config=configs/colorization_imagenet.py --out=...``;
  uniform until then), grey images masked. The reference's network is a VGG-style ConvNet with dilations
  that predicts at stride 4 (44 x 44 at 176 px); sslx's encoders predict at their own resolution: ViT-B/16
  (default) on its 11 x 11 patch grid, or ``encoder=resnet`` (ResNet-50) on its 6 x 6 last feature map.

  ``arg``: ``encoder=vit|resnet``; ``local``: a 2-block ViT-Ti/16 (or a width-8 ResNet-50) on 64 px crops,
  batch 8, 20 steps: a check of the set-up on a CPU, not a recipe.
  """
  return _imagenet("colorization", arg)


def splitbrain_imagenet(arg: str | None = None) -> ml_collections.ConfigDict:
  """Split-brain autoencoder on ImageNet-1k (Zhang et al. 2017): two half-width copies of the encoder
  (ViT-B/16 halves: width 384, 6 heads, MLP 1536; ResNet-50 halves: width 32), L -> ab into the in-gamut ab
  bins, ab -> L into 50 L bins, both classification losses. Assumed, not published in the sources read here:
  the colorization recipe's data, batch, optimizer and length (`colorization_imagenet`); the paper trains
  AlexNet halves. Arguments as `colorization_imagenet`."""
  return _imagenet("splitbrain", arg)


def _folder(method: str, arg: str | None) -> ml_collections.ConfigDict:
  """``method`` on a folder of colour images (see `colorization_folder`)."""
  args = config_args.parse_arg(arg, test=False, encoder="vit", choices=dict(encoder=ENCODERS))
  config = config_lib.base_config()
  if args.encoder == "vit":
    config.model = models.default_config("vit", variant="Ti/8", depth=4)
  else:
    config.model = models.default_config("resnet", variant="18", small_images=True, width=32)
  config.method = methods.default_config(method)
  config.data.update(dict(source="folder", dataset="image_folder", split="train", eval_split=None,
                          image_size=64, channels=3, mean=recipes.IMAGENET_MEAN, std=recipes.IMAGENET_STD,
                          augmentation="random_resized_crop(64, scale=(0.35, 1.0))|hflip", num_workers=0))
  config.batch_size = 64
  config.num_epochs = 30
  zhang_optimizer(config, base_lr=3e-4, lr_batch_base=64, milestone_epochs=(25.0,))
  config.checkpoint.every_steps = 200
  config.log_every_steps = 20
  config.viz_every_steps = 200
  if args.test:
    recipes.shrink_test_run(config)
    config.data.update(dict(image_size=32, augmentation="random_resized_crop(32, scale=(0.35, 1.0))|hflip"))
    if args.encoder == "vit":
      config.model.update(dict(depth=1, width=32, num_heads=2, mlp_dim=64, dtype="float32"))
    else:
      config.model.update(dict(width=8, dtype="float32"))
    config.viz_every_steps = 3
  return config_lib.finalize(config)


def colorization_folder(arg: str | None = None) -> ml_collections.ConfigDict:
  """Colorization on a folder of colour images (``--config.data.data_dir=/my/photos``, its ``train/``
  sub-folder if it has one; unlabelled images are fine): ViT-Ti/8 with 4 blocks on 64 px crops of 35-100%
  with flips (``encoder=resnet``: a half-width ResNet-18 with the small-image stem), batch 64, 30 epochs,
  Adam at 3e-4 (ten times the reference's lr for a short run on few images; chosen, not tuned), x0.1 at epoch
  25. ``test``: 6 steps at batch 32 of a one-block width-32 ViT (or a width-8 ResNet) on 32 px crops."""
  return _folder("colorization", arg)


def splitbrain_folder(arg: str | None = None) -> ml_collections.ConfigDict:
  """The split-brain autoencoder on a folder of colour images: `colorization_folder`'s data, encoders
  (halved) and training."""
  return _folder("splitbrain", arg)
