"""The recipes of BEiT's visual tokenizer (`sslx.methods.tokenizer`): ImageNet, its ``:local`` check, and the
Fashion-MNIST quick start, each sized to the patch grid of the ViT its tokens are for."""
from __future__ import annotations

import ml_collections

from sslx import config as config_lib
from sslx import config_args
from sslx import methods
from sslx import models
from sslx import recipes


def _tokenizer_config(vit_variant: str) -> ml_collections.ConfigDict:
  """The generic defaults with the tokenizer and, as ``config.model``, the ViT whose grid it serves; AdamW
  with DALL-E's dVAE betas and weight decay (0.9, 0.999, 1e-4 on kernels). Unlocked."""
  config = config_lib.base_config()
  config.model = models.default_config("vit", variant=vit_variant)
  config.method = methods.default_config("tokenizer")
  config.optimizer.update(dict(b1=0.9, b2=0.999, weight_decay=1e-4))
  return config


def tokenizer_imagenet(arg: str | None) -> ml_collections.ConfigDict:
  """A VQ tokenizer for BEiT ViT-B/16 on ImageNet-1k: vocabulary 8192 (BEiT's, DALL-E's), 112 px input with
  8x downsampling, so its 14x14 grid is ViT-B/16's at 224 px (BEiT tokenizes its 224 px crop at 112 px).

  Crops as BEiT's: random resized crop of 8-100% (bicubic) and flips, so the tokenizer learns the views it
  will tokenize. Hidden width 128, 2 residual blocks, 64-dim codes (the VQ-VAE's ImageNet size). Global batch
  512, lr 4.4e-4 (DALL-E's dVAE: 2.2e-4 x batch / 256), 1 warm-up epoch then half-cosine to 1.25e-6, 100
  epochs; reconstructions every 5000 steps. Not a published recipe: BEiT used DALL-E's released dVAE.

  ``arg='local'``: 32 px images (4x4 tokens, the grid of ViT-B/16 at 64 px), width 16, vocabulary 64, batch
  8, 20 steps: a check of the set-up on a CPU, not a recipe.
  """
  local = config_args.parse_arg(arg, local=False).local
  config = _tokenizer_config("B/16")
  recipes.use_imagenet(config)
  config.data.image_size = 112
  config.data.augment.update(dict(crop_scale=(0.08, 1.0), interpolation="bicubic", hflip=True))
  config.method.update(dict(vocab_size=8192, downsample=8, width=128, num_res_blocks=2, vit_image_size=224))
  config.method.vq.code_dim = 64
  config.batch_size = 512
  config.num_epochs = 100
  config.optimizer.base_lr = 2.2e-4
  config.schedule.update(dict(warmup_epochs=1.0, min_lr=1.25e-6))
  config.checkpoint.every_steps = 1000
  config.log_every_steps = 100
  config.viz_every_steps = 5000
  if local:
    config.data.update(dict(image_size=32, num_workers=0, prefetch=1))
    config.method.update(dict(vocab_size=64, width=16, num_res_blocks=1, vit_image_size=64))
    config.method.vq.code_dim = 16
    recipes.shrink_run_length(config)
    config.viz_every_steps = 10
  return config_lib.finalize(config)


def tokenizer_fashion_mnist() -> ml_collections.ConfigDict:
  """A VQ tokenizer for the BEiT quick start on Fashion-MNIST: 28 px with 4x downsampling, the 7x7 grid of the
  quick-start ViT-Ti/4 (`recipes.mae_fashion_mnist`, whose data section and crops it shares).

  Vocabulary 512: a batch of 256 images holds 12,544 positions, ~24 per code, so a used code's moving count
  stays well above the restart threshold of 1 (with 8192 codes it would be 1.5, and restarts would churn);
  and a 512-way classification is a target a 4-block ViT can learn in two epochs, while grey 4x4-pixel
  footprints of garments have far fewer distinct looks than ImageNet's colour patches. Hidden width 64, 2
  residual blocks, 32-dim codes. Batch 256, AdamW lr 1e-3 with a 0.2-epoch warm-up, 2 epochs. Unlocked.
  """
  config = _tokenizer_config("Ti/4")
  quick_start = recipes.mae_fashion_mnist()
  config.model, config.data = quick_start.model, quick_start.data
  config.method.update(dict(vocab_size=512, downsample=4, width=64, num_res_blocks=2))
  config.method.vq.code_dim = 32
  recipes.fashion_mnist_run(config)
  config.monitor.update(dict(knn_train_examples=2000, knn_test_examples=1000))
  return config
