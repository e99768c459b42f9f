"""Evaluation commands: weighted kNN and a linear probe on a frozen encoder.

    python -m sslx.main --config=configs/eval.py:knn --config.init_from=runs/quickstart --workdir=runs/qs_knn

The encoder and the data set are those of the pretraining run in ``config.init_from`` (its
``config.json`` and newest checkpoint); ``config.init_from=None`` evaluates a randomly initialised
encoder of ``config.model`` on ``config.data`` instead, the baseline that says what pretraining bought.
Results are printed and written to ``<workdir>/results.json``.
"""
from __future__ import annotations

import itertools
import json
import os
import time
from typing import Optional

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from sslx import checks
from sslx import config as config_lib
from sslx import init_from
from sslx import models
from sslx import methods
from sslx import parallel
from sslx.data import pipeline
from sslx.evaluate import diagnostics
from sslx.evaluate import features as features_lib
from sslx.evaluate import knn
from sslx.evaluate import linear_probe
from sslx.methods import build_method


DIAGNOSTICS_EXAMPLES = 4096


def restored_run(run_dir: str, mesh=None, pooling: Optional[str] = None, embed_from: Optional[str] = None):
  """``(run_config, method, (variables, method_state))`` of the newest checkpoint in ``run_dir``.

  Only params, model state and method state are read (no optimizer state), replicated over ``mesh``
  (default ``parallel.create_mesh(1)``, the devices of every process): the encoder is frozen and only the
  batch is split. ``pooling`` (``config.model.pooling``) overrides the run's, and ``embed_from`` the run's
  ``config.method.embed_from``, the network its method evaluates (DINO: ``'teacher' | 'student'``; BYOL and
  MoCo v3: ``'online' | 'target'``); a method with one representation has no such key, which is an error.
  """
  mesh = parallel.create_mesh(1) if mesh is None else mesh
  run_config = init_from.load_run_config(run_dir)
  # The overrides are the keys of the run's config not checked when that run started.
  if pooling is not None:
    run_config.model.pooling = pooling
    models.validate_config(run_config.model, run_config.data.image_size)
  if embed_from is not None:
    if "embed_from" not in run_config.method:
      raise ValueError(f"config.embed_from={embed_from!r}: the {run_config.method.name} run {run_dir} has one "
                       "representation to evaluate, so leave the key unset")
    run_config.method.embed_from = embed_from
    methods.validate_config(run_config)
  reader = init_from.RunReader(run_dir, mesh, run_config)
  state = reader.state()
  reader.close()
  if jax.process_index() == 0:
    print(f"Encoder from {reader.describe()}", flush=True)
  variables = {"params": state["params"], **state["model_state"]}
  return run_config, reader.method, (variables, state["method_state"])


def random_init(config, seed: int):
  """``(method, (variables, method_state))`` of a fresh initialisation of ``config``'s method and encoder."""
  method = build_method(config)
  size = config.data.image_size
  example = {"image": np.zeros((1, size, size, config.data.channels), np.float32),
             "label": np.zeros((1,), np.int32)}
  variables, method_state = jax.jit(method.init)(jax.random.PRNGKey(seed), example)
  return method, (nn.unbox(variables), nn.unbox(method_state))


def local_batch_size(eval_config) -> int:
  num_processes = jax.process_count()
  if eval_config.batch_size % num_processes:
    raise ValueError(f"config.eval.batch_size={eval_config.batch_size} must be divisible by the process "
                     f"count {num_processes}")
  return eval_config.batch_size // num_processes


