r"""Supervised ResNet-18 on Fashion-MNIST: the labelled reference for the ConvNet methods, on a CPU.

  python -m sslx.main --config=configs/supervised_fashion_mnist.py --workdir=runs/resnet18_supervised
  python -m sslx.main --config=configs/eval.py:knn --config.init_from=runs/resnet18_supervised --workdir=runs/rn_knn

The encoder is a ResNet-18 with the small-image stem (3x3 stride-1 conv, no max-pool) for 28 px inputs and
zero-initialised last BatchNorm scales; it trains with the fine-tuning bundle (`sslx/methods/finetune.py`)
from scratch: SGD with Nesterov momentum 0.9, lr 0.1 x batch / 256 with a short warm-up then half-cosine,
weight decay 5e-4 on kernels only, label smoothing 0.1, random crops (scale 0.35-1) and flips. The online
probe and the kNN monitor watch the encoder as they do in pretraining, and the held-out top-1 is scored every
epoch. ``--config.init_from=RUN`` starts the encoder from another run's instead (fine-tuning).

Arguments: ``epochs=N`` (default 2); ``test``: a few steps of a ResNet-10 of width 8 at batch 16, for the tests.
"""
from sslx import config as config_lib
from sslx import config_args
from sslx import recipes


def get_config(arg=None):
  args = config_args.parse_arg(arg, epochs=2, test=False)
  config = recipes.supervised_resnet_fashion_mnist()
  config.num_epochs = args.epochs
  if args.test:
    config.model.update(dict(variant="10", width=8))
    config.batch_size = 16
    config.total_steps = 4
    config.eval.every_epochs = None
    config.checkpoint.best_metric = None
    config.checkpoint.every_steps = 2
    config.log_every_steps = 2
    config.eval.batch_size = 100
    config.monitor.update(dict(knn_train_examples=200, knn_test_examples=100, probe_batch_size=8))
  return config_lib.finalize(config)
