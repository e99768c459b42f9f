"""Linear probing of frozen features: MAE's recipe (He et al., 2022) and exact logistic regression.

MAE probe: ``logits = W^T BN(z) + b`` where ``BN(z) = (z - mu) / sqrt(sigma^2 + 1e-6)`` has no scale or
shift (it only standardises the features; ``mu`` and ``sigma^2`` are batch statistics in training and
running averages in evaluation). ``W ~ truncnormal(std 0.01)``, ``b = 0``. Trained with cross-entropy
by LARS (momentum 0.9, trust coefficient 0.001, weight decay 0, no trust ratio for vectors) at
``lr = base_lr * batch_size / 256`` with linear warm-up and a cosine decay to 0.

This module trains on precomputed features, i.e. without the random-resized-crop and flip augmentation
MAE applies to the probe's training images, so numbers can differ slightly from the paper's.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn


class LinearProbe(nn.Module):
  """Affine-free BatchNorm followed by a linear classifier. Params ``{'head'}``, stats ``{'norm'}``."""
  num_classes: int

  @nn.compact
  def __call__(self, features, *, train: bool):
    # PyTorch's BatchNorm momentum 0.1 is Flax's 0.9 (the weight kept on the running average). Flax
    # averages the biased batch variance where PyTorch uses the unbiased one: negligible at probe batch sizes.
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-6, use_bias=False,
                     use_scale=False, name="norm")(features.astype(jnp.float32))
    # MAE's trunc_normal_(std=0.01) truncates at +-2 absolute, i.e. +-200 standard deviations.
    kernel_init = nn.initializers.truncated_normal(0.01, lower=-200.0, upper=200.0)
    return nn.Dense(self.num_classes, kernel_init=kernel_init, bias_init=nn.initializers.zeros,
                    name="head")(x)


def _matrices_only(params: Any) -> Any:
  """MAE's LARS skips weight decay and the trust ratio for parameters with ndim <= 1 (the bias)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def _check_inputs(features, labels, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  features, labels = np.asarray(features, np.float32), np.asarray(labels, np.int32)
  if features.ndim != 2 or labels.shape != (len(features),):
    raise ValueError(f"Expected features (N, D) and labels (N,); got {features.shape} and {labels.shape}.")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"Labels must lie in [0, {num_classes}); got range [{labels.min()}, {labels.max()}].")
  return features, labels


