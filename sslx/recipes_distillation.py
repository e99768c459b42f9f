"""Published recipes of the teacher-student methods (MoCo v3, DINO) shared by run configs in ``configs/``.

They build on `sslx.recipes` (ImageNet data, the CPU shrink, the Fashion-MNIST base) and add each method's
optimizer, schedules and views.
"""
from __future__ import annotations

import ml_collections

from sslx import config as config_lib
from sslx import config_args
from sslx import models
from sslx import optim
from sslx import recipes
from sslx.methods import dino
from sslx.methods import mocov3
from sslx.models import dino_head
from sslx.models import heads


def mocov3_views(size: int, crop_min: float = 0.08) -> tuple[str, str]:
  """MoCo v3's two views (moco-v3 ``main_moco.py``, which follows BYOL's recipe): `recipes.byol_views` with
  random resized crops of ``crop_min``-100% of the area at torchvision's default (bilinear) interpolation.

  The ops after the crop are BYOL's: flip, colour jitter (0.4, 0.4, 0.2, 0.1) with probability 0.8, grayscale
  0.2, blur 1.0 / 0.1, solarisation 0 / 0.2. The reference flips last, which commutes with the others, and
  blurs with PIL's radius-sigma filter where ours is SimCLR's kernel of ~10% of the side.
  """
  crop = f"random_resized_crop({size}, scale=({crop_min}, 1.0), interpolation='bilinear')"
  return tuple("|".join([crop, *view.split("|")[1:]]) for view in recipes.byol_views(size))


def _mocov3_adamw(config: ml_collections.ConfigDict, *, base_lr: float, stop_grad_conv1: bool) -> None:
  """moco-v3's ViT optimizer: torch's AdamW as main_moco.py builds it (betas (0.9, 0.999), one parameter group,
  so weight decay 0.1 on every parameter), lr ``base_lr`` x batch / 256; with ``stop_grad_conv1`` the patch
  projection is frozen (no update, no weight decay, as torch skips parameters without a gradient)."""
  config.optimizer.update(dict(name="adamw", base_lr=base_lr, lr_batch_base=256, b1=0.9, b2=0.999,
                               weight_decay=0.1, wd_mults=((".*", 1.0),)))
  config.optimizer.frozen = (mocov3.PATCH_EMBED_PATTERN,) if stop_grad_conv1 else ()


def mocov3_vit_imagenet(variant: str, arg: str | None) -> ml_collections.ConfigDict:
  """MoCo v3 ViT pretraining on ImageNet-1k as in Chen, Xie & He 2021 (facebookresearch/moco-v3 CONFIG.md).

  Global batch 4096, the two `mocov3_views` (crops of 8-100%), temperature 0.2, momentum 0.99 rising to 1 by
  a half-cosine, projector 3 layers and predictor 2 (4096 hidden, 256 out); AdamW (`_mocov3_adamw`) with lr
  1.5e-4 x batch / 256, 40 warm-up epochs then half-cosine to 0, 300 epochs; stop-grad-conv1 (the patch
  projection frozen at its random initialisation). moco-v3's ViT-S/16 has 12 heads, not the usual 6.

  Arguments: ``variant=B/16|S/16`` (default ``variant``); ``epochs=N`` (default 300);
  ``stop_grad_conv1=true|false`` (default true); ``local``: `recipes._shrink_for_cpu` with a ViT of width 8,
  2 blocks of 2 heads (32 px crops: 4 patches).
  """
  args = config_args.parse_arg(arg, local=False, epochs=300, variant=variant, stop_grad_conv1=True,
                               choices=dict(variant=("B/16", "S/16")))
  config = config_lib.base_config()
  config.model = models.default_config("vit", variant=args.variant)
  if args.variant == "S/16":
    config.model.num_heads = 12
  config.method = mocov3.default_config("vit")
  recipes.use_imagenet(config)
  config.batch_size = 4096
  config.num_epochs = args.epochs
  _mocov3_adamw(config, base_lr=1.5e-4, stop_grad_conv1=args.stop_grad_conv1)
  config.schedule.update(dict(warmup_epochs=40.0, min_lr=0.0))
  config.checkpoint.every_steps = 1000
  config.log_every_steps = 100
  if args.local:
    recipes._shrink_for_cpu(config, recipes.byol_view)
    config.model.update(dict(depth=2, num_heads=2, mlp_dim=32))
  config.data.views = mocov3_views(config.data.image_size)
  return config_lib.finalize(config)


