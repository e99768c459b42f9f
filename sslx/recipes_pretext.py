"""Recipes of the classic pretext tasks, rotation prediction (RotNet) and jigsaw puzzles, for ``configs/``.

ImageNet facts: gidariss/FeatureLearningRotNet ``config/ImageNet_RotNet_AlexNet.py`` and ``dataloader.py``
(RotNet); Noroozi & Favaro 2016 and bbrattoli/JigsawPuzzlePytorch ``JigsawTrain.py`` and
``Dataset/JigsawImageLoader.py`` (jigsaw). Both papers trained an AlexNet; sslx has none, so the recipes use
the registry's ResNet-50 (as Goyal et al. 2019 and Kolesnikov et al. 2019 did for these tasks), or a
ResNet-18 with ``depth=18``, under the published optimizer, schedule and input sizes.
"""
from __future__ import annotations

import ml_collections

from sslx import config as config_lib
from sslx import config_args
from sslx import methods
from sslx import models
from sslx import recipes

# torch's SGD decays every parameter (biases and BatchNorm too), as both reference trainings did.
DECAY_EVERY_PARAMETER = ((".*", 1.0),)


def fashion_mnist_pretext(method: str, encoder: str) -> ml_collections.ConfigDict:
  """``method`` on Fashion-MNIST with the quick start's ViT-Ti/4 (4 blocks) or, with ``encoder='resnet'``,
  the contrastive recipes' ResNet-18 (small-image stem, width 32: 256 features); the quick start's run
  (`recipes.fashion_mnist_run`: batch 256, 2 epochs, AdamW lr 1e-3 after a 0.2-epoch warm-up, then
  half-cosine) and its kNN / linear-probe report at the end. Unlocked."""
  quickstart = recipes.mae_fashion_mnist()
  config = config_lib.base_config()
  if encoder == "vit":
    config.model = quickstart.model
  else:
    config.model = models.default_config("resnet", variant="18", small_images=True, width=32)
  config.method = methods.default_config(method)
  recipes.fashion_mnist_run(config)
  for section in ("eval", "monitor"):
    config[section] = quickstart[section]
  return config


def shrink_for_tests(config: ml_collections.ConfigDict) -> None:
  """``:test``: `recipes.shrink_test_run` (6 steps at batch 32) with a one-block ViT of width 32 or a
  ResNet-18 of width 8."""
  recipes.shrink_test_run(config)
  if config.model.name == "vit":
    config.model.update(dict(depth=1, width=32, num_heads=2, mlp_dim=64))
  else:
    config.model.width = 8
  config.eval.batch_size = 100
  config.monitor.probe_batch_size = 8


def rotation_fashion_mnist(arg: str | None) -> ml_collections.ConfigDict:
  """RotNet on 28 px Fashion-MNIST (`fashion_mnist_pretext`): the four rotations of each image (1024 encoder
  inputs a step), a linear head. The view is the quick start's, a random resized crop of 35-100% of the area
  and a horizontal flip (RotNet's ImageNet view, with the quick start's milder scale for 28 px garments).

  Arguments: ``resnet`` (the ResNet-18 instead of the ViT), ``epochs=N`` (default 2), ``test``
  (`shrink_for_tests`).
  """
  args = config_args.parse_arg(arg, resnet=False, epochs=2, test=False)
  config = fashion_mnist_pretext("rotation", "resnet" if args.resnet else "vit")
  config.data.augment.update(dict(crop_scale=(0.35, 1.0), hflip=True))
  config.num_epochs = args.epochs
  if args.test:
    shrink_for_tests(config)
  return config_lib.finalize(config)


def jigsaw_fashion_mnist(arg: str | None) -> ml_collections.ConfigDict:
  """Jigsaw puzzles on Fashion-MNIST (`fashion_mnist_pretext`), images upsampled from 28 to 48 px.

  Why 48: 28 px does not split into 3 x 3 cells (9 px cells and a 1 px rest), and a tile of a 9 px cell
  would be at most 2 x 2 patches of 4 px with no room for the random gap between tiles. At 48 px the cells are
  16 px and the tiles 12 px, 3 x 3 patches of the ViT-Ti/4 (a tile sees 7 of the original pixels a side);
  12 of 16 (0-4 px between tiles) is near the paper's 64 of 75 and 48 is a multiple of the patch size,
  so the encoder also reads whole images for evaluation (a 12 x 12 patch grid; kNN and probe at 48 px).
  The view: a random resized crop of 60-100% of the area (the garment stays in the grid, as the paper's
  225 px crop stays in its 256 px image), no flip (the paper has none). 100 permutations (minimum Hamming
  distance 6; the paper's 1000 are for 350k steps of ImageNet, the run here is 468), no channel jitter (one
  channel). Head: the 9 pooled tile features concatenated, 512 hidden units, no per-tile layer and no
  dropout in two epochs. Chosen for a CPU run, not tuned.

  Arguments: ``resnet``, ``epochs=N`` (default 2), ``test``, as `rotation_fashion_mnist`.
  """
  args = config_args.parse_arg(arg, resnet=False, epochs=2, test=False)
  config = fashion_mnist_pretext("jigsaw", "resnet" if args.resnet else "vit")
  config.data.image_size = 48
  config.data.augment.update(dict(crop_scale=(0.6, 1.0), hflip=False))
  config.method.update(dict(num_permutations=100, tile_size=12, channel_jitter=0, tile_dim=None,
                            hidden_dim=512, dropout=0.0))
  config.num_epochs = args.epochs
  if args.test:
    shrink_for_tests(config)
  return config_lib.finalize(config)


