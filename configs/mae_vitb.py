r"""MAE ViT-B/16 on ImageNet-1k (TFDS `imagenet2012`), 800 epochs, global batch 4096.

  python -m sslx.main --config=configs/mae_vitb.py --workdir=runs/mae_vitb
  python -m sslx.main --config=configs/mae_vitb.py:local --workdir=/tmp/mae_vitb_local   # CPU check
"""
from sslx import recipes


def get_config(arg=None):
  return recipes.mae_imagenet("B/16", arg)
