r"""BEiT ViT-B/16 on ImageNet-1k (TFDS `imagenet2012`), 800 epochs, batch 2048, a tokenizer run's tokens.

  python -m sslx.main --config=configs/tokenizer_imagenet.py --workdir=runs/tokenizer_imagenet
  python -m sslx.main --config=configs/beit_vitb.py:tokenizer=runs/tokenizer_imagenet --workdir=runs/beit_vitb
  python -m sslx.main --config=configs/beit_vitb.py:local,tokenizer=/tmp/tokenizer_local \
      --workdir=/tmp/beit_vitb_local        # CPU check, after configs/tokenizer_imagenet.py:local

Or with ids some other tokenizer computed beforehand, provided by the data as ``batch['token_ids']``:
``--config.method.token_ids_key=token_ids``. The recipe and where its numbers come from:
`sslx.recipes_beit.beit_imagenet`; the method: `sslx/methods/beit.py`.
"""
from sslx import recipes_beit


def get_config(arg=None):
  return recipes_beit.beit_imagenet("B/16", arg)
