"""Published training recipes shared by several run configs in ``configs/``."""
from __future__ import annotations

from typing import Callable

import ml_collections

from sslx import config as config_lib
from sslx import config_args
from sslx import methods
from sslx import models
from sslx import optim
from sslx.methods import finetune
from sslx.models import heads
from sslx.models import vit

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def use_imagenet(config: ml_collections.ConfigDict) -> None:
  """ImageNet-1k from TFDS (``imagenet2012``) at 224 px with its mean and std, 16 decoding workers."""
  config.data.update(dict(
      source="tfds", dataset="imagenet2012", split="train", eval_split="validation", image_size=224,
      channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD, num_workers=16, prefetch=4))
  config.monitor.num_classes = 1000  # known, so the monitor need not read labels to find it


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
  use_imagenet(config)
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
    shrink_run_length(config)
    config.viz_every_steps = 10
  return config_lib.finalize(config)


def fashion_mnist_run(config: ml_collections.ConfigDict) -> None:
  """The CPU run of the quick start and of the tokenizer beside it: 2 epochs at batch 256, AdamW's lr 1e-3 after
  a 0.2-epoch warm-up, a checkpoint and pictures every 200 steps, a log line every 20."""
  config.batch_size = 256
  config.num_epochs = 2
  config.optimizer.base_lr = 1e-3
  config.schedule.warmup_epochs = 0.2
  config.checkpoint.every_steps = 200
  config.log_every_steps = 20
  config.viz_every_steps = 200


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
  fashion_mnist_run(config)
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


def simclr_view(size: int, *, color_strength: float = 1.0) -> str:
  """SimCLR's augmentation of one view (Chen et al. 2020, Appendix A): random resized crop of 8-100% of the
  area, flip, colour jitter of strength s (0.8 s, 0.8 s, 0.8 s, 0.2 s) with probability 0.8, grayscale with
  probability 0.2, Gaussian blur (sigma in [0.1, 2], kernel ~10% of the side) with probability 0.5."""
  return (f"random_resized_crop({size}, scale=(0.08, 1.0), interpolation='bicubic')|hflip"
          f"|color_jitter({color_strength}, p=0.8)|grayscale(p=0.2)|blur(p=0.5, sigma=(0.1, 2.0))")


def mocov2_view(size: int) -> str:
  """MoCo v2's "aug+" (its main_moco.py): random resized crop of 20-100% (bilinear), colour jitter (0.4, 0.4,
  0.4, 0.1) with probability 0.8, grayscale 0.2, Gaussian blur (sigma in [0.1, 2]) 0.5, flip. MoCo blurs
  with PIL's radius-sigma filter; ours is SimCLR's kernel of ~10% of the side."""
  return (f"random_resized_crop({size}, scale=(0.2, 1.0), interpolation='bilinear')"
          "|color_jitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8)|grayscale(p=0.2)"
          "|blur(p=0.5, sigma=(0.1, 2.0))|hflip")


# Fashion-MNIST is 28x28 grey garments, centred: no saturation, hue or grayscale to vary, and at 28 px a
# blur (a 3 px kernel) smooths away much of the little texture there is (SimCLR drops blur on CIFAR too).
# Crops keep at least 20% of the area (8% of 28 px is an 8x8 patch, often blank background), flips keep the
# label, and brightness / contrast jitter is the photometric change a grey image has.
FASHION_MNIST_VIEW = ("random_resized_crop(28, scale=(0.2, 1.0))|hflip"
                      "|color_jitter(brightness=0.4, contrast=0.4, saturation=0.0, hue=0.0, p=0.8)")


def _resnet50_imagenet(method: str, view: Callable[[int], str]) -> ml_collections.ConfigDict:
  """ResNet-50 and ``method`` on ImageNet with two views made by ``view(size)``."""
  config = config_lib.base_config()
  config.model = models.default_config("resnet", variant="50")
  config.method = methods.default_config(method)
  use_imagenet(config)
  config.data.views = (view(config.data.image_size),) * 2
  config.checkpoint.every_steps = 1000
  config.log_every_steps = 100
  return config


def shrink_run_length(config: ml_collections.ConfigDict) -> None:
  """The run length of every ``:local`` variant: batch 8, 20 steps, a checkpoint every 10, a log line every 5."""
  config.batch_size = 8
  config.total_steps = 20
  config.checkpoint.every_steps = 10
  config.log_every_steps = 5


