r"""SimMIM on Fashion-MNIST (28x28 grey, the quick start's ViT-Ti/4): pretrains on a laptop CPU in minutes.

  python -m sslx.main --config=configs/simmim_fashion_mnist.py --workdir=runs/simmim_fmnist

Reads the IDX files `configs/mae_fashion_mnist.py` reads; the recipe: `sslx.recipes_mim.simmim_fashion_mnist`.
It ends by printing the kNN and linear-probe accuracy of the trained encoder beside a random one's.
``:test`` shrinks it to 6 steps of a one-block encoder with small monitor subsets, for the tests. SimMIM's
mask cells by default; another strategy with e.g. ``--config.method.mask_strategy=block`` (`sslx.mask_policy`).
"""
from sslx import config as config_lib
from sslx import config_args
from sslx import recipes
from sslx import recipes_mim


def get_config(arg=None):
  test = config_args.parse_arg(arg, test=False).test
  config = recipes_mim.simmim_fashion_mnist()
  if test:
    recipes.shrink_test_run(config)
    config.viz_every_steps = 3
    config.model.depth = 1
  return config_lib.finalize(config)