# moco-v3's ResNet-50 hyper-parameters by run length in epochs (its CONFIG.md): LARS base lr (x batch / 256),
# weight decay, momentum m_0.
MOCOV3_RESNET_PRESETS = {100: (0.6, 1e-6, 0.99), 300: (0.3, 1e-6, 0.99), 1000: (0.3, 1.5e-6, 0.996)}


def mocov3_resnet50_imagenet(arg: str | None) -> ml_collections.ConfigDict:
  """MoCo v3 ResNet-50 pretraining on ImageNet-1k as in Chen, Xie & He 2021 (facebookresearch/moco-v3).

  Global batch 4096, the two `mocov3_views` with crops of 20-100% (CONFIG.md's ``--crop-min=.2``), temperature
  1.0, momentum m_0 rising to 1 by a half-cosine, projector 2 layers and predictor 2 without its last BatchNorm
  (4096 hidden, 256 out), residual branches starting at zero (torchvision's ``zero_init_residual``, as the
  reference builds it); LARS (momentum 0.9, trust coefficient 0.001) with 10 warm-up epochs then half-cosine to
  0, biases and BatchNorm parameters out of weight decay and the trust ratio (the reference's LARS skips every
  parameter of <= 1 dimension). lr, weight decay and m_0 by run length (`MOCOV3_RESNET_PRESETS`): 100 epochs
  0.6 x batch / 256, 1e-6, 0.99; 300: 0.3, 1e-6, 0.99; 1000: 0.3, 1.5e-6, 0.996. A run length between the
  published ones takes the presets of the longest published run it reaches (below 100 epochs: 100's).

  Arguments: ``epochs=N`` (default 100); ``local``: see `recipes._shrink_for_cpu`.
  """
  args = config_args.parse_arg(arg, local=False, epochs=100)
  published = max((e for e in MOCOV3_RESNET_PRESETS if e <= args.epochs), default=100)
  base_lr, weight_decay, momentum = MOCOV3_RESNET_PRESETS[published]
  config = recipes._resnet50_imagenet("mocov3", recipes.byol_view)
  config.method = mocov3.default_config("resnet")
  config.method.momentum = momentum
  config.model.zero_init_last_bn = True
  config.batch_size = 4096
  config.num_epochs = args.epochs
  config.optimizer.update(dict(name="lars", base_lr=base_lr, momentum=0.9, weight_decay=weight_decay,
                               wd_mults=optim.DEFAULT_WD_MULTS))
  config.schedule.update(dict(warmup_epochs=10.0, min_lr=0.0))
  if args.local:
    recipes._shrink_for_cpu(config, recipes.byol_view)
  config.data.views = mocov3_views(config.data.image_size, crop_min=0.2)
  return config_lib.finalize(config)


def mocov3_fashion_mnist() -> ml_collections.ConfigDict:
  """MoCo v3 on Fashion-MNIST with the quick start's encoder (`recipes.mae_fashion_mnist`: a ViT-Ti/4 of 4 blocks
  at 28 px), otherwise as `recipes._contrastive_fashion_mnist` (batch 256, 2 epochs, kNN and linear probe at the
  end).

  Views: both the grey-image `recipes.FASHION_MNIST_VIEW` (crop of 20-100%, flip, brightness and contrast
  jitter): no saturation, hue, grayscale, blur or solarisation on 28 px grey garments, so the two views are
  drawn alike (MoCo v3's ImageNet views differ only in blur and solarisation). Projector 3 layers and predictor
  2, 512 hidden, 128 out; temperature 0.2; m_0 = 0.99 (the run is 468 steps); AdamW lr 1e-3 x batch / 256
  (the quick start's) with a 0.2-epoch warm-up, weight decay 0.1, the patch projection frozen. Chosen for a
  2-epoch CPU run, not tuned. Unlocked.
  """
  config = recipes._contrastive_fashion_mnist("mocov3")
  config.model = recipes.mae_fashion_mnist().model
  config.method.projector = heads.mocov3_head(3, hidden_dim=512, out_dim=128)
  config.method.predictor = heads.mocov3_head(2, hidden_dim=512, out_dim=128)
  _mocov3_adamw(config, base_lr=1e-3, stop_grad_conv1=True)
  config.schedule.update(dict(warmup_epochs=0.2, min_lr=0.0))
  return config