def _shrink_for_cpu(config: ml_collections.ConfigDict, view: Callable[[int], str]) -> None:
  """``:local``: ResNet-50 at width 8 on 32 px crops, batch 8, 20 steps: a check of the set-up, not a
  recipe."""
  config.model.width = 8
  config.data.update(dict(image_size=32, num_workers=0, prefetch=1))
  config.data.views = (view(32),) * 2
  shrink_run_length(config)


def simclr_imagenet(arg: str | None) -> ml_collections.ConfigDict:
  """SimCLR ResNet-50 pretraining on ImageNet-1k as in Chen et al. 2020 (v1 Appendix B.1; v2's head).

  Global batch 4096, two `simclr_view` views (colour strength 1), NT-Xent at temperature 0.1, SimCLR v2's
  3-layer projection head (2048-2048-128, BatchNorm on every layer); LARS (momentum 0.9, trust coefficient
  0.001) with lr 0.3 x batch / 256, or with ``lr=sqrt`` 0.075 x sqrt(batch) (the paper's choice for small
  batches and long runs), 10 warm-up epochs then half-cosine to 0, weight decay 1e-6 on kernels only
  (biases and BatchNorm parameters neither decay nor get LARS's trust ratio, as in the reference code).

  Arguments: ``epochs=N`` (default 100; the paper's best ResNet-50 ran 1000); ``lr=linear|sqrt``;
  ``head=v2|v1`` (v1: the 2-layer head); ``local``: see `_shrink_for_cpu`.
  """
  args = config_args.parse_arg(arg, local=False, epochs=100, lr="linear", head="v2",
                               choices=dict(lr=("linear", "sqrt"), head=("v2", "v1")))
  config = _resnet50_imagenet("simclr", simclr_view)
  config.method.head = heads.simclr_v2_head() if args.head == "v2" else heads.simclr_v1_head()
  config.batch_size = 4096
  config.num_epochs = args.epochs
  config.optimizer.update(dict(name="lars", base_lr=0.3, momentum=0.9, weight_decay=1e-6,
                               wd_mults=optim.DEFAULT_WD_MULTS))
  if args.lr == "sqrt":
    config.optimizer.update(dict(base_lr=0.075, lr_batch_base=1, lr_scaling="sqrt"))
  config.schedule.update(dict(warmup_epochs=10.0, min_lr=0.0))
  if args.local:
    _shrink_for_cpu(config, simclr_view)
  return config_lib.finalize(config)


def mocov2_imagenet(arg: str | None) -> ml_collections.ConfigDict:
  """MoCo v2 ResNet-50 pretraining on ImageNet-1k as in Chen et al. 2020 (facebookresearch/moco).

  Global batch 256, two `mocov2_view` ("aug+") views, InfoNCE at temperature 0.2 against a queue of 65,536
  keys, key encoder momentum 0.999, 2-layer head (2048-2048-128, no BatchNorm), BatchNorm in 8 groups of 32
  (MoCo's 8 GPUs) with the keys' groups shuffled; SGD (momentum 0.9) with lr 0.03 x batch / 256, no warm-up,
  half-cosine to 0 over 200 epochs, weight decay 1e-4 on every parameter (torch's SGD decays them all).

  Arguments: ``epochs=N`` (default 200; MoCo v2's best ran 800); ``local``: see `_shrink_for_cpu` (and a
  queue of 4 batches in 2 BatchNorm groups).
  """
  args = config_args.parse_arg(arg, local=False, epochs=200)
  config = _resnet50_imagenet("moco", mocov2_view)
  config.batch_size = 256
  config.num_epochs = args.epochs
  config.optimizer.update(dict(name="sgd", base_lr=0.03, momentum=0.9, weight_decay=1e-4,
                               wd_mults=((".*", 1.0),)))
  config.schedule.update(dict(warmup_epochs=0.0, min_lr=0.0))
  config.model.bn_groups = 8
  if args.local:
    _shrink_for_cpu(config, mocov2_view)
    config.method.queue_size = 32
    config.model.bn_groups = 2
  return config_lib.finalize(config)


def byol_view(size: int, *, blur: float = 1.0, solarize: float = 0.0) -> str:
  """One of BYOL's two views (Grill et al. 2020, Table 6; deepmind-research ``byol/utils/augmentations.py``):
  random resized crop of 8-100% (bicubic), flip, colour jitter (0.4, 0.4, 0.2, 0.1) with probability 0.8,
  grayscale 0.2, Gaussian blur (sigma in [0.1, 2], kernel ~10% of the side) with probability ``blur``,
  solarisation (of the pixels >= 128) with probability ``solarize``. The defaults are view 1's; `byol_views`
  gives the pair. The reference shifts brightness by an added delta; ours scales it, as torchvision."""
  return (f"random_resized_crop({size}, scale=(0.08, 1.0), interpolation='bicubic')|hflip"
          "|color_jitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, p=0.8)|grayscale(p=0.2)"
          f"|blur(p={blur}, sigma=(0.1, 2.0))|solarize(p={solarize})")


