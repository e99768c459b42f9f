r"""Frozen-encoder evaluation of a pretraining run: weighted kNN (DINO) or a linear probe (MAE).

  python -m sslx.main --config=configs/eval.py:knn --config.init_from=runs/quickstart --workdir=runs/qs_knn
  python -m sslx.main --config=configs/eval.py:linear_probe --config.init_from=runs/quickstart \
      --workdir=runs/qs_probe [--config.eval.probe=lars]
  python -m sslx.main --config=configs/eval.py:imagenet_knn --config.init_from=runs/mae_vitb \
      --workdir=runs/vitb_knn
  python -m sslx.main --config=configs/eval.py:imagenet_linear_probe,local \
      --config.init_from=/tmp/mae_vitb_local --workdir=/tmp/vitb_probe_local   # CPU check

Arguments (``name,flag,key=value``; ``:`` separates too):
  knn, linear_probe: Fashion-MNIST with the quick start's encoder shape; the probe is an exact
    logistic regression on standardised features, its L2 weight chosen on a held-out slice of the
    training split (``config.eval.probe='logistic'``, ``config.eval.probe_l2=None``).
  imagenet_knn: ImageNet-1k (TFDS ``imagenet2012``, 224 px, resize 256 + centre crop), DINO's kNN:
    k in (20, 200), temperature 0.07, the whole training set as the bank, evaluation batch 1024.
  imagenet_linear_probe: MAE's linear probe (FINETUNE.md, "Linear Probing", and main_linprobe.py):
    BN without affine + linear on the pooled features (MAE's ViT: the cls token), LARS, weight decay 0,
    90 epochs, batch 16384, base lr 0.1 (lr = 0.1 * 16384 / 256) with 10 warm-up epochs. It trains on
    fixed centre-crop features, without MAE's random-resized-crop and flip, so numbers can differ slightly
    from the paper's.
  encoder=resnet18: the random-init baseline on Fashion-MNIST is a ResNet-18 (the supervised recipe's,
    configs/supervised_fashion_mnist.py) instead of the quick start's ViT.
  <arg>,local: a CPU-sized check of the same code path: ImageNet at the local MAE recipe's size
    (configs/mae_vitb.py:local), evaluation batch 16, a bank / probe set of the first 256 training
    images, k in (5, 20) and a 3-epoch probe of batch 16; Fashion-MNIST with a 10k-image bank.

The encoder, its data set and splits come from ``init_from`` (its config.json and newest checkpoint);
``--config.data_dir`` points at data that moved, and ``--config.model.pooling=cls|mean`` evaluates that
pooling of its encoder instead of the run's own (None), and ``--config.embed_from`` another network of the run
(DINO's ``student``, BYOL's or MoCo v3's ``target``). Without ``init_from`` a randomly initialised encoder
(the quick start's shape, or ViT-B/16 for ImageNet) is evaluated on the config's data, the baseline that
says what pretraining bought. Settings: ``config.eval.*``; ``config.eval.batch_size`` is global, over
all processes. Results are printed and written to ``<workdir>/results.json``.
"""
from sslx import config as config_lib
from sslx import config_args
from sslx import recipes
from sslx.evaluate import run

_EVALUATIONS = ("knn", "linear_probe", "imagenet_knn", "imagenet_linear_probe")
_ENCODERS = ("vit", "resnet18")  # the random-init baseline on Fashion-MNIST: the quick start's ViT, or a ResNet-18


def get_config(arg="knn"):
  args = config_args.parse_arg(arg, positional=("name",), choices={"name": _EVALUATIONS, "encoder": _ENCODERS},
                               name="knn", local=False, encoder="vit")
  task = args.name.removeprefix("imagenet_")
  if args.name.startswith("imagenet_"):
    config = run.eval_task_config(task, recipes.mae_imagenet("B/16", "local" if args.local else None))
    _imagenet(config, local=args.local)
  else:
    like = recipes.mae_fashion_mnist() if args.encoder == "vit" else recipes.supervised_resnet_fashion_mnist()
    config = run.eval_task_config(task, like)
    if args.local:
      config.eval.max_train_examples = 10_000
  return config_lib.finalize(config)


def _imagenet(config, *, local: bool) -> None:
  config.eval.update(dict(
      batch_size=1024, knn_ks=(20, 200), knn_temperature=0.07,
      probe="lars", probe_epochs=90, probe_batch_size=16384, probe_base_lr=0.1, probe_warmup_epochs=10.0))
  if local:
    config.eval.update(dict(batch_size=16, max_train_examples=256, knn_ks=(5, 20), probe_epochs=3,
                            probe_batch_size=16, probe_warmup_epochs=1.0))