def train_linear_probe(train_feats, train_labels, num_classes: int, *, epochs: int = 90,
                       batch_size: int = 16384, base_lr: float = 0.1, warmup_epochs: float = 10,
                       weight_decay: float = 0.0, seed: int = 0,
                       on_epoch: Optional[Callable[[int, float], None]] = None) -> tuple[Any, Any]:
  """Trains :class:`LinearProbe` on fixed features with MAE's LARS recipe (defaults: the paper's).

  Every epoch visits a fresh permutation in ``N // batch_size`` full batches (the remainder is left out,
  as with ``drop_last``); one jitted ``lax.scan`` runs a whole epoch on device.

  Args:
    train_feats, train_labels: ``(N, D)`` features and ``(N,)`` int labels.
    num_classes: output classes.
    epochs, batch_size, warmup_epochs: schedule; ``lr = base_lr * batch_size / 256`` at its peak.
    base_lr, weight_decay: LARS hyper-parameters.
    seed: seeds the head initialisation and the shuffling.
    on_epoch: optional ``(epoch, mean_train_loss)`` callback, e.g. for logging.

  Returns:
    ``(params, batch_stats)`` for :func:`linear_probe_logits` / :func:`evaluate_linear_probe`.
  """
  feats, labels = _check_inputs(train_feats, train_labels, num_classes)
  steps_per_epoch = len(feats) // batch_size
  if steps_per_epoch < 1 or epochs < 1:
    raise ValueError(f"Need epochs >= 1 and at least one full batch: {len(feats)} examples, "
                     f"batch_size={batch_size}, epochs={epochs}.")
  total_steps = epochs * steps_per_epoch
  warmup_steps = min(int(round(warmup_epochs * steps_per_epoch)), total_steps - 1)
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=base_lr * batch_size / 256, warmup_steps=warmup_steps,
      decay_steps=total_steps, end_value=0.0)
  # optax applies the learning rate before the momentum trace, MAE's LARS after it; the two agree for a
  # constant rate and differ only slightly along the schedule.
  tx = optax.lars(schedule, weight_decay=weight_decay, weight_decay_mask=_matrices_only,
                  trust_ratio_mask=_matrices_only, momentum=0.9)

  model = LinearProbe(num_classes)
  init_key, shuffle_key = jax.random.split(jax.random.key(seed))
  variables = model.init(init_key, jnp.zeros((1, feats.shape[1]), jnp.float32), train=False)
  state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))

  @jax.jit
  def run_epoch(state, feats, labels, key):
    order = jax.random.permutation(key, len(feats))[:steps_per_epoch * batch_size]

    def step(state, idx):
      params, batch_stats, opt_state = state

      def loss_fn(params):
        logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, feats[idx],
                                      train=True, mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels[idx]).mean()
        return loss, updates["batch_stats"]

      (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

    state, losses = jax.lax.scan(step, state, order.reshape(steps_per_epoch, batch_size))
    return state, losses.mean()

  feats, labels = jnp.asarray(feats), jnp.asarray(labels)
  for epoch in range(epochs):
    state, loss = run_epoch(state, feats, labels, jax.random.fold_in(shuffle_key, epoch))
    if on_epoch is not None:
      on_epoch(epoch, float(loss))
  return state[0], state[1]


@jax.jit
def _probe_logits(params, batch_stats, feats):
  num_classes = params["head"]["kernel"].shape[-1]
  return LinearProbe(num_classes).apply({"params": params, "batch_stats": batch_stats}, feats, train=False)


def linear_probe_logits(params, batch_stats, feats, *, batch_size: int = 8192) -> np.ndarray:
  """Evaluation-mode logits ``(N, C)``: BatchNorm uses its running statistics, never the batch's."""
  feats = np.asarray(feats, np.float32)
  return np.concatenate([np.asarray(_probe_logits(params, batch_stats, feats[i:i + batch_size]))
                         for i in range(0, len(feats), batch_size)])


def evaluate_linear_probe(params, batch_stats, feats, labels, *, batch_size: int = 8192) -> float:
  """Top-1 accuracy (fraction in [0, 1]) of the trained probe."""
  logits = linear_probe_logits(params, batch_stats, feats, batch_size=batch_size)
  return float(np.mean(logits.argmax(axis=1) == np.asarray(labels)))


def fit_logistic_regression(train_feats, train_labels, num_classes: int, *, l2: float = 1e-4,
                            max_iter: int = 1000, tol: float = 1e-5) -> dict:
  """Exact full-batch multinomial logistic regression by L-BFGS, for datasets that fit in memory.

  Minimises the strictly convex (for ``l2 > 0``; the bias is unpenalised)

    J(W, b) = (1/N) sum_i -log softmax(W^T x_i + b)_{y_i} + (l2 / 2) ||W||_F^2

  until ``||grad J|| < tol`` or ``max_iter`` iterations; one jitted ``lax.while_loop``.

  Returns:
    ``{'kernel': (D, C), 'bias': (C,)}``; logits are ``x @ kernel + bias``.
  """
  feats, labels = _check_inputs(train_feats, train_labels, num_classes)
  solver = optax.lbfgs()

  # The data are arguments, not closed-over constants, so XLA does not embed them in the program.
  @jax.jit
  def solve(params, feats, labels):
    def objective(params):
      logits = feats @ params["kernel"] + params["bias"]
      nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return nll + 0.5 * l2 * jnp.sum(params["kernel"] ** 2)

    value_and_grad = optax.value_and_grad_from_state(objective)

    def not_done(carry):
      _, state = carry
      count, grad = optax.tree.get(state, "count"), optax.tree.get(state, "grad")
      return (count == 0) | ((count < max_iter) & (optax.tree.norm(grad) >= tol))

    def iterate(carry):
      params, state = carry
      value, grad = value_and_grad(params, state=state)
      updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=objective)
      return optax.apply_updates(params, updates), state

    return jax.lax.while_loop(not_done, iterate, (params, solver.init(params)))[0]

  init = dict(kernel=jnp.zeros((feats.shape[1], num_classes), jnp.float32),
              bias=jnp.zeros((num_classes,), jnp.float32))
  return jax.tree.map(np.asarray, solve(init, jnp.asarray(feats), jnp.asarray(labels)))


def evaluate_logistic_regression(params: dict, feats, labels) -> float:
  """Top-1 accuracy (fraction in [0, 1]) of ``argmax(x @ kernel + bias)``."""
  logits = np.asarray(feats, np.float32) @ params["kernel"] + params["bias"]
  return float(np.mean(logits.argmax(axis=1) == np.asarray(labels)))
