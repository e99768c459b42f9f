r"""Jigsaw puzzles on Fashion-MNIST (upsampled to 48 px) with the quick start's ViT-Ti/4, 2 epochs on a CPU.

  python -m sslx.main --config=configs/jigsaw_fashion_mnist.py --workdir=runs/jigsaw_fmnist
  python -m sslx.main --config=configs/jigsaw_fashion_mnist.py:resnet --workdir=runs/jigsaw_fmnist_r18

Each image is cut into 3 x 3 cells of 16 px, a 12 px tile from each, shuffled by one of 100 permutations that
the network names. The recipe and why 48 px: `sslx.recipes_pretext.jigsaw_fashion_mnist`; the method:
`sslx/methods/jigsaw.py`. It ends with kNN and linear-probe accuracy beside a random encoder's. Measured on 2
shared CPU cores: ~56 images/s (nine tiles each), so ~36 minutes for 2 epochs.

Arguments: ``resnet``, ``epochs=N`` (default 2), ``test`` (6 steps of a tiny encoder, for the tests).
"""
from sslx import recipes_pretext


def get_config(arg=None):
  return recipes_pretext.jigsaw_fashion_mnist(arg)