# DINO decays what facebookresearch/dino's get_params_groups does: every parameter of more than one dimension
# (kernels, the class token, the learned position table, and the prototypes' norms g, which torch's weight_norm
# keeps as (K, 1)); biases and LayerNorm parameters do not decay.
DINO_WD_MULTS = ((".*/bias$", 0.0), (".*(kernel|_token|pos_embed)$", 1.0), (".*/last_layer/scale$", 1.0))


def dino_view(size: int, scale: tuple[float, float], *, blur: float, solarize: float = 0.0,
              grey: bool = False) -> str:
  """One DINO crop (main_dino.py's ``DataAugmentationDINO``): random resized crop of ``scale`` of the area
  (bicubic), flip, colour jitter (0.4, 0.4, 0.2, 0.1) with probability 0.8, grayscale 0.2, Gaussian blur (sigma
  in [0.1, 2]) with probability ``blur``, solarisation with probability ``solarize``. ``grey`` images get
  brightness and contrast jitter only (no saturation, hue or grayscale to vary). `dino_views` gives the set."""
  colour = ("color_jitter(brightness=0.4, contrast=0.4, saturation=0.0, hue=0.0, p=0.8)" if grey else
            "color_jitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, p=0.8)|grayscale(p=0.2)")
  return (f"random_resized_crop({size}, scale={tuple(map(float, scale))!r}, interpolation='bicubic')|hflip"
          f"|{colour}|blur(p={blur}, sigma=(0.1, 2.0))|solarize(p={solarize})")


def dino_views(global_size: int, local_size: int, num_local: int, *, global_scale=(0.4, 1.0),
               local_scale=(0.05, 0.4), blur: bool = True, grey: bool = False) -> tuple[str, ...]:
  """DINO's multi-crop: global crop 1 always blurred; global crop 2 blurred with probability 0.1 and solarised
  with probability 0.2; ``num_local`` local crops blurred with probability 0.5 (``blur=False``: never blurred)."""
  def view(size, scale, blur_p, solarize=0.0):
    return dino_view(size, scale, blur=blur_p if blur else 0.0, solarize=solarize, grey=grey)

  return (view(global_size, global_scale, 1.0), view(global_size, global_scale, 0.1, 0.2),
          *[view(local_size, local_scale, 0.5)] * num_local)


def freeze_last_layer(config: ml_collections.ConfigDict, epochs: float) -> None:
  """DINO's frozen prototypes: ``config.method.freeze_last_layer_epochs`` and the optimizer rule that goes with
  it (`sslx.methods.dino` validates that the two agree)."""
  config.method.freeze_last_layer_epochs = float(epochs)
  config.optimizer.freeze_epochs = ((dino_head.LAST_LAYER_PATTERN, float(epochs)),)


