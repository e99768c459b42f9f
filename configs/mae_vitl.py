r"""MAE ViT-L/16 on ImageNet-1k (TFDS `imagenet2012`), 800 epochs, global batch 4096.

  python -m sslx.main --config=configs/mae_vitl.py --workdir=runs/mae_vitl
  python -m sslx.main --config=configs/mae_vitl.py:local --workdir=/tmp/mae_vitl_local   # CPU check
"""
from sslx import recipes


def get_config(arg=None):
  return recipes.mae_imagenet("L/16", arg)
