"""Published recipes of BEiT (`sslx.methods.beit`) shared by run configs in ``configs/``.

Facts from microsoft/unilm ``beit/``: README.md (the ImageNet-1k pretraining command),
run_beit_pretraining.py (defaults: AdamW betas, minimum lr, 112 px tokenizer input with lanczos, 75 masked
patches in blocks of 16 or more, shared relative position bias and no absolute position embedding),
optim_factory.py (weight-decay groups), modeling_finetune.py (layer scale, relative position bias) and
datasets.py (crops, colour jitter).

Every config takes the tokenizer run as its argument, ``tokenizer=RUN_DIR``
(`sslx.methods.beit.use_tokenizer_run` copies its architecture into ``config.method.tokenizer`` and sets
``config.init_from``), or precomputed ids with ``--config.method.token_ids_key=KEY
--config.method.vocab_size=K``; with neither the run refuses to start.
"""
from __future__ import annotations

import ml_collections

from sslx import config as config_lib
from sslx import config_args
from sslx import methods
from sslx import models
from sslx import recipes
from sslx.methods import beit

# BEiT's optimizer decays every parameter but 1-D ones, biases and its ViT's no_weight_decay() (pos_embed,
# cls_token): kernels, the (1, 1, D) mask token and the (E, N) relative position tables decay; LayerNorm
# parameters, biases, the layer-scale gammas and the class token do not.
BEIT_PRETRAIN_WD_MULTS = ((".*(kernel|mask_token|rel_pos_bias/table)$", 1.0),)
# --layer_scale_init_value: "0.1 for base, 1e-5 for large".
LAYER_SCALE = {"B": 0.1, "L": 1e-5}


def imagenet_view(size: int) -> str:
  """BEiT's view (datasets.py of the first release): colour jitter 0.4, flip, random resized crop of 8-100%
  (bicubic). The jitter runs after the crop here: cheaper, and only contrast's reference mean changes."""
  return (f"random_resized_crop({size}, scale=(0.08, 1.0), interpolation='bicubic')|hflip"
          "|color_jitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.0, p=1.0)")


def beit_encoder(config: ml_collections.ConfigDict, variant: str, drop_path_rate: float) -> None:
  """``config.model``: a ViT of ``variant`` with BEiT's pretraining options: mask token, layer scale (0.1
  for B, 1e-5 for L), one relative position bias shared by the blocks, no absolute position embedding."""
  config.model = models.default_config("vit", variant=variant)
  config.model.update(dict(mask_token=True, layer_scale=LAYER_SCALE.get(variant.split("/")[0], 0.1),
                           rel_pos_bias="shared", pos_embed="none", drop_path_rate=drop_path_rate))


def beit_optimizer(config: ml_collections.ConfigDict, *, base_lr: float, lr_batch_base: int,
                   warmup_epochs: float) -> None:
  """AdamW (betas (0.9, 0.999), weight decay 0.05 on `BEIT_PRETRAIN_WD_MULTS`), gradients clipped to global
  norm 3, lr ``base_lr`` x batch / ``lr_batch_base`` after a linear warm-up, then half-cosine to 1e-5.

  The paper's betas; run_beit_pretraining.py defaults to (0.9, 0.98), which its README's ImageNet-1k command
  leaves unchanged. The reference warms up from 1e-6 rather than 0.
  """
  config.optimizer.update(dict(name="adamw", base_lr=base_lr, lr_batch_base=lr_batch_base, b1=0.9, b2=0.999,
                               weight_decay=0.05, wd_mults=BEIT_PRETRAIN_WD_MULTS, grad_clip_norm=3.0))
  config.schedule.update(dict(warmup_epochs=warmup_epochs, min_lr=1e-5))


def _beit_config(tokenizer_run: str | None) -> ml_collections.ConfigDict:
  config = config_lib.base_config()
  config.method = methods.default_config("beit")
  if tokenizer_run is not None:
    beit.use_tokenizer_run(config, tokenizer_run)
  return config


def beit_imagenet(variant: str, arg: str | None) -> ml_collections.ConfigDict:
  """BEiT pretraining on ImageNet-1k at 224 px, 800 epochs (Bao et al. 2022; the README's ImageNet-1k
  command).

  Global batch 2048 (16 GPUs x 128), lr 1.5e-3 at that batch, 10 warm-up epochs, `beit_optimizer`; drop path
  0.1; `beit_encoder`; 75 of the 196 patches masked block-wise (min_block 16); vocabulary 8192 (DALL-E's, and
  `sslx.recipes_tokenizer.tokenizer_imagenet`'s, whose 112 px input this run resizes its crops to);
  ImageNet's mean and std (--imagenet_default_mean_and_std); `imagenet_view`.

  Arguments: ``tokenizer=RUN_DIR`` (a run of configs/tokenizer_imagenet.py); ``local``: 2 blocks on 64 px
  images (a 4 x 4 grid, 6 masked patches, min_block 1), batch 8, 20 steps, the vocabulary of the tokenizer
  run (one of configs/tokenizer_imagenet.py:local, 32 px): a check of the set-up on a CPU, not a recipe.
  """
  args = config_args.parse_arg(arg, local=False, tokenizer=None)
  config = _beit_config(args.tokenizer)
  beit_encoder(config, variant, drop_path_rate=0.1)
  recipes.use_imagenet(config)
  config.data.augmentation = imagenet_view(224)
  config.method.vocab_size = 8192
  config.batch_size = 2048
  config.num_epochs = 800
  beit_optimizer(config, base_lr=1.5e-3, lr_batch_base=2048, warmup_epochs=10.0)
  config.checkpoint.every_steps = 1000
  config.log_every_steps = 100
  if args.local:
    config.model.depth = 2
    config.data.update(dict(image_size=64, num_workers=0, prefetch=1, augmentation=imagenet_view(64)))
    config.method.vocab_size = None
    recipes.shrink_run_length(config)
  return config_lib.finalize(config)


def beit_fashion_mnist(tokenizer_run: str | None) -> ml_collections.ConfigDict:
  """BEiT on 28 px Fashion-MNIST with the quick start's ViT-Ti/4 (4 blocks), 2 epochs on a CPU. Unlocked.

  Tokens from a run of configs/tokenizer_fashion_mnist.py (a VQ-VAE, 512 codes on the same 7 x 7 grid at
  28 px, so the tokenizer reads the crop as it is). 19 of the 49 patches masked (75 / 196 of them) in blocks
  of at least 4 (16 of 196, scaled); `beit_encoder` without drop path (4 blocks, 2 epochs); `beit_optimizer`
  with the MAE quick start's lr (1e-3 at batch 256) and 0.2-epoch warm-up; the quick start's data, crops and
  monitors. Chosen for a CPU run, not tuned. Ends with kNN and linear-probe accuracy beside a random
  encoder's.
  """
  quickstart = recipes.mae_fashion_mnist()
  config = _beit_config(tokenizer_run)
  beit_encoder(config, quickstart.model.variant, drop_path_rate=0.0)
  config.model.depth = quickstart.model.depth
  config.data = quickstart.data
  config.batch_size = 256
  config.num_epochs = 2
  beit_optimizer(config, base_lr=1e-3, lr_batch_base=256, warmup_epochs=0.2)
  for section in ("checkpoint", "eval", "monitor"):
    config[section] = quickstart[section]
  config.log_every_steps = quickstart.log_every_steps
  return config
