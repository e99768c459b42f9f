r"""MoCo v2 ResNet-50 on ImageNet-1k (TFDS `imagenet2012`), global batch 256, SGD, 200 epochs.

  python -m sslx.main --config=configs/mocov2_resnet50.py --workdir=runs/mocov2_r50
  python -m sslx.main --config=configs/mocov2_resnet50.py:local --workdir=/tmp/mocov2_local   # CPU check

The recipe and its arguments: `sslx.recipes.mocov2_imagenet`; the method and its BatchNorm groups:
`sslx/methods/moco.py`.
"""
from sslx import recipes


def get_config(arg=None):
  return recipes.mocov2_imagenet(arg)
