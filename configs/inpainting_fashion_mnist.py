r"""Context encoders (Pathak et al. 2016) on Fashion-MNIST with the quick start's ViT-Ti/4: inpaint a quarter.

  python -m sslx.main --config=configs/inpainting_fashion_mnist.py --workdir=runs/inpainting_fmnist
  python -m sslx.main --config=configs/inpainting_fashion_mnist.py:resnet --workdir=runs/inpainting_fmnist_r18
  python -m sslx.main --config=configs/inpainting_fashion_mnist.py:region=center --workdir=runs/inpaint_center

Each step hides 4 random 7 px blocks of the 16 (or the central 14 x 14 square), fills them with the mean and
regresses their pixels (L2, a 4 px band around them weighted 10x). The recipe:
`sslx.recipes_context.inpainting_fashion_mnist`; the method: `sslx/methods/inpainting.py`. Pictures show the
masked input, the inpainted image and the original; the run ends with kNN and linear-probe accuracy.

Arguments: ``resnet`` (half-width ResNet-18, small-image stem), ``region=random_blocks|center``, ``epochs=N``
(default 2), ``test`` (6 steps of a tiny encoder, for the tests).
"""
from sslx import recipes_context


def get_config(arg=None):
  return recipes_context.inpainting_fashion_mnist(arg)
