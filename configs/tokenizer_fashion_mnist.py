r"""BEiT's visual tokenizer for the Fashion-MNIST quick start: a VQ-VAE with an EMA codebook of 512 codes on a
7x7 grid (the quick-start ViT-Ti/4's), trained on a CPU in minutes.

  python -m sslx.main --config=configs/tokenizer_fashion_mnist.py --workdir=runs/tokenizer
  python -m sslx.main --config=configs/tokenizer_fashion_mnist.py --config.method.quantizer=gumbel \
      --workdir=runs/dvae                                                      # the Gumbel-softmax dVAE

Logs ``recon``, ``codebook_usage`` and ``perplexity``; ``<workdir>/pictures`` holds originals over
reconstructions. A BEiT run loads it with ``--config=configs/beit_fashion_mnist.py:tokenizer=runs/tokenizer``.
``:test`` shrinks it to 6 steps of a width-8 network with 64 codes, for the tests.
"""
from sslx import config as config_lib
from sslx import config_args
from sslx import recipes
from sslx import recipes_tokenizer


def get_config(arg=None):
  test = config_args.parse_arg(arg, test=False).test
  config = recipes_tokenizer.tokenizer_fashion_mnist()
  if test:
    config.method.update(dict(vocab_size=64, width=8, num_res_blocks=1))
    config.method.vq.code_dim = 8
    recipes.shrink_test_run(config)
    config.viz_every_steps = 3
  return config_lib.finalize(config)
