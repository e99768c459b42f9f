"""Published training recipes shared by several run configs in ``configs/``."""
from __future__ import annotations

import ml_collections

from sslx import config as config_lib
from sslx import config_args
from sslx import methods
from sslx import models
from sslx import optim
from sslx.methods import finetune
from sslx.models import vit

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def mae_config(variant: str) -> ml_collections.ConfigDict:
  """The generic defaults with a ViT of ``variant`` and MAE, decaying weights as the official pretraining
  code does (every parameter but biases and 1-D ones: kernels, class and mask tokens). Unlocked."""
  config = config_lib.base_config()
  config.model = models.default_config("vit", variant=variant)
  config.method = methods.default_config("mae")
  config.optimizer.wd_mults = optim.MAE_PRETRAIN_WD_MULTS
  return config


def mae_imagenet(variant: str, arg: str | None) -> ml_collections.ConfigDict:
  """MAE pretraining on ImageNet-1k as in He et al. 2022 (Table 8 / the official repo's PRETRAIN.md).

  Global batch 4096, AdamW (0.9, 0.95), weight decay 0.05, base lr 1.5e-4 scaled by batch/256, 40 warm-up
  epochs then half-cosine, 800 epochs, mask ratio 0.75, normalised-pixel loss, random-resized-crop
  scale (0.2, 1) bicubic + horizontal flip, decoder 512 wide and 8 deep.

  ``arg='local'`` keeps the data and the model's width but shrinks depth, batch and steps so the config
  runs in a minute on a CPU: a check of the set-up, not a recipe.
  """
  local = config_args.parse_arg(arg, local=False).local
  config = mae_config(variant)
  config.data.update(dict(
      source="tfds", dataset="imagenet2012", split="train", eval_split="validation", image_size=224,
      channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD, num_workers=16, prefetch=4))
  config.monitor.num_classes = 1000  # known, so the monitor need not read labels to find it
  config.batch_size = 4096
  config.num_epochs = 800
  config.schedule.warmup_epochs = 40.0
  config.checkpoint.every_steps = 1000
  config.log_every_steps = 100
  config.viz_every_steps = 5000
  if local:
    config.model.depth = 2
    config.method.decoder.update(dict(width=128, depth=1, num_heads=4, mlp_dim=512))
    config.data.update(dict(image_size=4 * vit.parse_variant(variant)["patch_size"], num_workers=0, prefetch=1))
    config.batch_size = 8
    config.total_steps = 20
    config.checkpoint.every_steps = 10
    config.log_every_steps = 5
    config.viz_every_steps = 10
  return config_lib.finalize(config)


def mae_fashion_mnist() -> ml_collections.ConfigDict:
  """The quick start: MAE with a ViT-Ti/4 of 4 blocks on 28x28 Fashion-MNIST, 2 epochs on a CPU.

  Ends with kNN and linear-probe accuracy of the trained encoder beside a random one's (banks and probes
  from the first 10k training images; the command `configs/eval.py` uses all 60k). Returned
  unlocked, for the config files to adjust and `config.finalize`.
  """
  config = mae_config("Ti/4")
  config.model.depth = 4
  config.method.decoder.update(dict(width=128, depth=2, num_heads=4, mlp_dim=512))
  config.data.augment.crop_scale = (0.35, 1.0)
  config.batch_size = 256
  config.num_epochs = 2
  config.optimizer.base_lr = 1e-3
  config.schedule.warmup_epochs = 0.2
  config.checkpoint.every_steps = 200
  config.log_every_steps = 20
  config.viz_every_steps = 200
  config.eval.after_pretrain = True
  config.eval.max_train_examples = 10_000  # keeps the report to ~2 minutes on 2 cores; full test split
  config.monitor.update(dict(knn_train_examples=2000, knn_test_examples=1000))  # ~5 s per report
  return config


def supervised_resnet_fashion_mnist() -> ml_collections.ConfigDict:
  """Supervised ResNet-18 (small-image stem, zero-initialised last BN scales) on Fashion-MNIST, 2 epochs.

  The fine-tuning bundle trained from scratch: SGD with Nesterov momentum 0.9, lr 0.1 x batch / 256 with a
  0.2-epoch warm-up then half-cosine, weight decay 5e-4 on kernels, label smoothing 0.1 without mixing,
  random crops (scale 0.35-1) and flips; held-out top-1 every epoch, the monitors on. Unlocked.
  """
  config = config_lib.base_config()
  config.task = "finetune"
  config.model = models.default_config("resnet", variant="18", small_images=True, zero_init_last_bn=True)
  config.data = mae_fashion_mnist().data
  config.data.augmentation = "random_resized_crop(28, scale=(0.35, 1))|hflip"
  config.method = finetune.default_config()
  config.method.update(dict(num_classes=10, mixup_alpha=0.0, cutmix_alpha=0.0))
  config.optimizer.update(dict(name="sgd", base_lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4))
  config.schedule.update(dict(warmup_epochs=0.2, min_lr=0.0))
  config.batch_size = 256
  config.num_epochs = 2
  config.eval.every_epochs = 1.0
  config.checkpoint.best_metric = "eval/top1"
  config.checkpoint.every_steps = 200
  config.log_every_steps = 20
  config.monitor.update(dict(knn_train_examples=2000, knn_test_examples=1000))
  return config
