r"""DINO ViT-S/16 on ImageNet-1k (TFDS `imagenet2012`): global batch 1024, 2 global + 8 local crops, AdamW, 100 epochs.

  python -m sslx.main --config=configs/dino_vits16.py --workdir=runs/dino_vits16
  python -m sslx.main --config=configs/dino_vits16.py:epochs=300 --workdir=runs/dino_vits16_300
  python -m sslx.main --config=configs/dino_vits16.py:published --workdir=runs/dino_vits16_800  # the release's
  python -m sslx.main --config=configs/dino_vits16.py:local --workdir=/tmp/dino_local   # CPU check

The recipe and its arguments (``epochs=N``, ``local_crops=N``, ``published``, ``local``):
`sslx.recipes_distillation.dino_vit_imagenet`; the method: `sslx/methods/dino.py`. The teacher's attention maps
are drawn into ``<workdir>/pictures`` during training, and by ``python -m sslx.attention_maps --workdir=RUN``.
"""
from sslx import recipes_distillation


def get_config(arg=None):
  return recipes_distillation.dino_vit_imagenet("S/16", arg)
