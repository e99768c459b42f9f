"""Recipes of the context pretext tasks, relative position (Doersch et al. 2015) and context encoders
(Pathak et al. 2016), for ``configs/``.

Facts: cdoersch/deepcontext ``train.py`` and ``solver_mko.prototxt`` (patches 96 px, gap 48, jitter 7, images
resized to 150k-450k pixels, colour dropping, per-patch normalisation, pair layers 4096-4096-8, plain SGD
at a fixed lr of 1e-5 on a loss summed over pairs, no weight decay, batches of up to 512 patches, ~1.7M
iterations); pathak22/context-encoder ``train.lua``, ``train_random.lua``, ``data/donkey_folder.lua`` and its
README (128 px random crops of images whose short side is resized to 350, flips, batch 64, Adam lr 2e-4 with
beta1 0.5, the generator at 10x the discriminator's lr when both losses are on, lambda_adv = 0.001, overlap 4
px weighted 10x). Both papers trained AlexNet-style networks; sslx has none, so the ImageNet recipes use the
registry's ResNet-50 (an assumption, as the other pretext recipes do).
"""
from __future__ import annotations

import ml_collections

from sslx import config as config_lib
from sslx import config_args
from sslx import methods
from sslx import models
from sslx import recipes
from sslx import recipes_pretext

# Doersch's jitter: a random integer in [-7, 7] per patch and axis, on 96 px patches.
DOERSCH_PATCH, DOERSCH_GAP, DOERSCH_JITTER = 96, 48, 7
# Pathak's random 128 px crop of an image whose short side is 350 px: (128 / 350)^2 of the short side's
# square, 10% (4:3 images) to 13% (square ones) of the image's area.
PATHAK_CROP_SCALE = (0.10, (128 / 350) ** 2)


def _fashion_mnist(method: str, resnet: bool) -> ml_collections.ConfigDict:
  """`recipes_pretext.fashion_mnist_pretext` with the quick start's view (a random resized crop of 35-100%,
  flips). Unlocked."""
  config = recipes_pretext.fashion_mnist_pretext(method, "resnet" if resnet else "vit")
  config.data.augment = recipes.mae_fashion_mnist().data.augment
  return config


def relpos_fashion_mnist(arg: str | None) -> ml_collections.ConfigDict:
  """Relative position on Fashion-MNIST (`_fashion_mnist`), the images upsampled to 56 px.

  At 28 px a 3 x 3 layout of patches of at least 2 x 2 ViT patches (8 px) with a gap leaves no room for
  jitter (3 x 8 + 2 x 2 = 28). The crops are therefore resized to 56 px (``config.data.image_size``, 2x),
  where patches of 12 px (3 x 3 patches of the ViT-Ti/4), Doersch's gap of half a patch (6 px) and a jitter of
  1 px (his 7/96 of a patch, rounded) span 3 x 12 + 2 x 6 + 2 x 1 = 50 of the 56 px: each patch sees about a
  fifth of the garment's side. Grey images: no colour handling, no per-patch normalisation (the quick start
  normalises the dataset). Pair layers 512-512 (the reference's two hidden layers, narrower). The online probe
  reads 64 rows a step (a 56 px image costs the ViT 196 tokens, the step's patches 9 each). Evaluation reads
  whole 56 px images.

  Arguments: ``resnet`` (the ResNet-18 instead of the ViT), ``epochs=N`` (default 2), ``test``.
  """
  args = config_args.parse_arg(arg, resnet=False, epochs=2, test=False)
  config = _fashion_mnist("relpos", args.resnet)
  config.data.image_size = 56
  config.method.update(dict(patch_size=12, gap=6, jitter=1, head_hidden_dims=(512, 512)))
  config.monitor.probe_batch_size = 64
  config.num_epochs = args.epochs
  if args.test:
    recipes_pretext.shrink_for_tests(config)
    config.method.head_hidden_dims = (32,)
  return config_lib.finalize(config)


def relpos_imagenet(arg: str | None) -> ml_collections.ConfigDict:
  """Relative position on ImageNet-1k with a ResNet-50 (assumed; Doersch's was AlexNet-style), Doersch's
  published settings where the reference states them.

  Patches 96 px, gap 48, jitter 7, colour dropping (``colour='drop'``, the reference code's choice) and
  per-patch normalisation; pair layers 4096-4096 then 8 logits. Images: the reference resizes each image to
  150k-450k pixels and lays its grid over the whole image; here a square crop of 36-100% of the area (no
  aspect change, no flip) resized to 400 px, i.e. the image as if resized to 160k-444k pixels, and one 3 x 3
  layout (398 px with its jitter margins) per image. Batch 256 images (512 patches, the reference's batch);
  plain SGD (no momentum, no weight decay) at a constant lr of 2.56e-3 per 256 pairs (the reference's 1e-5 on
  a loss summed over pairs, here averaged over 256), 340 epochs (~1.7M steps of 256). Not implemented: the
  reference's random down-sampling of a third of the patches; it also pairs every adjacent patch of its grid
  (several pairs per image) where this recipe draws one pair per image.

  Arguments: ``epochs=N`` (default 340); ``local`` (a ResNet-50 of width 8 on 72 px images with 16 px patches,
  gap 8, jitter 2; batch 8, 20 steps: a check of the set-up, not a recipe).
  """
  args = config_args.parse_arg(arg, local=False, epochs=340)
  config = config_lib.base_config()
  config.model = models.default_config("resnet", variant="50")
  config.method = methods.default_config("relpos")
  config.method.update(dict(patch_size=DOERSCH_PATCH, gap=DOERSCH_GAP, jitter=DOERSCH_JITTER, colour="drop",
                            normalize_patches=True, head_hidden_dims=(4096, 4096)))
  recipes.use_imagenet(config)
  config.data.image_size = 400
  config.data.augment.update(dict(crop_scale=(0.36, 1.0), crop_ratio=(1.0, 1.0), hflip=False))
  config.batch_size = 256
  config.num_epochs = args.epochs
  config.optimizer.update(dict(name="sgd", base_lr=2.56e-3, lr_batch_base=256, momentum=0.0,
                               weight_decay=0.0))
  config.schedule.update(dict(warmup_epochs=0.0, decay="multistep", milestone_epochs=()))
  config.checkpoint.every_steps = 2000  # the reference's snapshot interval
  config.log_every_steps = 100
  if args.local:
    config.model.width = 8
    config.method.update(dict(patch_size=16, gap=8, jitter=2, head_hidden_dims=(64, 64)))
    config.data.update(dict(image_size=72, num_workers=0, prefetch=1))
    recipes.shrink_run_length(config)
  return config_lib.finalize(config)


