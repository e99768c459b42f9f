r"""Relative position (Doersch et al. 2015) on Fashion-MNIST with the quick start's ViT-Ti/4, images at 56 px.

  python -m sslx.main --config=configs/relpos_fashion_mnist.py --workdir=runs/relpos_fmnist
  python -m sslx.main --config=configs/relpos_fashion_mnist.py:resnet --workdir=runs/relpos_fmnist_r18

Each step cuts from every image a 12 px centre patch and one of its 8 neighbours (gap 6 px, jitter 1 px) and
classifies where the neighbour sits. The recipe and why 56 px: `sslx.recipes_context.relpos_fashion_mnist`;
the method: `sslx/methods/relpos.py`. It ends with kNN and linear-probe accuracy beside a random encoder's.

Arguments: ``resnet`` (half-width ResNet-18, small-image stem), ``epochs=N`` (default 2), ``test`` (6 steps of
a tiny encoder, for the tests).
"""
from sslx import recipes_context


def get_config(arg=None):
  return recipes_context.relpos_fashion_mnist(arg)