def byol_views(size: int) -> tuple[str, str]:
  """BYOL's asymmetric pair: view 1 always blurred and never solarised, view 2 blurred with probability 0.1
  and solarised with probability 0.2."""
  return byol_view(size, blur=1.0, solarize=0.0), byol_view(size, blur=0.1, solarize=0.2)


# BYOL's published hyper-parameters by run length in epochs (deepmind-research byol/configs/byol.py): LARS base
# lr (x batch / 256), weight decay, target momentum tau_0. The paper's headline ResNet-50 ran 1000 epochs.
BYOL_PRESETS = {40: (0.45, 1e-6, 0.97), 100: (0.45, 1e-6, 0.99), 300: (0.3, 1e-6, 0.99),
                1000: (0.2, 1.5e-6, 0.996)}


def byol_imagenet(arg: str | None) -> ml_collections.ConfigDict:
  """BYOL ResNet-50 pretraining on ImageNet-1k as in Grill et al. 2020 (deepmind-research ``byol/``).

  Global batch 4096, the two `byol_views`, projector and predictor 4096-256 (`sslx.models.heads.byol_head`);
  LARS (momentum 0.9, trust coefficient 0.001) with 10 warm-up epochs then half-cosine to 0, biases and
  BatchNorm parameters out of weight decay and LARS's trust ratio (as the reference's
  ``exclude_bias_and_norm``). Learning rate, weight decay and tau_0 by run length (`BYOL_PRESETS`): the
  paper's 1000 epochs 0.2 x batch / 256, 1.5e-6, 0.996; 300 epochs 0.3, 1e-6, 0.99. A run length between
  the published ones takes the presets of the longest published run it reaches (below 40 epochs: 40's).

  Arguments: ``epochs=N`` (default 300); ``local``: see `_shrink_for_cpu`.
  """
  args = config_args.parse_arg(arg, local=False, epochs=300)
  base_lr, weight_decay, momentum = BYOL_PRESETS[max((e for e in BYOL_PRESETS if e <= args.epochs), default=40)]
  config = _resnet50_imagenet("byol", byol_view)
  config.batch_size = 4096
  config.num_epochs = args.epochs
  config.method.momentum = momentum
  config.optimizer.update(dict(name="lars", base_lr=base_lr, momentum=0.9, weight_decay=weight_decay,
                               wd_mults=optim.DEFAULT_WD_MULTS))
  config.schedule.update(dict(warmup_epochs=10.0, min_lr=0.0))
  if args.local:
    _shrink_for_cpu(config, byol_view)
  config.data.views = byol_views(config.data.image_size)
  return config_lib.finalize(config)


def _contrastive_fashion_mnist(method: str) -> ml_collections.ConfigDict:
  """A ResNet-18 with the small-image stem at half width (32: 256 features) on two `FASHION_MNIST_VIEW`
  views of Fashion-MNIST, batch 256, 2 epochs, ending with kNN and linear-probe accuracy beside a random
  encoder's (as the MAE quick start)."""
  config = config_lib.base_config()
  config.model = models.default_config("resnet", variant="18", small_images=True, width=32)
  config.method = methods.default_config(method)
  config.data.views = (FASHION_MNIST_VIEW,) * 2
  config.batch_size = 256
  config.num_epochs = 2
  config.checkpoint.every_steps = 200
  config.log_every_steps = 20
  config.eval.after_pretrain = True
  config.eval.max_train_examples = 10_000
  config.monitor.update(dict(knn_train_examples=2000, knn_test_examples=1000))
  return config


def shrink_test_run(config: ml_collections.ConfigDict) -> None:
  """The run of every Fashion-MNIST ``:test`` variant: 6 steps at batch 32, a checkpoint every 3, a log line
  every 2, no evaluation at the end, small monitor subsets."""
  config.batch_size = 32
  config.total_steps = 6
  config.checkpoint.every_steps = 3
  config.log_every_steps = 2
  config.eval.after_pretrain = False
  config.monitor.update(dict(knn_train_examples=200, knn_test_examples=100))


