r"""Jigsaw puzzles on ImageNet-1k (TFDS `imagenet2012`), ResNet-50: 225 px, 64 px tiles, 1000 permutations.

  python -m sslx.main --config=configs/jigsaw_imagenet.py --workdir=runs/jigsaw_r50
  python -m sslx.main --config=configs/jigsaw_imagenet.py:local --workdir=/tmp/jigsaw_local   # CPU check

The recipe and its sources: `sslx.recipes_pretext.jigsaw_imagenet`.
"""
from sslx import recipes_pretext


def get_config(arg=None):
  return recipes_pretext.jigsaw_imagenet(arg)
