r"""Relative position (Doersch et al. 2015) on ImageNet-1k (TFDS `imagenet2012`) with a ResNet-50.

  python -m sslx.main --config=configs/relpos_imagenet.py --workdir=runs/relpos_imagenet
  python -m sslx.main --config=configs/relpos_imagenet.py:local --workdir=/tmp/relpos_local   # CPU check

Doersch's patches (96 px, gap 48, jitter 7), colour dropping and per-patch normalisation on 400 px crops,
batch 256, the reference's plain SGD at a constant lr. The recipe, its sources and its assumptions:
`sslx.recipes_context.relpos_imagenet`; the method: `sslx/methods/relpos.py`.
"""
from sslx import recipes_context


def get_config(arg=None):
  return recipes_context.relpos_imagenet(arg)