def shrink_fashion_mnist_for_tests(config: ml_collections.ConfigDict) -> None:
  """``:test`` of the contrastive Fashion-MNIST configs: `shrink_test_run` with a ResNet-18 of width 8."""
  shrink_test_run(config)
  config.model.width = 8
  config.eval.batch_size = 100
  config.monitor.probe_batch_size = 8


def simclr_fashion_mnist() -> ml_collections.ConfigDict:
  """SimCLR on Fashion-MNIST (`_contrastive_fashion_mnist`): the SimCLR v2 head at the encoder's width
  (256-256-128), temperature 0.2, LARS lr 0.5 x batch / 256 with a 0.2-epoch warm-up, weight decay 1e-6 on
  kernels. Chosen for a 2-epoch CPU run, not tuned. Unlocked."""
  config = _contrastive_fashion_mnist("simclr")
  config.method.temperature = 0.2
  config.optimizer.update(dict(name="lars", base_lr=0.5, momentum=0.9, weight_decay=1e-6))
  config.schedule.update(dict(warmup_epochs=0.2, min_lr=0.0))
  return config


def simclr_vit_fashion_mnist() -> ml_collections.ConfigDict:
  """SimCLR on Fashion-MNIST with the quick start's encoder (`mae_fashion_mnist`: a ViT-Ti/4 of 4 blocks), so
  it sits on one table with MAE and the pretext tasks: `simclr_fashion_mnist`'s views, head and temperature,
  and MoCo v3's ViT optimizer (LARS is a ResNet recipe): AdamW lr 1e-3 x batch / 256, betas (0.9, 0.999),
  weight decay 0.1 on every parameter, a 0.2-epoch warm-up. Chosen for a CPU run, not tuned. Unlocked."""
  config = simclr_fashion_mnist()
  config.model = mae_fashion_mnist().model
  config.optimizer.update(dict(name="adamw", base_lr=1e-3, lr_batch_base=256, b1=0.9, b2=0.999,
                               weight_decay=0.1, wd_mults=((".*", 1.0),)))
  return config


def mocov2_fashion_mnist() -> ml_collections.ConfigDict:
  """MoCo v2 on Fashion-MNIST (`_contrastive_fashion_mnist`): a queue of 4096 keys (16 batches, 7% of the
  training set), key momentum 0.99 (0.999 would average over more steps than the 468 of the run),
  temperature 0.2, the 2-layer head at 512-128, 8 BatchNorm groups of 32; SGD lr 0.3 x batch / 256 with a
  0.2-epoch warm-up, momentum 0.9, weight decay 5e-4 on every parameter. At lr 0.06 without warm-up the
  contrastive top-1 fell to 0.02 after step 60 and the kNN monitor to 65.4 after one epoch (72.0 at lr 0.3;
  docs/benchmarks.md). Unlocked."""
  config = _contrastive_fashion_mnist("moco")
  config.method.update(dict(queue_size=4096, momentum=0.99))
  config.method.head.hidden_dim = 512
  config.model.bn_groups = 8
  config.optimizer.update(dict(name="sgd", base_lr=0.3, momentum=0.9, weight_decay=5e-4,
                               wd_mults=((".*", 1.0),)))
  config.schedule.update(dict(warmup_epochs=0.2, min_lr=0.0))
  return config


def byol_fashion_mnist() -> ml_collections.ConfigDict:
  """BYOL on Fashion-MNIST (`_contrastive_fashion_mnist`): both views the grey-image `FASHION_MNIST_VIEW`
  (no saturation, hue, grayscale or blur, and no solarisation: BYOL's asymmetry lives in blur and solarise),
  projector and predictor 512-128 (512 = twice the 256 features, as 4096 is twice ResNet-50's 2048), tau_0 =
  0.99 (the run is 468 steps); LARS lr 0.45 x batch / 256 (the reference's shortest-run preset) with a
  0.2-epoch warm-up, weight decay 1e-6 on kernels. Chosen for a 2-epoch CPU run, not tuned. Unlocked."""
  config = _contrastive_fashion_mnist("byol")
  config.method.momentum = 0.99
  config.method.projector = heads.byol_head(hidden_dim=512, out_dim=128)
  config.method.predictor = heads.byol_head(hidden_dim=512, out_dim=128)
  config.optimizer.update(dict(name="lars", base_lr=0.45, momentum=0.9, weight_decay=1e-6,
                               wd_mults=optim.DEFAULT_WD_MULTS))
  config.schedule.update(dict(warmup_epochs=0.2, min_lr=0.0))
  return config
