r"""Context encoders (Pathak et al. 2016) on ImageNet-1k (TFDS `imagenet2012`) with a ResNet-50, 128 px crops.

  python -m sslx.main --config=configs/inpainting_imagenet.py --workdir=runs/inpainting_imagenet
  python -m sslx.main --config=configs/inpainting_imagenet.py:adversarial --workdir=runs/inpainting_adv
  python -m sslx.main --config=configs/inpainting_imagenet.py:local --workdir=/tmp/inpaint_local   # CPU check

Random blocks covering a quarter, L2 with the 4 px overlap weighted 10x, batch 64, Adam (beta1 0.5) at 2e-4;
``adversarial`` adds the reference's discriminator (lambda 0.001) on the central region. The recipe, its
sources and its assumptions: `sslx.recipes_context.inpainting_imagenet`; the method:
`sslx/methods/inpainting.py`.
"""
from sslx import recipes_context


def get_config(arg=None):
  return recipes_context.inpainting_imagenet(arg)
