r"""DINO ViT-B/16 on ImageNet-1k (TFDS `imagenet2012`): global batch 1024, 2 global + 8 local crops, AdamW, 100 epochs.

  python -m sslx.main --config=configs/dino_vitb16.py --workdir=runs/dino_vitb16
  python -m sslx.main --config=configs/dino_vitb16.py:published --workdir=runs/dino_vitb16_400  # the release's
  python -m sslx.main --config=configs/dino_vitb16.py:local --workdir=/tmp/dino_local   # CPU check

The recipe and its arguments (``epochs=N``, ``local_crops=N``, ``published``, ``local``):
`sslx.recipes_distillation.dino_vit_imagenet`; the method: `sslx/methods/dino.py`.
"""
from sslx import recipes_distillation


def get_config(arg=None):
  return recipes_distillation.dino_vit_imagenet("B/16", arg)
