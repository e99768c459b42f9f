r"""BEiT on Fashion-MNIST (28x28 grey, the quick start's ViT-Ti/4) with a tokenizer run's tokens, on a CPU.

  python -m sslx.main --config=configs/tokenizer_fashion_mnist.py --workdir=runs/tokenizer
  python -m sslx.main --config=configs/beit_fashion_mnist.py:tokenizer=runs/tokenizer \
      --workdir=runs/beit_fmnist

Reads the same IDX files as `configs/mae_fashion_mnist.py`. The recipe:
`sslx.recipes_beit.beit_fashion_mnist`. It ends by printing the kNN and linear-probe accuracy of the trained
encoder beside a random one's. ``:test`` shrinks it to 6 steps of a one-block encoder with small monitor
subsets, for the tests (with the tokenizer of configs/tokenizer_fashion_mnist.py:test). Block-wise masking
by default; another strategy with e.g. ``--config.method.mask_strategy=random`` (`sslx.mask_policy`).
"""
from sslx import config as config_lib
from sslx import config_args
from sslx import recipes
from sslx import recipes_beit


def get_config(arg=None):
  args = config_args.parse_arg(arg, test=False, tokenizer=None)
  config = recipes_beit.beit_fashion_mnist(args.tokenizer)
  if args.test:
    recipes.shrink_test_run(config)
    config.model.depth = 1
  return config_lib.finalize(config)
