r"""MoCo v3 on Fashion-MNIST with the quick start's ViT-Ti/4 (4 blocks): pretrains on a CPU in 2 epochs.

  python -m sslx.main --config=configs/mocov3_fashion_mnist.py --workdir=runs/mocov3_fmnist

Augmentations (both views) as configs/simclr_fashion_mnist.py: random resized crop of 20-100%, horizontal
flip, brightness and contrast jitter (0.4, probability 0.8); no saturation, hue, grayscale, blur or
solarisation on 28 px grey garments. The recipe (heads 512-128, momentum 0.99 -> 1, AdamW, patch projection
frozen): `sslx.recipes_distillation.mocov3_fashion_mnist`.

Arguments: ``epochs=N`` (default 2); ``test``: 6 steps of a one-block ViT of width 32 at batch 32 with
projector and predictor 64-32, for the tests.
"""
from sslx import config as config_lib
from sslx import config_args
from sslx import recipes
from sslx import recipes_distillation
from sslx.models import heads


def get_config(arg=None):
  args = config_args.parse_arg(arg, epochs=2, test=False)
  config = recipes_distillation.mocov3_fashion_mnist()
  config.num_epochs = args.epochs
  if args.test:
    recipes.shrink_fashion_mnist_for_tests(config)
    config.model.update(dict(width=32, depth=1, num_heads=2, mlp_dim=64))
    config.method.projector = heads.mocov3_head(3, hidden_dim=64, out_dim=32)
    config.method.predictor = heads.mocov3_head(2, hidden_dim=64, out_dim=32)
  return config_lib.finalize(config)
