r"""Frozen-encoder evaluation of a pretraining run: weighted kNN (DINO) or a linear probe (MAE).

  python -m sslx.main --config=configs/eval.py:knn --config.init_from=runs/quickstart --workdir=runs/qs_knn
  python -m sslx.main --config=configs/eval.py:linear_probe --config.init_from=runs/quickstart \
      --workdir=runs/qs_probe [--config.eval.probe=lars]
  python -m sslx.main --config=configs/eval.py:imagenet_knn --config.init_from=runs/mae_vitb --workdir=runs/vitb_knn
  python -m sslx.main --config=configs/eval.py:imagenet_linear_probe:local \
      --config.init_from=/tmp/mae_vitb_local --workdir=/tmp/vitb_probe_local   # CPU check

Arguments:
  knn, linear_probe: Fashion-MNIST with the quick start's encoder shape; the probe is an exact
    logistic regression (``config.eval.probe='logistic'``).
  imagenet_knn: ImageNet-1k (TFDS ``imagenet2012``, 224 px, resize 256 + centre crop), DINO's kNN:
    k in (20, 200), temperature 0.07, the whole training set as the bank, evaluation batch 1024.
  imagenet_linear_probe: MAE's linear probe (FINETUNE.md, "Linear Probing", and main_linprobe.py):
    BN without affine + linear on the cls token, LARS, weight decay 0, 90 epochs, batch 16384, base lr
    0.1 (lr = 0.1 * 16384 / 256) with 10 warm-up epochs. It trains on fixed centre-crop features,
    without MAE's random-resized-crop and flip, so numbers can differ slightly from the paper's.
  <arg>:local: a CPU-sized check of the same code path: ImageNet at the local MAE recipe's size
    (configs/mae_vitb.py:local), evaluation batch 16, a bank / probe set of the first 256 training
    images, k in (5, 20) and a 3-epoch probe of batch 16; Fashion-MNIST with a 10k-image bank.

The encoder, its data set and splits come from ``init_from`` (its config.json and newest checkpoint);
``--config.data_dir`` points at data that moved. Without ``init_from`` a randomly initialised encoder
(the quick start's shape, or ViT-B/16 for ImageNet) is evaluated on the config's data, the baseline that
says what pretraining bought. Settings: ``config.eval.*``; ``config.eval.batch_size`` is global, over
all processes. Results are printed and written to ``<workdir>/results.json``.
"""
from sslx import config as config_lib
from sslx import recipes
from sslx.evaluate import run

_EVALUATIONS = ("knn", "linear_probe", "imagenet_knn", "imagenet_linear_probe")


def get_config(arg="knn"):
  name, _, size = (arg or "knn").partition(":")
  if name not in _EVALUATIONS or size not in ("", "local"):
    raise ValueError(f"Unknown config argument {arg!r}: use one of {_EVALUATIONS}, optionally followed by "
                     "':local'")
  config = run.eval_task_config(name.removeprefix("imagenet_"))
  if name.startswith("imagenet_"):
    _imagenet(config, local=bool(size))
  else:
    quick_start = recipes.mae_fashion_mnist()
    config.model = quick_start.model
    config.data = quick_start.data
    if size:
      config.eval.max_train_examples = 10_000
  return config_lib.finalize(config)


def _imagenet(config, *, local: bool) -> None:
  pretraining = recipes.mae_imagenet("B/16", "local" if local else None)
  config.model = pretraining.model
  config.data = pretraining.data
  config.eval.update(dict(
      pooling="cls", batch_size=1024, knn_ks=(20, 200), knn_temperature=0.07,
      probe="lars", probe_epochs=90, probe_batch_size=16384, probe_base_lr=0.1, probe_warmup_epochs=10.0))
  if local:
    config.eval.update(dict(batch_size=16, max_train_examples=256, knn_ks=(5, 20), probe_epochs=3,
                            probe_batch_size=16, probe_warmup_epochs=1.0))
