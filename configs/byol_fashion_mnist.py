r"""BYOL on Fashion-MNIST with a half-width ResNet-18 (small-image stem): pretrains on a CPU in 2 epochs.

  python -m sslx.main --config=configs/byol_fashion_mnist.py --workdir=runs/byol_fmnist

Augmentations (both views) as configs/simclr_fashion_mnist.py: random resized crop of 20-100%, horizontal
flip, brightness and contrast jitter (0.4, probability 0.8); no saturation, hue, grayscale, blur or
solarisation on 28 px grey garments, so the two views are drawn alike (BYOL's ImageNet views differ only in
blur and solarisation). The recipe (projector and predictor 512-128, target momentum 0.99, LARS):
`sslx.recipes.byol_fashion_mnist`.

Arguments: ``epochs=N`` (default 2); ``test``: 6 steps of a ResNet-10 of width 8 at batch 32 with projector
and predictor 64-32, for the tests (one basic block per stage keeps their compilation short).
"""
from sslx import config as config_lib
from sslx import config_args
from sslx import recipes
from sslx.models import heads


def get_config(arg=None):
  args = config_args.parse_arg(arg, epochs=2, test=False)
  config = recipes.byol_fashion_mnist()
  config.num_epochs = args.epochs
  if args.test:
    recipes.shrink_fashion_mnist_for_tests(config)
    config.model.variant = "10"
    config.method.projector = heads.byol_head(hidden_dim=64, out_dim=32)
    config.method.predictor = heads.byol_head(hidden_dim=64, out_dim=32)
  return config_lib.finalize(config)