def _dino_config(variant: str) -> ml_collections.ConfigDict:
  """A ViT of ``variant`` (learned position table, drop path 0.1) under DINO with main_dino.py's defaults: AdamW
  (torch's betas 0.9, 0.999) with lr 5e-4 x batch / 256, 10 warm-up epochs then half-cosine to 1e-6, weight
  decay 0.04 -> 0.4 by a half-cosine (`DINO_WD_MULTS`), gradients clipped at norm 3, the last layer frozen for
  1 epoch. Unlocked."""
  config = config_lib.base_config()
  config.model = models.default_config("vit", variant=variant, pos_embed="learned", drop_path_rate=0.1)
  config.method = dino.default_config()
  config.optimizer.update(dict(name="adamw", base_lr=5e-4, lr_batch_base=256, b1=0.9, b2=0.999, weight_decay=0.04,
                               weight_decay_end=0.4, wd_mults=DINO_WD_MULTS, grad_clip_norm=3.0))
  config.schedule.update(dict(warmup_epochs=10.0, min_lr=1e-6))
  freeze_last_layer(config, 1)
  return config


# The released checkpoints' arguments (the args.txt of each, linked from facebookresearch/dino's README), where
# they differ from the paper's setting of `dino_vit_imagenet`: epochs, lr, min_lr, gradient clip (0: none),
# teacher temperature warm-up epochs, last layer frozen epochs, local crops, crop scales, norm_last_layer.
DINO_PUBLISHED = {
    "S/16": dict(epochs=800, base_lr=5e-4, min_lr=1e-5, grad_clip_norm=None, teacher_temp_warmup_epochs=30,
                 freeze_last_layer_epochs=1, local_crops=10, global_scale=(0.25, 1.0), local_scale=(0.05, 0.25),
                 norm_last_layer=False),
    "B/16": dict(epochs=400, base_lr=7.5e-4, min_lr=2e-6, grad_clip_norm=0.3, teacher_temp_warmup_epochs=50,
                 freeze_last_layer_epochs=3, local_crops=10, global_scale=(0.25, 1.0), local_scale=(0.05, 0.25),
                 norm_last_layer=True),
}


def _int_argument(args: ml_collections.ConfigDict, key: str, default: int) -> int:
  """A config argument whose default is None (text when given) as an int, else ``default``."""
  return default if args[key] is None else config_args.parse_arg(f"{key}={args[key]}", **{key: 0})[key]


def dino_vit_imagenet(variant: str, arg: str | None) -> ml_collections.ConfigDict:
  """DINO ViT pretraining on ImageNet-1k as in Caron et al. 2021 (Section 4's implementation details;
  facebookresearch/dino main_dino.py's defaults).

  Global batch 1024, 2 global crops of 224 px (40-100% of the area) and 8 local crops of 96 px (5-40%) made by
  `dino_views`; head 2048-2048-256 onto K = 65,536 prototypes; student temperature 0.1, teacher 0.04 -> 0.07
  over 30 epochs, centre momentum 0.9, teacher momentum 0.996 rising to 1; `_dino_config`'s AdamW; 100 epochs.
  The prototypes' norms are trained for ViT-S/16 (``norm_last_layer=False``) and fixed for ViT-B/16, as the
  reference advises (training them is "only safe" with ViT-S). main_dino.py clips each parameter's gradient
  norm on its own; sslx clips the global norm.

  Arguments: ``published``: the released checkpoint's arguments instead (`DINO_PUBLISHED`: ViT-S/16 800 epochs,
  no clipping, 10 local crops of 5-25%, global crops of 25-100%; ViT-B/16 400 epochs, lr 7.5e-4, clip 0.3,
  teacher warm-up 50 epochs, last layer frozen 3 epochs); ``epochs=N`` (default: the recipe's);
  ``local_crops=N`` (default 8, published 10; 0: no multi-crop); ``local``: `recipes._shrink_for_cpu` with a
  ViT of width 8, 2 blocks of 2 heads, 2 global crops of 32 px and 2 local crops of 16 px, a head of 64-64-32
  onto 256 prototypes.
  """
  args = config_args.parse_arg(arg, local=False, published=False, epochs=None, local_crops=None)
  published = DINO_PUBLISHED[variant] if args.published else {}
  config = _dino_config(variant)
  recipes.use_imagenet(config)
  config.batch_size = 1024
  config.num_epochs = _int_argument(args, "epochs", published.get("epochs", 100))
  config.method.head.norm_last_layer = published.get("norm_last_layer", variant != "S/16")
  if args.published:
    config.optimizer.update(dict(base_lr=published["base_lr"], grad_clip_norm=published["grad_clip_norm"]))
    config.schedule.min_lr = published["min_lr"]
    config.method.teacher_temp_warmup_epochs = float(published["teacher_temp_warmup_epochs"])
    freeze_last_layer(config, published["freeze_last_layer_epochs"])
  config.checkpoint.every_steps = 1000
  config.log_every_steps = 100
  num_local = _int_argument(args, "local_crops", published.get("local_crops", 8))
  scales = dict(global_scale=published.get("global_scale", (0.4, 1.0)),
                local_scale=published.get("local_scale", (0.05, 0.4)))
  if args.local:
    recipes._shrink_for_cpu(config, recipes.byol_view)
    config.model.update(dict(depth=2, num_heads=2, mlp_dim=32))
    config.method.head.update(dict(out_dim=256, hidden_dim=64, bottleneck_dim=32))
    config.data.views = dino_views(32, 16, min(num_local, 2), **scales)
  else:
    config.data.views = dino_views(224, 96, num_local, **scales)
  return config_lib.finalize(config)


