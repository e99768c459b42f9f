r"""RotNet on ImageNet-1k (TFDS `imagenet2012`) with a ResNet-50: the official RotNet schedule, 50 epochs.

  python -m sslx.main --config=configs/rotation_imagenet.py --workdir=runs/rotation_r50
  python -m sslx.main --config=configs/rotation_imagenet.py:depth=18 --workdir=runs/rotation_r18
  python -m sslx.main --config=configs/rotation_imagenet.py:local --workdir=/tmp/rotation_local   # CPU check

The recipe and its sources: `sslx.recipes_pretext.rotation_imagenet`.
"""
from sslx import recipes_pretext


def get_config(arg=None):
  return recipes_pretext.rotation_imagenet(arg)
