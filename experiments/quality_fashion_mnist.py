r"""Quality record on Fashion-MNIST: kNN and linear-probe accuracy of raw pixels, a random encoder and
pretrained encoders, each with every pooling its encoder offers (class token and mean patch token for a
ViT, the global mean for a ResNet), under one protocol.

  python experiments/quality_fashion_mnist.py --runs=runs/quickstart [--runs=runs/mae_10ep ...] \
      [--json_out=quality.jsonl] [--baselines=false: the runs only] [--embed_from=student: DINO's student]

Protocol (the one `configs/eval.py` uses): the full 60k training split is the kNN bank and the probe's
training set, the 10k test split is scored; images are normalised with the Fashion-MNIST mean and std;
weighted kNN (DINO) with cosine similarity, k = 20, T = 0.07; the probe is an exact L2-regularised
multinomial logistic regression on standardised features (training-split statistics), its L2 weight
chosen on a held-out slice of the training split (`sslx.evaluate.linear_probe`). Raw pixels are the 784
normalised values; encoders are the newest checkpoint of each ``--runs`` workdir and a random
initialisation of the first run's encoder (its seed), each read through its method's `Method.embed`.
The results table goes to stdout in Markdown.
"""
from __future__ import annotations

import json

from absl import app
from absl import flags
from absl import logging

from sslx import config as config_lib
from sslx import init_from
from sslx import models
from sslx.evaluate import run as eval_run

_RUNS = flags.DEFINE_multi_string("runs", [], "Pretraining workdirs to evaluate.")
_K = flags.DEFINE_integer("k", 20, "Neighbours of the weighted kNN.")
_PROBE_L2 = flags.DEFINE_float("probe_l2", None, "A fixed L2 weight for the probe; None: chosen on held-out.")
_BASELINES = flags.DEFINE_bool("baselines", True, "Also score raw pixels and a random encoder.")
_EMBED_FROM = flags.DEFINE_string("embed_from", None, "The runs' network to score (e.g. student, target); "
                                  "None: each run's own.")
_POOLING = flags.DEFINE_string("pooling", None, "Score only this pooling (e.g. cls); None: every pooling the "
                                "encoder offers.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Append one JSON line per row to this file.")


def _eval_config():
  eval_config = config_lib.base_config().eval
  eval_config.update(dict(knn_ks=(_K.value,), probe="logistic", probe_l2=_PROBE_L2.value, max_train_examples=None))
  return eval_config


def _poolings(run_config) -> tuple[str, ...]:
  """The feature poolings the run's encoder offers: class token and mean patch token for a ViT, the global
  mean for a ResNet."""
  offered = models.encoder_module(run_config.model.name).POOLINGS
  if _POOLING.value is None:
    return offered
  if _POOLING.value not in offered:
    raise app.UsageError(f"--pooling={_POOLING.value!r} is not one of {offered}, the poolings of "
                         f"{run_config.model.name!r}.")
  return (_POOLING.value,)


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every restore step at INFO
  if not _RUNS.value:
    raise app.UsageError("Give at least one --runs=<pretraining workdir>.")
  eval_config = _eval_config()
  first_config = init_from.load_run_config(_RUNS.value[0])
  data_config = first_config.data
  tasks = ("knn", "linear_probe")
  rows = []
  if _BASELINES.value:
    rows.append(("raw pixels", "-", eval_run.evaluate_representation(tasks, eval_run.pixel_embed, ({}, {}),
                                                                   data_config, eval_config)))
    for pooling in _poolings(first_config):
      first_config.model.pooling = pooling
      method, state = eval_run.random_init(first_config, first_config.seed)
      rows.append(("random init", pooling, eval_run.evaluate_representation(tasks, method.embed, state,
                                                                            data_config, eval_config)))
  for workdir in _RUNS.value:
    for pooling in _poolings(init_from.load_run_config(workdir)):
      _, method, state = eval_run.restored_run(workdir, pooling=pooling, embed_from=_EMBED_FROM.value)
      rows.append((workdir, pooling, eval_run.evaluate_representation(tasks, method.embed, state, data_config,
                                                                      eval_config)))
  print(f"\n| features | pooling | kNN top-1 (k={_K.value}) | linear top-1 | probe L2 |\n|---|---|---|---|---|")
  for name, pooling, scores in rows:
    print(f"| {name} | {pooling} | {scores[f'knn{_K.value}_top1']:.2f}% | {scores['linear_top1']:.2f}% | "
          f"{scores.get('linear_l2', float('nan')):.0e} |")
    if _JSON_OUT.value:
      with open(_JSON_OUT.value, "a", encoding="utf-8") as f:
        f.write(json.dumps({"features": name, "pooling": pooling, **scores}) + "\n")


if __name__ == "__main__":
  app.run(main)