def dino_fashion_mnist() -> ml_collections.ConfigDict:
  """DINO on Fashion-MNIST with the quick start's encoder (`recipes.mae_fashion_mnist`: a ViT-Ti/4 of 4 blocks at
  28 px, here with a learned position table and drop path 0.1), otherwise as `recipes._contrastive_fashion_mnist`
  (batch 256, 2 epochs, kNN and linear probe at the end).

  Crops (`dino_views`, grey, unblurred: a blur at 28 px smooths away the little texture there is): 2 global of
  28 px (40-100% of the area) and 4 local of 16 px (10-40%: 5% of 28 px is mostly background), patch grids of
  7 x 7 and 4 x 4. Head 512-512-128 onto K = 4096 prototypes, with BatchNorm after its hidden layers (DINO's
  ``use_bn``, off in its ViT recipes); teacher temperature 0.04 throughout (main_dino.py's default; a
  warm-up to 0.07 over 0.6 epochs took the teacher's entropy to 90% of ln K within 90 steps), teacher momentum
  0.99 (0.996 averages over more steps than the 468 of the run), the last layer frozen for 0.2 epochs;
  `_dino_config`'s AdamW (lr 5e-4 x batch / 256) with a 0.2-epoch warm-up. Chosen for a 2-epoch CPU run.

  Why the BatchNorm: this encoder's pooled features share one large common component (a random init's feature
  vectors have a mean pairwise cosine of 0.52, their per-image spread is 5% of their norm), so without it
  every image's bottleneck points the same way, the teacher's logits differ between images by ~0.05 (cosines,
  at tau_t = 0.04), and once the prototypes start training its entropy climbs towards ln K (78% by step 117 of
  a one-epoch run, the kNN monitor 51.5 -> 54.5); with it the teacher stays sharper (54%) and the monitor reads
  57.6. Neither is learning as fast as MoCo v3 on the same encoder (69.9 at step 117): docs/benchmarks.md,
  2026-12-07. Unlocked.
  """
  config = recipes._contrastive_fashion_mnist("dino")
  base = _dino_config("Ti/4")
  config.model = recipes.mae_fashion_mnist().model
  config.model.update(dict(pos_embed="learned", drop_path_rate=0.1))
  config.optimizer, config.schedule = base.optimizer, base.schedule
  config.schedule.warmup_epochs = 0.2
  config.method.head = dino_head.dino_head_config(out_dim=4096, hidden_dim=512, bottleneck_dim=128,
                                                  batch_norm=True)
  config.method.update(dict(momentum=0.99, teacher_temperature=0.04, teacher_temp_warmup_epochs=0.0))
  freeze_last_layer(config, 0.2)
  config.data.views = dino_views(28, 16, 4, global_scale=(0.4, 1.0), local_scale=(0.1, 0.4), blur=False, grey=True)
  return config
