r"""Split-brain autoencoder (Zhang et al. 2017) on ImageNet-1k (TFDS `imagenet2012`).

The reference's training: 176 px crops, batch 40, Adam 3e-5, 500k steps.

  python -m sslx.main --config=configs/splitbrain_imagenet.py --workdir=runs/splitbrain_imagenet
  python -m sslx.main --config=configs/splitbrain_imagenet.py:encoder=resnet \
      --workdir=runs/splitbrain_resnet50
  python -m sslx.main --config=configs/splitbrain_imagenet.py:local \
      --workdir=/tmp/splitbrain_local   # CPU check

Class rebalancing needs the ab prior of the training images (uniform until then):

  python -m sslx.pretext.ab_bins --config=configs/splitbrain_imagenet.py --out=ab_prior.npy
  ... --config.method.ab_prior=ab_prior.npy

The recipe and its sources: `sslx.recipes_color.splitbrain_imagenet`; the method:
`sslx/methods/splitbrain.py`.
"""
from sslx import recipes_color


def get_config(arg=None):
  return recipes_color.splitbrain_imagenet(arg)
