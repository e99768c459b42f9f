r"""What a DINO run's teacher outputs on Fashion-MNIST test images: how much of its pooled features is shared by
every image, how far its logits differ between images, and its entropy before and after centring (the
diagnosis of docs/benchmarks.md, 2026-12-07).

  python experiments/dino_teacher_stats.py runs/dino_1ep            # the newest checkpoint of a DINO run
  python experiments/dino_teacher_stats.py init:runs/dino_1ep       # a random initialisation of its config

One JSON line per argument, on the first 512 test images (full size, normalised as in training).
"""
from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from sslx import init_from
from sslx.data import sources
from sslx.evaluate import run as run_lib
from sslx.methods import dino
from sslx.methods import subtree_variables

NUM_IMAGES = 512


def mean_pairwise_cosine(x) -> float:
  x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  n = x.shape[0]
  return float((jnp.sum(x @ x.T) - n) / (n * n - n))


def entropy(logits, temperature) -> float:
  p = jax.nn.softmax(logits / temperature, axis=-1)
  return float(jnp.mean(-jnp.sum(p * jnp.log(p + 1e-30), axis=-1)))


def teacher_stats(config, method_state, images) -> dict:
  _, teacher = dino.networks(config)
  variables = method_state["teacher"]
  pooled, _ = teacher.encoder.apply(subtree_variables(variables, "encoder"), images, train=False)
  logits = teacher.apply(variables, [images], train=False)[0]
  tau = float(config.method.teacher_temperature)
  return dict(
      pooled_mean_cosine=mean_pairwise_cosine(pooled),
      pooled_centred_mean_cosine=mean_pairwise_cosine(pooled - pooled.mean(0)),
      pooled_std_over_norm=float(pooled.std(0).mean() / jnp.linalg.norm(pooled, axis=-1).mean()),
      logit_std_across_images=float(logits.std(0).mean()),
      logit_std_across_prototypes=float(logits.std(1).mean()),
      entropy_raw=entropy(logits, tau), entropy_centred=entropy(logits - method_state["center"], tau),
      ln_k=float(np.log(logits.shape[-1])))


def test_images(config) -> jnp.ndarray:
  source = sources.make_source(config.data, "test")
  x = np.stack([np.asarray(source[i]["image"]) for i in range(NUM_IMAGES)]).astype(np.float32)
  x = x[..., None] if x.ndim == 3 else x
  x = x / 255.0 if x.max() > 1.5 else x
  return jnp.asarray((x - np.asarray(config.data.mean)) / np.asarray(config.data.std))


def main(arguments) -> None:
  for argument in arguments:
    if argument.startswith("init:"):
      config = init_from.load_run_config(argument[len("init:"):])
      _, (_, method_state) = run_lib.random_init(config, int(config.seed))
    else:
      config, _, (_, method_state) = run_lib.restored_run(argument)
    if config.method.name != "dino":
      raise SystemExit(f"{argument} is a {config.method.name} run, not a DINO run")
    print(json.dumps(dict(run=argument, **teacher_stats(config, method_state, test_images(config)))), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
