r"""SimMIM ViT-B/16 on ImageNet-1k (TFDS `imagenet2012`), 800 epochs, global batch 2048.

  python -m sslx.main --config=configs/simmim_vitb.py --workdir=runs/simmim_vitb
  python -m sslx.main --config=configs/simmim_vitb.py:local --workdir=/tmp/simmim_vitb_local   # CPU check

The recipe and its sources: `sslx.recipes_mim.simmim_vitb`; the method: `sslx/methods/simmim.py`.
"""
from sslx import recipes_mim


def get_config(arg=None):
  return recipes_mim.simmim_vitb(arg)
