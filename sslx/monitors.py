"""What the training loop watches besides the loss: online probe, periodic kNN, diagnostics, held-out eval.

**Online linear probe** (when the data has labels). A linear classifier ``W z + b`` on stop-gradient
features ``z`` of the encoder in evaluation mode, trained by its own Adam at every step on a strided
subset of the batch (``config.monitor.probe_batch_size`` rows, so its extra forward pass stays cheap):

    L_probe = -(1/|V|) sum_{i in V} log softmax(W z_i + b)_{y_i},   V = rows with 0 <= y_i < C,

Its gradient never reaches the encoder, so pretraining is unchanged; its held-out accuracy is a
running linear-probe estimate at no extra pass over the data (solo-learn's online classifier).

**Periodic monitor** every ``config.monitor.every_steps`` (and at step 0, so every curve starts from
the random initialisation): features of the first ``knn_train_examples`` training images and the first
``knn_test_examples`` held-out images (evaluation transform), then weighted kNN top-1 (DINO's, k =
``knn_k``), the online probe's held-out top-1, and the label-free diagnostics of
`sslx.evaluate.diagnostics` (per-dimension std with a collapse warning, RankMe, uniformity). Without an
evaluation split (``config.data.eval_split`` None) only the diagnostics run, on the training subset; the
online probe still trains when the training images have labels, but nothing scores it.

**Held-out evaluation** for supervised bundles (`Method.evaluate`, e.g. fine-tuning), over the whole
evaluation split every ``config.eval.every_epochs``.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from sslx import parallel
from sslx import xla_options
from sslx.data import pipeline
from sslx.evaluate import diagnostics
from sslx.evaluate import knn
from sslx.evaluate import run as eval_run


def image_key(batch: dict) -> str:
  """The batch entry the monitors look at: the single view, or the first of several."""
  return "image" if "image" in batch else "view_0"


@dataclasses.dataclass(frozen=True)
class OnlineProbe:
  """The online linear probe: its state lives in ``TrainState.probe``, its update in the train step.

  ``embed`` is the method's `Method.embed` ``(variables, method_state, images) -> (B, D)``.
  """
  embed: Callable[[Any, Any, jax.Array], jax.Array]
  num_classes: int
  batch_size: int
  tx: optax.GradientTransformation

  def init(self, feature_dim: int) -> dict:
    params = {"kernel": jnp.zeros((feature_dim, self.num_classes), jnp.float32),
              "bias": jnp.zeros((self.num_classes,), jnp.float32)}
    return {"params": params, "opt_state": self.tx.init(params)}

  def update(self, probe_state: dict, variables: Any, method_state: Any, batch: dict) -> tuple[dict, dict]:
    """One Adam step on stop-gradient features of a strided subset of ``batch``."""
    images, labels = batch[image_key(batch)], batch["label"]
    # Strided rows stay spread over the devices a batch-sharded array lives on.
    stride = max(images.shape[0] // self.batch_size, 1)
    images, labels = images[::stride][:self.batch_size], labels[::stride][:self.batch_size]
    features = jax.lax.stop_gradient(self.embed(variables, method_state, images))
    (loss, accuracy), grads = jax.value_and_grad(probe_loss, has_aux=True)(
        probe_state["params"], features, labels, self.num_classes)
    updates, opt_state = self.tx.update(grads, probe_state["opt_state"], probe_state["params"])
    new_state = {"params": optax.apply_updates(probe_state["params"], updates), "opt_state": opt_state}
    return new_state, {"probe/loss": loss, "probe/train_top1": accuracy}


def probe_logits(probe_params: dict, features: jax.Array) -> jax.Array:
  return features @ probe_params["kernel"] + probe_params["bias"]


def probe_loss(probe_params: dict, features: jax.Array, labels: jax.Array, num_classes: int):
  """Mean softmax cross-entropy over rows with a label in ``[0, C)`` (see module docstring); + accuracy %."""
  logits = probe_logits(probe_params, features)
  valid = (labels >= 0) & (labels < num_classes)
  safe_labels = jnp.where(valid, labels, 0)
  per_row = optax.softmax_cross_entropy_with_integer_labels(logits, safe_labels)
  count = jnp.maximum(jnp.sum(valid), 1)
  loss = jnp.sum(jnp.where(valid, per_row, 0.0)) / count
  correct = (jnp.argmax(logits, axis=-1) == labels) & valid
  return loss, 100.0 * jnp.sum(correct) / count


def make_online_probe(config, embed, num_classes: Optional[int]) -> Optional[OnlineProbe]:
  if not config.monitor.online_probe or not num_classes:
    return None
  return OnlineProbe(embed=embed, num_classes=num_classes,
                     batch_size=min(config.monitor.probe_batch_size, config.batch_size),
                     tx=optax.adam(config.monitor.probe_lr))


class RepresentationMonitor:
  """The periodic kNN / probe / diagnostics report on fixed subsets of the training and held-out splits."""

  def __init__(self, config, embed, mesh):
    self._config, self._embed, self._mesh = config, embed, mesh
    self.num_classes = config.monitor.num_classes or self._num_classes_from_labels()

  def _num_classes_from_labels(self) -> Optional[int]:
    """Largest label + 1 over the monitor's subsets; None for unlabelled data (label -1)."""
    config = self._config
    parts = [self._labels(config.data.split, config.monitor.knn_train_examples)]
    if config.data.eval_split is not None:
      parts.append(self._labels(config.data.eval_split, config.monitor.knn_test_examples))
    labels = np.concatenate(parts)
    return int(labels.max()) + 1 if labels.size and labels.min() >= 0 else None

  def _labels(self, split: str, limit: int) -> np.ndarray:
    """Labels of the first ``limit`` examples of ``split`` (this process's share suffices to see them)."""
    loader = pipeline.make_eval_loader(self._config.data, split=split, batch_size=self._config.eval.batch_size)
    batches = itertools.islice(loader, -(-limit // self._config.eval.batch_size))
    return np.concatenate([batch["label"][np.asarray(batch["mask"], bool)] for batch in batches])

  def _features(self, state, split: str, limit: int) -> tuple[np.ndarray, np.ndarray]:
    return eval_run.method_features(self._embed, state, self._config.data, self._config.eval, split, limit,
                                    mesh=self._mesh)

  def report(self, variables: Any, method_state: Any, probe_params: Optional[dict]) -> dict[str, float]:
    monitor = self._config.monitor
    state = (variables, method_state)
    train_x, train_y = self._features(state, self._config.data.split, monitor.knn_train_examples)
    if self._config.data.eval_split is None:
      # Nothing held out to score kNN or the probe on; the label-free diagnostics still watch for collapse.
      return _diagnostics(train_x)
    test_x, test_y = self._features(state, self._config.data.eval_split, monitor.knn_test_examples)
    out = _diagnostics(test_x)
    if self.num_classes:
      accuracy = knn.knn_accuracies(train_x, train_y, test_x, test_y, self.num_classes,
                                    ks=(monitor.knn_k,), temperature=self._config.eval.knn_temperature)
      out[f"monitor/knn{monitor.knn_k}_top1"] = 100 * accuracy[monitor.knn_k]["top1"]
    if probe_params is not None:
      predictions = np.asarray(probe_logits(jax.device_get(probe_params), test_x)).argmax(axis=1)
      out["monitor/probe_top1"] = 100 * float(np.mean(predictions == test_y))
    return out


def _diagnostics(features: np.ndarray) -> dict[str, float]:
  """`diagnostics.summary` as ``diag/<name>`` scalars, with a warning when the features collapsed."""
  summary = diagnostics.summary(features)
  if summary["collapsed"]:
    logging.warning("Representation collapse: the per-dimension std of the normalised monitor features is "
                    "%.2g (about 1/sqrt(D) = %.2g when spread out).", summary["std"],
                    1 / np.sqrt(features.shape[1]))
  return {f"diag/{name}": value for name, value in summary.items()}


def make_held_out_evaluation(method, config, mesh, state_sharding) -> Optional[Callable[[Any], dict]]:
  """``state -> {'eval/<name>': mean}`` over the whole ``config.data.eval_split``, or None if unused."""
  if method.evaluate is None or config.eval.every_epochs is None:
    return None
  batch_sharding = parallel.batch_sharding(mesh)
  variables_sharding = {"params": state_sharding.params, **state_sharding.model_state}
  evaluate = xla_options.jit(method.evaluate,
                              in_shardings=(variables_sharding, state_sharding.method_state, batch_sharding),
                              out_shardings=parallel.replicated(mesh))

  def run(state) -> dict[str, float]:
    loader = pipeline.make_eval_loader(config.data, split=config.data.eval_split,
                                       batch_size=eval_run.local_batch_size(config.eval),
                                       process_index=jax.process_index(), process_count=jax.process_count())
    totals: dict[str, float] = {}
    for batch in loader:
      batch = parallel.global_batch({key: batch[key] for key in ("image", "label", "mask")}, batch_sharding)
      for name, value in jax.device_get(evaluate(state.variables, state.method_state, batch)).items():
        totals[name] = totals.get(name, 0.0) + float(value)
    count = max(totals.pop("count"), 1.0)
    return {f"eval/{name}": value / count for name, value in totals.items()}
  return run
