"""Published recipes of SimMIM (masked image modelling with a mask token), shared by configs in ``configs/``.

They build on `sslx.recipes` (ImageNet data, the quick start's ViT) and add SimMIM's optimizer, its step-decay
learning rate and its crops. Facts from microsoft/SimMIM: ``config.py`` (defaults),
``configs/vit_base__800ep/simmim_pretrain__vit_base__img224__800ep.yaml``, ``main_simmim.py`` (lr scaling),
``optimizer.py`` (weight-decay groups), ``lr_scheduler.py`` and ``data/data_simmim.py`` (crops, mask).
"""
from __future__ import annotations

import ml_collections

from sslx import config as config_lib
from sslx import config_args
from sslx import methods
from sslx import models
from sslx import recipes

# SimMIM's pretraining decays every parameter but 1-D ones, biases and its ViT's ``no_weight_decay()``
# (``pos_embed``, ``cls_token``): kernels and the (1, 1, D) mask token decay, the class token does not.
SIMMIM_PRETRAIN_WD_MULTS = ((".*(kernel|mask_token)$", 1.0),)


def simmim_optimizer(config: ml_collections.ConfigDict, *, base_lr: float, warmup_epochs: float,
                     milestone_epochs: tuple[float, ...]) -> None:
  """SimMIM's AdamW (betas (0.9, 0.999), weight decay 0.05 on `SIMMIM_PRETRAIN_WD_MULTS`, gradients clipped
  to global norm 5) with lr ``base_lr`` x batch / 512, a linear warm-up, then x0.1 at each milestone.

  The reference warms up from 5e-7 x batch / 512 rather than 0; the difference is gone after the first step.
  """
  config.optimizer.update(dict(name="adamw", base_lr=base_lr, lr_batch_base=512, b1=0.9, b2=0.999,
                               weight_decay=0.05, wd_mults=SIMMIM_PRETRAIN_WD_MULTS, grad_clip_norm=5.0))
  # Keys of the step decay (`sslx.optim.learning_rate_schedule`); min_lr is not read by it.
  config.schedule.update(dict(warmup_epochs=warmup_epochs, min_lr=0.0, decay="multistep",
                              milestone_epochs=milestone_epochs, gamma=0.1))


def simmim_crops(config: ml_collections.ConfigDict) -> None:
  """SimMIM's view: a random resized crop of 67-100% of the area (aspect 3/4-4/3, torchvision's default
  bilinear interpolation), then a horizontal flip."""
  config.data.augment.update(dict(crop_scale=(0.67, 1.0), crop_ratio=(3 / 4, 4 / 3), interpolation="bilinear",
                                  hflip=True))


def simmim_vitb(arg: str | None = None) -> ml_collections.ConfigDict:
  """SimMIM ViT-B/16 pretraining on ImageNet-1k at 224 px, 800 epochs (Xie et al. 2022; the official config
  ``simmim_pretrain__vit_base__img224__800ep.yaml``, 83.8% after fine-tuning).

  Global batch 2048 (the README's 16 GPUs x 128), mask cells of 32 px (2 x 2 patches: 7 x 7 cells, 30 masked)
  at ratio 0.6, a linear head to the 16 x 16 x 3 pixels of each patch, L1 loss on masked pixels; drop path
  0.1; `simmim_optimizer` with base lr 1e-4 (4e-4 at batch 2048), 10 warm-up epochs, x0.1 at epoch 700;
  `simmim_crops`. The reference's ViT differs from sslx's in three places: it has no absolute position
  embedding but a relative position bias shared by all blocks (here: the fixed sin-cos table), LayerScale
  initialised at 0.1 (here: none), and no key bias in qkv (softmax ignores a key bias, so that one is moot).
  ``config.model.pooling`` stays 'cls' as in the pretraining config; SimMIM fine-tunes on the mean patch token
  (``USE_MEAN_POOLING``), which ``--config.model.pooling=mean`` selects at evaluation.

  ``arg='local'``: 2 blocks on 64 px images (2 x 2 mask cells), batch 8, 20 steps: a check of the set-up on a
  CPU, not a recipe.
  """
  local = config_args.parse_arg(arg, local=False).local
  config = config_lib.base_config()
  config.model = models.default_config("vit", variant="B/16")
  config.model.update(dict(mask_token=True, drop_path_rate=0.1))
  config.method = methods.default_config("simmim")
  recipes.use_imagenet(config)
  simmim_crops(config)
  config.batch_size = 2048
  config.num_epochs = 800
  simmim_optimizer(config, base_lr=1e-4, warmup_epochs=10.0, milestone_epochs=(700.0,))
  config.checkpoint.every_steps = 1000
  config.log_every_steps = 100
  config.viz_every_steps = 5000
  if local:
    config.model.depth = 2
    config.data.update(dict(image_size=64, num_workers=0, prefetch=1))
    recipes.shrink_run_length(config)
    config.viz_every_steps = 10
  return config_lib.finalize(config)


def simmim_fashion_mnist() -> ml_collections.ConfigDict:
  """SimMIM on 28 px Fashion-MNIST with the quick start's ViT-Ti/4 (4 blocks), 2 epochs on a CPU. Unlocked.

  Mask cells of 4 px, one model patch: 7 does not split into 2 x 2 patches (8 px) without partial cells, and
  4 px cells give the paper's 7 x 7 grid of cells, each 1/7 of the image side as 32 px is of 224 px, the
  relative size SimMIM's "AvgDist" argument is about. Ratio 0.6 (30 of 49 cells); the view is
  `simmim_crops`; `simmim_optimizer` with lr 1e-3 at batch 256 (the MAE quick start's), a 0.2-epoch
  warm-up and x0.1 at 1.75 epochs (7/8 of the run, as 700 of 800); no drop path in 4 blocks and 2 epochs.
  Chosen for a CPU run, not tuned. Ends with kNN and linear-probe accuracy beside a random encoder's.
  """
  quickstart = recipes.mae_fashion_mnist()
  config = config_lib.base_config()
  config.model = quickstart.model
  config.model.mask_token = True
  config.method = methods.default_config("simmim")
  config.method.mask_patch_size = 4
  simmim_crops(config)
  config.batch_size = 256
  config.num_epochs = 2
  simmim_optimizer(config, base_lr=2e-3, warmup_epochs=0.2, milestone_epochs=(1.75,))
  for section in ("checkpoint", "eval", "monitor"):
    config[section] = quickstart[section]
  config.update(dict(log_every_steps=quickstart.log_every_steps, viz_every_steps=quickstart.viz_every_steps))
  return config
