"""Evaluation commands: weighted kNN and a linear probe on a frozen encoder.

    python -m sslx.main --config=configs/eval.py:knn --config.init_from=runs/quickstart --workdir=runs/qs_knn

The encoder and the data set are those of the pretraining run in ``config.init_from`` (its
``config.json`` and newest checkpoint); ``config.init_from=None`` evaluates a randomly initialised
encoder of ``config.model`` on ``config.data`` instead, the baseline that says what pretraining bought.
Results are printed and written to ``<workdir>/results.json``.
"""
from __future__ import annotations

import functools
import itertools
import json
import os
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from sslx import checkpoint as checkpoint_lib
from sslx import config as config_lib
from sslx import parallel
from sslx.data import pipeline
from sslx.evaluate import diagnostics
from sslx.evaluate import features as features_lib
from sslx.evaluate import knn
from sslx.evaluate import linear_probe
from sslx.methods import build_method
from sslx.models import vit


DIAGNOSTICS_EXAMPLES = 4096


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a pretraining run wrote to ``<workdir>/config.json``."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.init_from={workdir!r} holds no config.json ({path}); point it at the "
                            "--workdir of an sslx pretraining run")
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))


def restore_encoder(run_config, workdir: str, mesh=None) -> Any:
  """The encoder parameters of the newest checkpoint in ``workdir``, replicated over ``mesh``.

  Only ``params['encoder']`` is read (no optimizer or method state). ``mesh`` (default
  ``parallel.create_mesh(1)``) spans the devices of every process, so each process holds a full copy:
  the encoder is frozen and only the batch is split.
  """
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=1)
  step = checkpointer.latest_step()
  if step is None:
    raise FileNotFoundError(f"config.init_from={workdir!r} has no checkpoint in {checkpointer.directory}")
  size = run_config.data.image_size
  example = {"image": jax.ShapeDtypeStruct((1, size, size, run_config.data.channels), np.float32),
             "label": jax.ShapeDtypeStruct((1,), np.int32)}
  method = build_method(run_config)
  params = jax.eval_shape(lambda rng, batch: method.init(rng, batch)[0], jax.random.PRNGKey(0), example)
  replicated = parallel.replicated(parallel.create_mesh(1) if mesh is None else mesh)
  abstract = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated),
                          nn.unbox(params)["encoder"])
  checkpointer.check_params_match(step, abstract, subtree="encoder",
                                  hint=f"The config.json in config.init_from={workdir!r} does not describe its "
                                  "checkpoint (edited, or written by another sslx version).")
  encoder = checkpointer.restore_params(step, {"encoder": abstract})["encoder"]
  checkpointer.close()
  if jax.process_index() == 0:
    print(f"Encoder from {checkpointer.directory}/{step}", flush=True)
  return encoder


def random_encoder(model_config, data_config, seed: int) -> Any:
  size = data_config.image_size
  images = np.zeros((1, size, size, data_config.channels), np.float32)
  variables = jax.jit(vit.encoder_from_config(model_config).init, static_argnames="train")(
      jax.random.PRNGKey(seed), images, train=False)
  return nn.unbox(variables)["params"]


@functools.lru_cache(maxsize=None)
def _encoder_apply(encoder: nn.Module):
  """One bound ``apply`` per distinct encoder: modules built from equal configs compare equal, and
  extraction compiles once per ``apply`` object, so the bank and the queries share one program."""
  return encoder.apply


def local_batch_size(eval_config) -> int:
  num_processes = jax.process_count()
  if eval_config.batch_size % num_processes:
    raise ValueError(f"config.eval.batch_size={eval_config.batch_size} must be divisible by the process count "
                     f"{num_processes}")
  return eval_config.batch_size // num_processes


