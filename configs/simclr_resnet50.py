r"""SimCLR ResNet-50 on ImageNet-1k (TFDS `imagenet2012`), global batch 4096, LARS, 100 epochs.

  python -m sslx.main --config=configs/simclr_resnet50.py --workdir=runs/simclr_r50
  python -m sslx.main --config=configs/simclr_resnet50.py:epochs=1000,lr=sqrt --workdir=runs/simclr_r50_1000
  python -m sslx.main --config=configs/simclr_resnet50.py:local --workdir=/tmp/simclr_local   # CPU check

The recipe and its arguments: `sslx.recipes.simclr_imagenet`.
"""
from sslx import recipes


def get_config(arg=None):
  return recipes.simclr_imagenet(arg)