def _imagenet(method: str, depth: str) -> ml_collections.ConfigDict:
  config = config_lib.base_config()
  config.model = models.default_config("resnet", variant=depth)
  config.method = methods.default_config(method)
  recipes.use_imagenet(config)
  config.checkpoint.every_steps = 1000
  config.log_every_steps = 100
  return config


def _sgd(config: ml_collections.ConfigDict, *, lr: float, batch_size: int, nesterov: bool,
         milestone_epochs: tuple[float, ...]) -> None:
  """Torch's SGD (momentum 0.9, weight decay 5e-4 on every parameter) at ``lr`` for ``batch_size`` (scaled
  linearly for other batches), no warm-up, x0.1 at each milestone."""
  config.batch_size = batch_size
  config.optimizer.update(dict(name="sgd", base_lr=lr, lr_batch_base=batch_size, momentum=0.9,
                               nesterov=nesterov, weight_decay=5e-4, wd_mults=DECAY_EVERY_PARAMETER))
  config.schedule.update(dict(warmup_epochs=0.0, decay="multistep", milestone_epochs=milestone_epochs,
                              gamma=0.1))


def _shrink_for_cpu(config: ml_collections.ConfigDict, image_size: int) -> None:
  """``:local``: the ResNet at width 8 on ``image_size`` px images, batch 8, 20 steps: a check of the set-up
  on a CPU, not a recipe."""
  config.model.width = 8
  config.data.update(dict(image_size=image_size, num_workers=0, prefetch=1))
  recipes.shrink_run_length(config)


def rotation_imagenet(arg: str | None) -> ml_collections.ConfigDict:
  """RotNet on ImageNet-1k as the official ``ImageNet_RotNet_AlexNet`` config trains it, on a ResNet.

  192 images a step (768 rotated inputs: RotNet's loader turns each image of its batch of 192 four times),
  RotNet's ``random_sized_crop`` view (torchvision's random resized crop to 224 px, 8-100% of the area,
  bilinear) and a horizontal flip; SGD with Nesterov momentum 0.9, weight decay 5e-4, lr 0.01 for 15 epochs,
  then 0.001, 1e-4 from epoch 30, 1e-5 from 45, 50 epochs (the paper's text gives 30 epochs with drops at
  10, 20 and 25; the released config is followed). The AlexNet's fully connected layers are its rotation
  head; on a ResNet the head is linear on the pooled features (as in Kolesnikov et al. 2019).

  Arguments: ``depth=50|18``; ``epochs=N`` (default 50); ``local``: see `_shrink_for_cpu` (32 px).
  """
  args = config_args.parse_arg(arg, local=False, epochs=50, depth="50", choices=dict(depth=("50", "18")))
  config = _imagenet("rotation", args.depth)
  config.data.augment.update(dict(crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), interpolation="bilinear",
                                  hflip=True))
  config.num_epochs = args.epochs
  _sgd(config, lr=0.01, batch_size=192, nesterov=True, milestone_epochs=(15.0, 30.0, 45.0))
  if args.local:
    _shrink_for_cpu(config, 32)
  return config_lib.finalize(config)


def jigsaw_view(size: int) -> str:
  """The jigsaw input: a square crop of ``size`` px (the paper's 225 px window), grey with probability 0.3.

  The paper resizes each image to 256 x 256 (shorter side to 256, the rest centre-cropped) and crops a random
  225 px window: ~77% of the square, 43-77% of the original area for aspect ratios 16:9 to 1:1. sslx has no
  fixed-size random crop, so a random resized crop of 45-80% of the area at aspect 1 stands for it. The
  grayscale images (30%) and the per-channel jitter of `sslx.pretext.jigsaw` are the paper's defences
  against chromatic aberration, as recalled from its Section 3.2.
  """
  return f"random_resized_crop({size}, scale=(0.45, 0.8), ratio=(1.0, 1.0), interpolation='bilinear')" \
         "|grayscale(p=0.3)"


def jigsaw_imagenet(arg: str | None) -> ml_collections.ConfigDict:
  """Jigsaw puzzles on ImageNet-1k as in Noroozi & Favaro 2016, on a ResNet.

  225 px images (`jigsaw_view`), 3 x 3 cells of 75 px, 64 px tiles at random offsets, colour channels
  jittered by up to 2 px, 1000 permutations (minimum Hamming distance 5); the context-free network's fc6
  (1024 per tile), fc7 (4096) and dropout 0.5 around a shared tile encoder. 256 images a step; SGD (momentum
  0.9, weight decay 5e-4) at the paper's lr 0.01, x0.1 every 20 epochs (bbrattoli's schedule), 70 epochs
  (the paper's 350k steps of 256 images).

  Arguments: ``depth=50|18``; ``epochs=N`` (default 70); ``local``: see `_shrink_for_cpu` (48 px images:
  16 px cells, 12 px tiles).
  """
  args = config_args.parse_arg(arg, local=False, epochs=70, depth="50", choices=dict(depth=("50", "18")))
  config = _imagenet("jigsaw", args.depth)
  config.data.image_size = 225
  config.data.augmentation = jigsaw_view(225)
  config.method.update(dict(num_permutations=1000, tile_size=64, channel_jitter=2, tile_dim=1024,
                            hidden_dim=4096, dropout=0.5))
  config.num_epochs = args.epochs
  _sgd(config, lr=0.01, batch_size=256, nesterov=False, milestone_epochs=(20.0, 40.0, 60.0))
  if args.local:
    _shrink_for_cpu(config, 48)
    config.data.augmentation = jigsaw_view(48)
    config.method.update(dict(tile_size=12, tile_dim=32, hidden_dim=64))
  return config_lib.finalize(config)
