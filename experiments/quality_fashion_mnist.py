r"""Quality record on Fashion-MNIST: kNN and linear-probe accuracy of raw pixels, a random encoder and
pretrained encoders, each with class-token and mean-patch-token features, under one protocol.

  python experiments/quality_fashion_mnist.py --runs=runs/quickstart [--runs=runs/mae_10ep ...] \
      [--json_out=quality.jsonl]

Protocol (the one `configs/eval.py` uses): the full 60k training split is the kNN bank and the probe's
training set, the 10k test split is scored; images are normalised with the Fashion-MNIST mean and std;
weighted kNN (DINO) with cosine similarity, k = 20, T = 0.07; the probe is an exact L2-regularised
multinomial logistic regression (L-BFGS, l2 = 1e-4) on the features as they are. Raw pixels are the 784
normalised values; encoders are the newest checkpoint of each ``--runs`` workdir and a random
initialisation of the first run's encoder (its seed). The results table goes to stdout in Markdown.
"""
from __future__ import annotations

import json
import time

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from sslx.data import pipeline
from sslx.evaluate import features as features_lib
from sslx.evaluate import knn
from sslx.evaluate import linear_probe
from sslx.evaluate import run as eval_run
from sslx.models import vit

_RUNS = flags.DEFINE_multi_string("runs", [], "Pretraining workdirs to evaluate.")
_K = flags.DEFINE_integer("k", 20, "Neighbours of the weighted kNN.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Append one JSON line per row to this file.")


def _pixels(data_config, split: str) -> tuple[np.ndarray, np.ndarray]:
  feats, labels = [], []
  for batch in pipeline.make_eval_loader(data_config, split=split, batch_size=1000):
    mask = np.asarray(batch["mask"], bool)
    feats.append(np.asarray(batch["image"]).reshape(len(mask), -1)[mask])
    labels.append(np.asarray(batch["label"])[mask])
  return np.concatenate(feats), np.concatenate(labels)


def _encoder_features(model_config, params, data_config, split: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{'cls': ..., 'mean': ...} from one pass of the encoder."""
  apply = jax.jit(lambda p, x: vit.encoder_from_config(model_config).apply({"params": p}, x, train=False)[1])
  out = {pooling: ([], []) for pooling in features_lib.POOLINGS}
  for batch in pipeline.make_eval_loader(data_config, split=split, batch_size=500):
    mask = np.asarray(batch["mask"], bool)
    aux = apply(params, batch["image"])
    for pooling, (feats, labels) in out.items():
      feats.append(np.asarray(features_lib.pool(aux, pooling))[mask])
      labels.append(np.asarray(batch["label"])[mask])
  return {pooling: (np.concatenate(f), np.concatenate(l)) for pooling, (f, l) in out.items()}


def _scores(train, test) -> dict[str, float]:
  (train_x, train_y), (test_x, test_y) = train, test
  start = time.time()
  knn_top1 = knn.knn_accuracy(train_x, train_y, test_x, test_y, 10, k=_K.value)["top1"]
  head = linear_probe.fit_logistic_regression(train_x, train_y, 10, l2=1e-4)
  linear_top1 = linear_probe.evaluate_logistic_regression(head, test_x, test_y)
  return {f"knn{_K.value}_top1": 100 * knn_top1, "linear_top1": 100 * linear_top1, "seconds": time.time() - start}


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every restore step at INFO
  if not _RUNS.value:
    raise app.UsageError("Give at least one --runs=<pretraining workdir>.")
  first_config = eval_run.load_run_config(_RUNS.value[0])
  data_config = first_config.data
  rows = [("raw pixels", "-", _scores(_pixels(data_config, "train"), _pixels(data_config, "test")))]
  encoders = [("random init", first_config,
               eval_run.random_encoder(first_config.model, data_config, first_config.seed))]
  encoders += [(workdir, eval_run.load_run_config(workdir),
                eval_run.restore_encoder(eval_run.load_run_config(workdir), workdir)) for workdir in _RUNS.value]
  for name, config, params in encoders:
    train = _encoder_features(config.model, params, data_config, "train")
    test = _encoder_features(config.model, params, data_config, "test")
    rows += [(name, pooling, _scores(train[pooling], test[pooling])) for pooling in features_lib.POOLINGS]
  print(f"\n| features | pooling | kNN top-1 (k={_K.value}) | linear top-1 |\n|---|---|---|---|")
  for name, pooling, scores in rows:
    print(f"| {name} | {pooling} | {scores[f'knn{_K.value}_top1']:.2f}% | {scores['linear_top1']:.2f}% |")
    if _JSON_OUT.value:
      with open(_JSON_OUT.value, "a", encoding="utf-8") as f:
        f.write(json.dumps({"features": name, "pooling": pooling, **scores}) + "\n")


if __name__ == "__main__":
  app.run(main)
