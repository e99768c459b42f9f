"""Recipes of video colourisation (Vondrick et al., ECCV 2018), shared by the configs in ``configs/``.

What the paper states and these recipes keep: 256 x 256 frames, clips of 4 frames (3 references + 1 target),
64-wide embeddings, softmax temperature 1, 16 colour clusters (k-means of Lab's ab), Adam. The paper's
batch 32, learning rate 1e-3 and Kinetics at 6 frames per second are as we recall it and were not checked
against the text. Its embedding network is a ResNet-18 (strides changed to give a 32 x 32 map) followed by
3D convolutions over the clip; here the registry's ResNet-18 with the small-image stem (no stride-2 stem, no
max-pool: overall stride 8, so 256 px frames also give 32 x 32) embeds each frame alone, followed by a 1 x 1
projection, and there are no 3D convolutions.

The online probe, the kNN monitor and the evaluation after pretraining need labelled images, which video
sources do not have: the recipes switch them off (the label-free diagnostics could still run on each
clip's first frame with ``--config.monitor.every_steps=N``). Label propagation is scored by
``experiments/video_propagation.py``.
"""
from __future__ import annotations

import ml_collections

from sslx import config as config_lib
from sslx import methods
from sslx import models
from sslx.data import video

KINETICS_MEAN = (0.45, 0.45, 0.45)  # Kinetics' usual statistics (PyTorchVideo's)
KINETICS_STD = (0.225, 0.225, 0.225)


def video_run_without_image_monitors(config: ml_collections.ConfigDict) -> None:
  """No online probe, no kNN / diagnostics monitor, no evaluation after pretraining, no held-out split."""
  config.monitor.update(dict(online_probe=False, every_steps=0))
  config.eval.after_pretrain = False
  config.data.eval_split = None


def adam(config: ml_collections.ConfigDict, lr: float) -> None:
  """Adam (AdamW without weight decay, betas 0.9 / 0.999) at ``lr`` for the config's (final) batch size,
  constant after the warm-up."""
  config.optimizer.update(dict(name="adamw", base_lr=lr, lr_batch_base=config.batch_size, b1=0.9, b2=0.999,
                               weight_decay=0.0, wd_mults=()))
  config.schedule.update(dict(decay="cosine", min_lr=lr))


def video_colorization_synthetic(test: bool = False) -> ml_collections.ConfigDict:
  """Video colourisation on synthetic sprite videos (`sslx.data.video.synthetic_video`), a CPU run.

  32 px frames, clips of 4 consecutive frames, 3 sprites; a ViT-Ti/4 of 4 blocks at width 96 (an 8 x 8
  grid of embeddings), embeddings 32 wide; batch 32, Adam lr 1e-3 after a 0.05-epoch warm-up, 1500 steps
  (about 10 minutes on 2 cores); no cropping or flipping (the sprites' motion is the signal). Chosen for a
  short CPU run, not tuned. ``test``: 6 steps of a one-block ViT of width 32 on 16 px frames. Unlocked.
  """
  config = config_lib.base_config()
  config.model = models.default_config("vit", variant="Ti/4", width=96, depth=4, num_heads=3, mlp_dim=384)
  config.method = methods.default_config("video_colorization")
  config.method.embed_dim = 32
  config.data.update(dict(source="synthetic_video", dataset="sprites", image_size=32, channels=3,
                          mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), synthetic_num_examples=20_000))
  config.data.augment.update(dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=False))
  video.add_video_keys(config.data, clip_length=4, frame_stride=1, num_sprites=3)
  video_run_without_image_monitors(config)
  config.batch_size = 32
  config.total_steps = 1500
  config.checkpoint.every_steps = 500
  config.log_every_steps = 50
  if test:
    config.model.update(dict(width=32, depth=1, num_heads=2, mlp_dim=64))
    config.method.update(dict(embed_dim=8, color_sample_clips=8, color_sample_pixels=2000))
    config.data.update(dict(image_size=16, synthetic_num_examples=64))
    config.batch_size = 8
    config.total_steps = 6
    config.checkpoint.every_steps = 3
    config.log_every_steps = 2
  adam(config, 1e-3)
  config.schedule.warmup_epochs = 0.05
  return config


def video_colorization_kinetics(local: bool = False) -> ml_collections.ConfigDict:
  """Video colourisation on a Kinetics-like folder of videos (frame folders or video files, under
  ``--config.data.data_dir``), with the paper's settings as far as stated (module docstring).

  256 x 256 frames (each frame squashed to a square, no crop or flip), clips of 4 frames 4 apart (25 fps
  video sampled at about 6 fps), ResNet-18 with the small-image stem (32 x 32 embeddings), batch 32, Adam lr
  1e-3, 400k steps. ``local``: ResNet-18 at width 8 on 32 px frames, batch 8, 20 steps: a check of the
  set-up on a CPU, not a recipe. Unlocked.
  """
  config = config_lib.base_config()
  config.model = models.default_config("resnet", variant="18", small_images=True)
  config.method = methods.default_config("video_colorization")
  config.data.update(dict(source="video_folder", dataset="kinetics", image_size=256, channels=3,
                          mean=KINETICS_MEAN, std=KINETICS_STD, num_workers=16, prefetch=4))
  config.data.augment.update(dict(crop_scale=(1.0, 1.0), crop_ratio=(0.1, 10.0), hflip=False,
                                  interpolation="bilinear"))
  video.add_video_keys(config.data, clip_length=4, frame_stride=4)
  video_run_without_image_monitors(config)
  config.batch_size = 32
  config.total_steps = 400_000
  config.checkpoint.every_steps = 5000
  config.log_every_steps = 100
  if local:
    config.model.width = 8
    config.method.color_sample_clips = 8
    config.data.update(dict(image_size=32, num_workers=0, prefetch=1))
    config.batch_size = 8
    config.total_steps = 20
    config.checkpoint.every_steps = 10
    config.log_every_steps = 5
  adam(config, 1e-3)
  config.schedule.warmup_epochs = 0.0
  return config
