r"""MoCo v2 on Fashion-MNIST with a half-width ResNet-18 (small-image stem): pretrains on a CPU in 2 epochs.

  python -m sslx.main --config=configs/mocov2_fashion_mnist.py --workdir=runs/mocov2_fmnist

Augmentations (both views) as configs/simclr_fashion_mnist.py: random resized crop of 20-100%, horizontal
flip, brightness and contrast jitter (0.4, probability 0.8); no saturation, hue, grayscale or blur on 28 px
grey garments. The recipe (queue of 4096 keys, key momentum 0.99, SGD): `sslx.recipes.mocov2_fashion_mnist`.
Measured on 2 shared CPU cores: ~70 images/s (the key view goes forward only), so ~29 minutes for 2 epochs.

Arguments: ``epochs=N`` (default 2); ``test``: 6 steps of a ResNet-10 of width 8 at batch 32 with a queue of
2 batches in 2 BatchNorm groups, for the tests (their runs compile with XLA's optimisations, see
tests/contrastive_helpers.py; one basic block per stage keeps that compilation short).
"""
from sslx import config as config_lib
from sslx import config_args
from sslx import recipes


def get_config(arg=None):
  args = config_args.parse_arg(arg, epochs=2, test=False)
  config = recipes.mocov2_fashion_mnist()
  config.num_epochs = args.epochs
  if args.test:
    recipes.shrink_fashion_mnist_for_tests(config)
    config.model.variant = "10"
    config.method.queue_size = 64
    config.model.bn_groups = 2
  return config_lib.finalize(config)