def _split_batches(data_config, eval_config, split: str, limit=None):
  """This process's share of the first ``limit`` examples of ``split`` (None: all), in batches."""
  loader = pipeline.make_eval_loader(data_config, split=split, batch_size=local_batch_size(eval_config),
                                     process_index=jax.process_index(), process_count=jax.process_count())
  # The first k local batches of all processes together are the first k global batches of the split.
  return iter(loader) if limit is None else itertools.islice(loader, -(-limit // eval_config.batch_size))


def method_features(embed, state, data_config, eval_config, split: str, limit=None, mesh=None):
  """`Method.embed` features of the first ``limit`` examples (in the split's order; None: all) of ``split``.

  ``state`` is ``(variables, method_state)``. ``config.eval.batch_size`` is global: each process reads its
  share (``batch_size / process_count`` rows per batch) and every process gets all the features. ``mesh``
  defaults to ``parallel.create_mesh(1)``, all devices of all processes.
  """
  return features_lib.extract_features(embed, state, _split_batches(data_config, eval_config, split, limit),
                                       mesh=parallel.create_mesh(1) if mesh is None else mesh)


def pixel_embed(variables, method_state, images):
  """The normalised pixels of each image, flattened: the baseline any learned representation must beat.
  An `Method.embed` of no parameters, so the pixels go through the same extraction and protocol."""
  del variables, method_state
  return images.reshape(images.shape[0], -1)


def score_features(task: str, train: tuple, test: tuple, eval_config) -> dict[str, float]:
  """kNN (``task='knn'``) or linear-probe (``'linear_probe'``) accuracies in percent, plus diagnostics."""
  (train_x, train_y), (test_x, test_y) = train, test
  num_classes = int(max(train_y.max(), test_y.max())) + 1
  results = {}
  if task == "knn":
    accuracies = knn.knn_accuracies(train_x, train_y, test_x, test_y, num_classes,
                                    ks=tuple(eval_config.knn_ks), temperature=eval_config.knn_temperature)
    for k, values in accuracies.items():
      results[f"knn{k}_top1"], results[f"knn{k}_top5"] = 100 * values["top1"], 100 * values["top5"]
  elif eval_config.probe == "logistic":
    head = linear_probe.fit_logistic_regression(train_x, train_y, num_classes, l2=eval_config.probe_l2)
    results["linear_top1"] = 100 * linear_probe.evaluate_logistic_regression(head, test_x, test_y)
    results["linear_l2"] = float(head["l2"])
  else:
    params, stats = linear_probe.train_linear_probe(
        train_x, train_y, num_classes, epochs=eval_config.probe_epochs,
        batch_size=eval_config.probe_batch_size, base_lr=eval_config.probe_base_lr,
        warmup_epochs=eval_config.probe_warmup_epochs)
    results["linear_top1"] = 100 * linear_probe.evaluate_linear_probe(params, stats, test_x, test_y)
  # Uniformity's Gram matrix is O(N^2): a few thousand held-out rows estimate every diagnostic well.
  results.update({f"diag/{name}": value
                  for name, value in diagnostics.summary(test_x[:DIAGNOSTICS_EXAMPLES]).items()})
  return results


def evaluate_representation(tasks, embed, state, data_config, eval_config) -> dict[str, float]:
  """Scores of one representation (``embed`` over ``state``, e.g. `pixel_embed` over ``({}, {})``) for each of
  ``tasks`` in {'knn', 'linear_probe'}, features extracted once.

  Features are extracted over the mesh of all processes; the kNN / probe then runs on every process
  alike (same features, same seed), so every process returns the same accuracies.
  """
  start = time.time()
  mesh = parallel.create_mesh(1)
  train = method_features(embed, state, data_config, eval_config, data_config.split,
                          eval_config.max_train_examples, mesh=mesh)
  test = method_features(embed, state, data_config, eval_config, data_config.eval_split, mesh=mesh)
  results = {}
  for task in tasks:
    results.update(score_features(task, train, test, eval_config))
  results["seconds"] = time.time() - start
  return results


def evaluate(config, workdir: str) -> dict[str, float]:
  """Entry point of the ``knn`` and ``linear_probe`` tasks; only process 0 prints and writes results.json."""
  config_lib.validate_eval_config(config.eval)
  local_batch_size(config.eval)
  mappings = init_from.parse_mappings(config.init_from)
  if len(mappings) > 1 or (mappings and (mappings[0].source, mappings[0].target) != ("encoder", "encoder")):
    raise ValueError(f"config.init_from={config.init_from!r}: an evaluation reads one run's encoder; give "
                     "that run's workdir")
  if mappings:
    run_config, method, state = restored_run(mappings[0].run_dir, pooling=config.model.get("pooling"),
                                             embed_from=config.embed_from)
    data_config = run_config.data
    if config.data_dir is not None:
      data_config.data_dir = config.data_dir
    _check_eval_split(config.task, data_config, "the evaluated run's config")
  else:
    if config.embed_from is not None:
      raise ValueError(f"config.embed_from={config.embed_from!r} picks a network of the run that "
                       "config.init_from names; a random initialisation has none to pick")
    checks.validate_run_config(config)
    data_config = config.data
    _check_eval_split(config.task, data_config, "this config")  # before the random init compiles
    method, state = random_init(config, config.seed)
  pipeline.validate_data_config(data_config)
  results = evaluate_representation((config.task,), method.embed, state, data_config, config.eval)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
      json.dump({"task": config.task, "init_from": config.init_from, **results}, f, indent=2)
    print(" | ".join(f"{name} {value:.2f}" for name, value in results.items()), flush=True)
  return results


def _check_eval_split(task: str, data_config, whose: str) -> None:
  if data_config.get("eval_split") is None:
    raise ValueError(f"config.task={task!r} scores the encoder on a held-out split, but "
                     f"config.data.eval_split is None in {whose}")


def compare_with_baselines(config, workdir: str, method, state) -> dict[str, dict[str, float]]:
  """After pretraining: kNN and linear-probe accuracy of the trained encoder beside a random one's and the
  raw pixels', under one protocol."""
  random_method, random_state = random_init(config, config.seed)
  tasks = ("knn", "linear_probe")
  rows = {
      "raw pixels": evaluate_representation(tasks, pixel_embed, ({}, {}), config.data, config.eval),
      "random init": evaluate_representation(tasks, random_method.embed, random_state, config.data,
                                             config.eval),
      f"pretrained ({config.method.name})": evaluate_representation(tasks, method.embed, state, config.data,
                                                                    config.eval),
  }
  if jax.process_index() != 0:
    return rows
  k = config.eval.knn_ks[0]
  print(f"\n{'features':<24} {f'kNN top-1 (k={k})':>18} {'linear top-1':>14}   on {config.data.dataset} "
        f"{config.data.eval_split}")
  for name, values in rows.items():
    print(f"{name:<24} {values[f'knn{k}_top1']:>17.2f}% {values['linear_top1']:>13.2f}%")
  with open(os.path.join(workdir, "eval_after_pretraining.json"), "w", encoding="utf-8") as f:
    json.dump(rows, f, indent=2)
  return rows


_EVAL_TASKS = ("knn", "linear_probe")


def eval_task_config(task: str, like) -> ml_collections.ConfigDict:
  """An evaluation run of ``task`` in {'knn', 'linear_probe'}; settings in ``config.eval``.

  ``like`` is a run config whose encoder, method and data describe the random-init baseline evaluated when
  ``config.init_from`` is None (with ``init_from`` they come from that run).
  """
  if task not in _EVAL_TASKS:
    raise ValueError(f"Unknown evaluation task {task!r}; choose one of {_EVAL_TASKS}")
  config = config_lib.base_config()
  config.task = task
  config.model, config.method, config.data = like.model, like.method, like.data
  # None: the run's own pooling and network; 'cls' / 'mean' evaluates that pooling instead, and e.g. 'student'
  # DINO's student instead of its teacher.
  config.model.pooling = ml_collections.config_dict.placeholder(str)
  config.embed_from = ml_collections.config_dict.placeholder(str)
  config.data_dir = ml_collections.config_dict.placeholder(str)
  return config