def encoder_features(model_config, encoder_params, data_config, eval_config, split: str, limit=None, mesh=None):
  """Features of the first ``limit`` examples (in the split's order; None: all) of ``split``.

  ``config.eval.batch_size`` is global: each process reads its share (``batch_size / process_count``
  rows per batch) and every process gets all the features. ``mesh`` defaults to
  ``parallel.create_mesh(1)``, all devices of all processes.
  """
  loader = pipeline.make_eval_loader(data_config, split=split, batch_size=local_batch_size(eval_config),
                                     process_index=jax.process_index(), process_count=jax.process_count())
  # The first k local batches of all processes together are the first k global batches of the split.
  batches = iter(loader) if limit is None else itertools.islice(loader, -(-limit // eval_config.batch_size))
  apply = _encoder_apply(vit.encoder_from_config(model_config))
  return features_lib.extract_features(apply, encoder_params, batches, pooling=eval_config.pooling,
                                       mesh=parallel.create_mesh(1) if mesh is None else mesh)


def evaluate_encoder(task: str, model_config, encoder_params, data_config, eval_config) -> dict[str, float]:
  """kNN (``task='knn'``) or linear-probe (``'linear_probe'``) accuracies of one encoder, in percent.

  Features are extracted over the mesh of all processes; the kNN / probe then runs on every process
  alike (same features, same seed), so every process returns the same accuracies.
  """
  start = time.time()
  mesh = parallel.create_mesh(1)
  train_x, train_y = encoder_features(model_config, encoder_params, data_config, eval_config, data_config.split,
                                      eval_config.max_train_examples, mesh=mesh)
  test_x, test_y = encoder_features(model_config, encoder_params, data_config, eval_config,
                                    data_config.eval_split, mesh=mesh)
  num_classes = int(max(train_y.max(), test_y.max())) + 1
  results = {}
  if task == "knn":
    accuracies = knn.knn_accuracies(train_x, train_y, test_x, test_y, num_classes, ks=tuple(eval_config.knn_ks),
                                    temperature=eval_config.knn_temperature)
    for k, values in accuracies.items():
      results[f"knn{k}_top1"], results[f"knn{k}_top5"] = 100 * values["top1"], 100 * values["top5"]
  elif eval_config.probe == "logistic":
    head = linear_probe.fit_logistic_regression(train_x, train_y, num_classes, l2=eval_config.probe_l2)
    results["linear_top1"] = 100 * linear_probe.evaluate_logistic_regression(head, test_x, test_y)
  else:
    params, stats = linear_probe.train_linear_probe(
        train_x, train_y, num_classes, epochs=eval_config.probe_epochs, batch_size=eval_config.probe_batch_size,
        base_lr=eval_config.probe_base_lr, warmup_epochs=eval_config.probe_warmup_epochs)
    results["linear_top1"] = 100 * linear_probe.evaluate_linear_probe(params, stats, test_x, test_y)
  # Uniformity's Gram matrix is O(N^2): a few thousand held-out rows estimate every diagnostic well.
  results.update({f"diag/{name}": value
                  for name, value in diagnostics.summary(test_x[:DIAGNOSTICS_EXAMPLES]).items()})
  results["seconds"] = time.time() - start
  return results


def evaluate(config, workdir: str) -> dict[str, float]:
  """Entry point of the ``knn`` and ``linear_probe`` tasks; only process 0 prints and writes results.json."""
  config_lib.validate_eval_config(config.eval)
  local_batch_size(config.eval)
  if config.init_from is not None:
    run_config = load_run_config(config.init_from)
    model_config, data_config = run_config.model, run_config.data
    if config.data_dir is not None:
      data_config.data_dir = config.data_dir
    encoder_params = restore_encoder(run_config, config.init_from)
  else:
    model_config, data_config = config.model, config.data
    encoder_params = random_encoder(model_config, data_config, config.seed)
  pipeline.validate_data_config(data_config)
  results = evaluate_encoder(config.task, model_config, encoder_params, data_config, config.eval)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
      json.dump({"task": config.task, "init_from": config.init_from, **results}, f, indent=2)
    print(" | ".join(f"{name} {value:.2f}" for name, value in results.items()), flush=True)
  return results


def compare_with_random_init(config, workdir: str, encoder_params) -> dict[str, dict[str, float]]:
  """After pretraining: kNN and linear-probe accuracy of the trained encoder beside a random one's."""
  rows = {}
  for name, params in (("random init", random_encoder(config.model, config.data, config.seed)),
                       (f"pretrained ({config.method.name})", encoder_params)):
    rows[name] = {**evaluate_encoder("knn", config.model, params, config.data, config.eval),
                  **evaluate_encoder("linear_probe", config.model, params, config.data, config.eval)}
  if jax.process_index() != 0:
    return rows
  k = config.eval.knn_ks[0]
  print(f"\n{'encoder':<24} {f'kNN top-1 (k={k})':>18} {'linear top-1':>14}   on {config.data.dataset} "
        f"{config.data.eval_split}")
  for name, values in rows.items():
    print(f"{name:<24} {values[f'knn{k}_top1']:>17.2f}% {values['linear_top1']:>13.2f}%")
  with open(os.path.join(workdir, "eval_after_pretraining.json"), "w", encoding="utf-8") as f:
    json.dump(rows, f, indent=2)
  return rows


_EVAL_TASKS = ("knn", "linear_probe")


def eval_task_config(task: str) -> ml_collections.ConfigDict:
  """An evaluation run of ``task`` in {'knn', 'linear_probe'}; settings in ``config.eval``."""
  if task not in _EVAL_TASKS:
    raise ValueError(f"Unknown evaluation task {task!r}; choose one of {_EVAL_TASKS}")
  config = config_lib.pretrain_config()
  config.task = task
  config.init_from = ml_collections.config_dict.placeholder(str)
  config.data_dir = ml_collections.config_dict.placeholder(str)
  return config
