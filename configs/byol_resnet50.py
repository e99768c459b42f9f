r"""BYOL ResNet-50 on ImageNet-1k (TFDS `imagenet2012`), global batch 4096, LARS, 300 epochs.

  python -m sslx.main --config=configs/byol_resnet50.py --workdir=runs/byol_r50
  python -m sslx.main --config=configs/byol_resnet50.py:epochs=1000 --workdir=runs/byol_r50_1000   # the paper's
  python -m sslx.main --config=configs/byol_resnet50.py:local --workdir=/tmp/byol_local   # CPU check

The recipe, its presets by run length (lr, weight decay and target momentum) and its asymmetric views:
`sslx.recipes.byol_imagenet`; the method: `sslx/methods/byol.py`.
"""
from sslx import recipes


def get_config(arg=None):
  return recipes.byol_imagenet(arg)
