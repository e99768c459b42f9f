r"""SimCLR on Fashion-MNIST with a half-width ResNet-18 (small-image stem): pretrains on a CPU in 2 epochs.

  python -m sslx.main --config=configs/simclr_fashion_mnist.py --workdir=runs/simclr_fmnist

Augmentations (both views): random resized crop of 20-100% of the area, horizontal flip, and brightness and
contrast jitter (0.4 each, probability 0.8). Garments are grey, so SimCLR's saturation, hue and grayscale do
nothing here; its blur (a 3 px kernel at 28 px) is left out, as SimCLR leaves it out on CIFAR. The recipe:
`sslx.recipes.simclr_fashion_mnist`. Ends with kNN and linear-probe accuracy beside a random encoder's.
Measured on 2 shared CPU cores: ~78 images/s (each image's two views through encoder and head, forward and
backward), so ~26 minutes for the 2 epochs.

Arguments: ``epochs=N`` (default 2); ``vit``: the quick start's ViT-Ti/4 (4 blocks) under AdamW instead
(`sslx.recipes.simclr_vit_fashion_mnist`), for the table beside MAE and the pretext tasks; ``test``: 6 steps of
a ResNet-18 of width 8 (or a one-block ViT of width 32) at batch 32, for the tests.
"""
from sslx import config as config_lib
from sslx import config_args
from sslx import recipes


def get_config(arg=None):
  args = config_args.parse_arg(arg, epochs=2, vit=False, test=False)
  config = recipes.simclr_vit_fashion_mnist() if args.vit else recipes.simclr_fashion_mnist()
  config.num_epochs = args.epochs
  if args.test:
    recipes.shrink_fashion_mnist_for_tests(config)
    if args.vit:
      config.model.update(dict(width=32, depth=1, num_heads=2, mlp_dim=64))
  return config_lib.finalize(config)
