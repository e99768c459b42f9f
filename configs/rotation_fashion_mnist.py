r"""RotNet (rotation prediction) on Fashion-MNIST with the quick start's ViT-Ti/4, 2 epochs on a CPU.

  python -m sslx.main --config=configs/rotation_fashion_mnist.py --workdir=runs/rotation_fmnist
  python -m sslx.main --config=configs/rotation_fashion_mnist.py:resnet --workdir=runs/rotation_fmnist_r18

Each step turns every image of the batch of 256 by 0, 90, 180 and 270 degrees and classifies the turn. The
recipe: `sslx.recipes_pretext.rotation_fashion_mnist`; the method: `sslx/methods/rotation.py`. It ends with
kNN and linear-probe accuracy of the trained encoder beside a random one's. Measured on 2 shared CPU cores:
~22 images/s (four 28 px turns of each through the ViT, forward and backward), so ~90 minutes for 2 epochs.

Arguments: ``resnet`` (half-width ResNet-18, small-image stem), ``epochs=N`` (default 2), ``test`` (6 steps of
a tiny encoder, for the tests).
"""
from sslx import recipes_pretext


def get_config(arg=None):
  return recipes_pretext.rotation_fashion_mnist(arg)
