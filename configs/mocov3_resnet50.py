r"""MoCo v3 ResNet-50 on ImageNet-1k (TFDS `imagenet2012`), global batch 4096, LARS, 100 epochs.

  python -m sslx.main --config=configs/mocov3_resnet50.py --workdir=runs/mocov3_r50
  python -m sslx.main --config=configs/mocov3_resnet50.py:epochs=1000 --workdir=runs/mocov3_r50_1000
  python -m sslx.main --config=configs/mocov3_resnet50.py:local --workdir=/tmp/mocov3_r50_local   # CPU check

The recipe, its presets by run length (lr, weight decay and momentum) and its views:
`sslx.recipes_distillation.mocov3_resnet50_imagenet`; the method: `sslx/methods/mocov3.py`.
"""
from sslx import recipes_distillation


def get_config(arg=None):
  return recipes_distillation.mocov3_resnet50_imagenet(arg)