def inpainting_fashion_mnist(arg: str | None) -> ml_collections.ConfigDict:
  """Context encoders on 28 px Fashion-MNIST (`_fashion_mnist`): random 7 px blocks, 4 of the 16, missing
  (Pathak's feature learning used random regions; ``region=center`` hides the central 14 x 14 square), the
  loss on them and a 4 px band around them weighted 10x, no adversarial loss. The ViT predicts pixels with
  its linear patch head; the ResNet's decoder starts from a 7 x 7 x 128 map (two transposed convolutions).
  Pictures every 200 steps: masked input, inpainted, original.

  Arguments: ``resnet`` (the ResNet-18 instead of the ViT), ``region=random_blocks|center``, ``epochs=N``
  (default 2), ``test``.
  """
  args = config_args.parse_arg(arg, resnet=False, region="random_blocks", epochs=2, test=False,
                               choices=dict(region=("random_blocks", "center")))
  config = _fashion_mnist("inpainting", args.resnet)
  config.method.update(dict(region=args.region, block_size=7, decoder_width=128, decoder_upsamples=2,
                            discriminator_width=32))
  config.num_epochs = args.epochs
  if args.test:
    recipes_pretext.shrink_for_tests(config)
    config.method.update(dict(decoder_width=16, discriminator_width=8))
    config.viz_every_steps = 3
  return config_lib.finalize(config)


def inpainting_imagenet(arg: str | None) -> ml_collections.ConfigDict:
  """Context encoders on ImageNet-1k with a ResNet-50 (assumed; Pathak's feature encoder was AlexNet).

  128 px crops as the reference's (`PATHAK_CROP_SCALE` of the area, square, flipped half the time); random
  16 px blocks covering a quarter (the paper's feature learning used random regions, reconstruction loss
  only), the 4 px overlap band weighted 10x; the decoder from 4 x 4 x 512 up five transposed convolutions, as
  the reference's from its bottleneck. Batch 64, Adam (beta1 0.5, beta2 0.999, no weight decay) at a constant
  2e-4. The papers give no ImageNet run length: 100 epochs are assumed (the README's command runs 500 on its
  smaller datasets).

  Arguments: ``adversarial`` (the reference's joint training: lambda_adv = 0.001, the central region, the
  discriminator at a tenth of the generator's lr 2e-3); ``epochs=N`` (default 100); ``local`` (a ResNet-50 of
  width 8 on 32 px images, batch 8, 20 steps: a check of the set-up, not a recipe).
  """
  args = config_args.parse_arg(arg, local=False, adversarial=False, epochs=100)
  config = config_lib.base_config()
  config.model = models.default_config("resnet", variant="50")
  config.method = methods.default_config("inpainting")
  config.method.update(dict(region="random_blocks", block_size=16, decoder_width=512, decoder_upsamples=5))
  recipes.use_imagenet(config)
  config.data.image_size = 128
  config.data.augment.update(dict(crop_scale=PATHAK_CROP_SCALE, crop_ratio=(1.0, 1.0), hflip=True))
  config.batch_size = 64
  config.num_epochs = args.epochs
  config.optimizer.update(dict(name="adamw", base_lr=2e-4, lr_batch_base=64, b1=0.5, b2=0.999,
                               weight_decay=0.0))
  config.schedule.update(dict(warmup_epochs=0.0, decay="multistep", milestone_epochs=()))
  config.checkpoint.every_steps = 1000
  config.log_every_steps = 100
  config.viz_every_steps = 5000
  if args.adversarial:
    config.method.update(dict(region="center", adversarial_weight=0.001))
    config.optimizer.update(dict(base_lr=2e-3, lr_mults=(("discriminator/.*", 0.1),)))
  if args.local:
    config.model.width = 8
    config.method.update(dict(block_size=8, decoder_width=32, decoder_upsamples=3, discriminator_width=8))
    config.data.update(dict(image_size=32, num_workers=0, prefetch=1))
    recipes.shrink_run_length(config)
    config.viz_every_steps = 10
  return config_lib.finalize(config)
