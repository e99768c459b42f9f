r"""BEiT on Fashion-MNIST (28x28 grey, the quick start's ViT-Ti/4) with a tokenizer run's tokens, on a CPU.

  python -m sslx.main --config=configs/tokenizer_fashion_mnist.py --workdir=runs/tokenizer
  python -m sslx.main --config=configs/beit_fashion_mnist.py:tokenizer=runs/tokenizer \
      --workdir=runs/beit_fmnist

Reads the same IDX files as `configs/mae_fashion_mnist.py`. The recipe:
`sslx.recipes_beit.beit_fashion_mnist`. It ends by printing the kNN and linear-probe accuracy of the trained
encoder beside a random one's. ``:test`` shrinks it to 6 steps of a one-block encoder with small monitor
subsets, for the tests (with the tokenizer of configs/tokenizer_fashion_mnist.py:test). Block-wise masking
by default; another strategy with e.g. ``--config.method.mask_strategy=random`` (`sslx.mask_policy`).

Or with precomputed token ids (`sslx.token_ids`: the file, written here from the tokenizer run; the whole image
as the view, flipped at random):

  python -m sslx.token_ids --tokenizer_run=runs/tokenizer \
      --config=configs/beit_fashion_mnist.py:token_ids=runs/ids.npy --out=runs/ids.npy
  python -m sslx.main --config=configs/beit_fashion_mnist.py:token_ids=runs/ids.npy \
      --config.method.vocab_size=512 --workdir=runs/beit_ids
"""
from sslx import config as config_lib
from sslx import config_args
from sslx import recipes
from sslx import recipes_beit
from sslx import token_ids


def get_config(arg=None):
  args = config_args.parse_arg(arg, test=False, tokenizer=None, token_ids=None)
  config = recipes_beit.beit_fashion_mnist(args.tokenizer)
  if args.token_ids is not None:
    token_ids.use_token_ids_file(config, args.token_ids)
  if args.test:
    recipes.shrink_test_run(config)
    config.model.depth = 1
  return config_lib.finalize(config)
