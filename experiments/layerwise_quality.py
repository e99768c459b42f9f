r"""Layer-wise quality on Fashion-MNIST: kNN and linear-probe accuracy of a ViT run's token after each of its
transformer blocks, the way the classic pretext-task papers score conv1 ... conv5 (RotNet, jigsaw,
split-brain): a pretext task can shape the middle of the network and specialise its last blocks to the task.

  python experiments/layerwise_quality.py --runs=runs/rotation [--runs=...] [--pooling=cls|mean] \
      [--embed_from=student] [--random_init: also a random initialisation of the first run's config] \
      [--json_out=layerwise.jsonl]

Protocol: `quality_fashion_mnist.py`'s (60k bank and probe set, 10k test, weighted kNN k = 20, logistic probe
with its L2 weight chosen on held-out rows), each run's data config (its image size) and its `Method.embed`.
The residual stream after block ``b`` is read while ``Method.embed`` runs (`flax.linen.intercept_methods`), so
every method's own choice of network (DINO's teacher, BYOL's online encoder, ...) holds; the class token
(``cls``) or the mean patch token (``mean``) of each block is pooled in one pass and each block is scored on
its own. These are the tokens before the encoder's final LayerNorm: the last row differs from
`quality_fashion_mnist.py`'s by that normalisation only.
"""
from __future__ import annotations

import json

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp

from sslx import config as config_lib
from sslx import init_from
from sslx.evaluate import run as eval_run
from sslx.models import vit

_POOLINGS = ("cls", "mean")
FLAGS = flags.FLAGS


def pooled_block_tokens(embed, pooling: str, variables, method_state, images) -> list:
  """The pooled token after every transformer block that ``embed`` runs on ``images``, in block order: a list
  of ``(B, D)``. Raises if ``embed`` runs no `vit.Block`."""
  if pooling not in _POOLINGS:
    raise ValueError(f"pooling={pooling!r} is not one of {_POOLINGS}")
  outputs = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, vit.Block) and context.method_name == "__call__":
      outputs.append(out)
    return out

  with nn.intercept_methods(record):
    embed(variables, method_state, images)
  if not outputs:
    raise ValueError("The run's encoder has no unscanned ViT blocks to read (a ResNet, or "
                     "config.model.scan_blocks=True): layer-wise scores read the tokens after each block.")
  return [(tokens[:, 0] if pooling == "cls" else jnp.mean(tokens[:, 1:], axis=1)).astype(jnp.float32)
          for tokens in outputs]


def score_blocks(embed, state, data_config, eval_config, pooling: str) -> list[dict]:
  """kNN and probe scores of each block's pooled token; the features of all blocks come from one pass."""
  example = jnp.zeros((1, data_config.image_size, data_config.image_size, data_config.channels), jnp.float32)
  shapes = jax.eval_shape(lambda: pooled_block_tokens(embed, pooling, *state, example))
  num_blocks, width = len(shapes), shapes[0].shape[-1]

  def all_blocks(variables, method_state, images):
    return jnp.concatenate(pooled_block_tokens(embed, pooling, variables, method_state, images), axis=-1)

  train_x, train_y = eval_run.method_features(all_blocks, state, data_config, eval_config, data_config.split,
                                              eval_config.max_train_examples)
  test_x, test_y = eval_run.method_features(all_blocks, state, data_config, eval_config, data_config.eval_split)
  rows = []
  for block in range(num_blocks):
    columns = slice(block * width, (block + 1) * width)
    scores = {"block": block + 1}
    for task in ("knn", "linear_probe"):
      scores.update(eval_run.score_features(task, (train_x[:, columns], train_y), (test_x[:, columns], test_y),
                                            eval_config))
    rows.append(scores)
  return rows


def _define_flags() -> None:
  """The command's flags, defined only when it runs: tests import this module beside other scripts' flags."""
  flags.DEFINE_multi_string("runs", [], "Pretraining workdirs (ViT encoders) to score block by block.")
  flags.DEFINE_enum("pooling", "cls", _POOLINGS, "The token read after each block.")
  flags.DEFINE_string("embed_from", None, "The runs' network to score (e.g. student, target); None: each run's own.")
  flags.DEFINE_bool("random_init", False, "Also score a random initialisation of the first run's config (its seed).")
  flags.DEFINE_integer("k", 20, "Neighbours of the weighted kNN.")
  flags.DEFINE_string("json_out", None, "Append one JSON line per block to this file.")


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every restore step at INFO
  if not FLAGS.runs:
    raise app.UsageError("Give at least one --runs=<pretraining workdir>.")
  eval_config = config_lib.base_config().eval
  eval_config.update(dict(knn_ks=(FLAGS.k,), probe="logistic", probe_l2=None, max_train_examples=None))
  runs = []
  if FLAGS.random_init:
    first_config = init_from.load_run_config(FLAGS.runs[0])
    method, state = eval_run.random_init(first_config, first_config.seed)
    runs.append(("random init", first_config, method, state))
  for workdir in FLAGS.runs:
    runs.append((workdir, *eval_run.restored_run(workdir, embed_from=FLAGS.embed_from)))
  print(f"| run | block | pooling | kNN top-1 (k={FLAGS.k}) | linear top-1 | probe L2 |\n|---|---|---|---|---|---|")
  for name, run_config, method, state in runs:
    for scores in score_blocks(method.embed, state, run_config.data, eval_config, FLAGS.pooling):
      print(f"| {name} | {scores['block']} | {FLAGS.pooling} | {scores[f'knn{FLAGS.k}_top1']:.2f}% | "
            f"{scores['linear_top1']:.2f}% | {scores['linear_l2']:.0e} |", flush=True)
      if FLAGS.json_out:
        with open(FLAGS.json_out, "a", encoding="utf-8") as f:
          f.write(json.dumps({"features": name, "pooling": FLAGS.pooling, **scores}) + "\n")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
