r"""MAE ViT-H/14 on ImageNet-1k (TFDS `imagenet2012`), 800 epochs, global batch 4096.

  python -m sslx.main --config=configs/mae_vith.py --workdir=runs/mae_vith
  python -m sslx.main --config=configs/mae_vith.py:local --workdir=/tmp/mae_vith_local   # CPU check
"""
from sslx import recipes


def get_config(arg=None):
  return recipes.mae_imagenet("H/14", arg)
