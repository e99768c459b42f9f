r"""Colorization (Zhang et al. 2016) on ImageNet-1k (TFDS `imagenet2012`).

The reference's training: 176 px crops, batch 40, Adam 3e-5, 500k steps.

  python -m sslx.main --config=configs/colorization_imagenet.py --workdir=runs/colorization_imagenet
  python -m sslx.main --config=configs/colorization_imagenet.py:encoder=resnet \
      --workdir=runs/colorization_resnet50
  python -m sslx.main --config=configs/colorization_imagenet.py:local \
      --workdir=/tmp/colorization_local   # CPU check

Class rebalancing needs the ab prior of the training images (uniform until then):

  python -m sslx.pretext.ab_bins --config=configs/colorization_imagenet.py --out=ab_prior.npy
  ... --config.method.ab_prior=ab_prior.npy

The recipe and its sources: `sslx.recipes_color.colorization_imagenet`; the method:
`sslx/methods/colorization.py`.
"""
from sslx import recipes_color


def get_config(arg=None):
  return recipes_color.colorization_imagenet(arg)
