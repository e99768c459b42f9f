r"""BEiT's visual tokenizer on ImageNet-1k (TFDS `imagenet2012`): a VQ-VAE with 8192 codes on the 14x14 grid
of ViT-B/16 at 224 px, from 112 px crops.

  python -m sslx.main --config=configs/tokenizer_imagenet.py --workdir=runs/tokenizer_imagenet
  python -m sslx.main --config=configs/tokenizer_imagenet.py:local --workdir=/tmp/tokenizer   # CPU check
"""
from sslx import recipes_tokenizer


def get_config(arg=None):
  return recipes_tokenizer.tokenizer_imagenet(arg)
