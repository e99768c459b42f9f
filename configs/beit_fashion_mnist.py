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
from sslx import recipes_beit


def get_config(arg=None):
  args = config_args.parse_arg(arg, test=False, tokenizer=None)
  config = recipes_beit.beit_fashion_mnist(args.tokenizer)
  if args.test:
    config.batch_size = 32
    config.total_steps = 6
    config.checkpoint.every_steps = 3
    config.log_every_steps = 2
    config.eval.after_pretrain = False
    config.model.depth = 1
    config.monitor.update(dict(knn_train_examples=200, knn_test_examples=100))
  return config_lib.finalize(config)
