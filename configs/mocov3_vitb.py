r"""MoCo v3 ViT-B/16 on ImageNet-1k (TFDS `imagenet2012`), global batch 4096, AdamW, 300 epochs.

  python -m sslx.main --config=configs/mocov3_vitb.py --workdir=runs/mocov3_vitb
  python -m sslx.main --config=configs/mocov3_vitb.py:variant=S/16 --workdir=runs/mocov3_vits   # ViT-S/16
  python -m sslx.main --config=configs/mocov3_vitb.py:local --workdir=/tmp/mocov3_vit_local   # CPU check

The recipe (stop-grad-conv1, momentum 0.99 -> 1, temperature 0.2, BYOL's asymmetric views) and its arguments
(``variant=``, ``epochs=N``, ``stop_grad_conv1=false``, ``local``): `sslx.recipes_distillation.mocov3_vit_imagenet`;
the method: `sslx/methods/mocov3.py`.
"""
from sslx import recipes_distillation


def get_config(arg=None):
  return recipes_distillation.mocov3_vit_imagenet("B/16", arg)
