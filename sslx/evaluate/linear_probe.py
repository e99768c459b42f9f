"""Linear probing of frozen features: MAE's recipe (He et al., 2022) and exact logistic regression.

MAE probe: ``logits = W^T BN(z) + b`` where ``BN(z) = (z - mu) / sqrt(sigma^2 + 1e-6)`` has no scale or
shift (it only standardises the features; ``mu`` and ``sigma^2`` are batch statistics in training and
running averages in evaluation). ``W ~ truncnormal(std 0.01)``, ``b = 0``. Trained with cross-entropy
by LARS (momentum 0.9, trust coefficient 0.001, weight decay 0, no trust ratio for vectors) at
``lr = base_lr * batch_size / 256`` with linear warm-up and a cosine decay to 0.

This module trains on precomputed features, i.e. without the random-resized-crop and flip augmentation
MAE applies to the probe's training images, so numbers can differ slightly from the paper's.

Exact probe: multinomial logistic regression on features standardised with the training split's statistics
(MAE's BatchNorm without its batch noise), fitted to convergence by preconditioned full-batch L-BFGS, with
the L2 weight chosen on a held-out slice of the training split; scikit-learn's ``LogisticRegression`` on
``StandardScaler``-ed features with ``C = 1 / (N * l2)``. See :func:`fit_logistic_regression`.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

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


# Decades from 1e-1, which underfits standardised features unless there are only a few thousand examples,
# to 1e-7, nearly unpenalised at 60k: with the mean loss l2 = 1 / (C N) (see fit_logistic_regression), at
# N = 54k it spans scikit-learn's C from 1.9e-4 to 185, its default C = 1 included. On random-init
# quick-start ViT features of Fashion-MNIST the search picks 1e-5 with 10k training images and 1e-7 with
# 60k (test accuracy 82.13 / 82.30 / 82.30 / 82.24% at l2 = 1e-6 / 3e-7 / 1e-7 / 1e-8), and half-decades
# pick the same values there; decades keep the search to 7 fits, ~45 s at 60k x 192 on 2 CPU cores.
L2_GRID = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)

# A dimension spread by less than ~8 float32 ulps of its mean holds only rounding noise: it keeps scale 1.
_CONSTANT_RTOL = 1e-6


def _standardisation(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-dimension ``(mean, scale)``: the mean and the (biased) std, summed in float64.

  The guard against constant dimensions is relative to the mean rather than BatchNorm's absolute
  ``sqrt(var + eps)``, which would shrink a dimension of std ~1e-3: rescaling a dimension by ``a`` rescales
  its scale by exactly ``|a|``, whatever its units.
  """
  mean = feats.mean(axis=0, dtype=np.float64)
  std = feats.std(axis=0, dtype=np.float64)
  scale = np.where(std > _CONSTANT_RTOL * np.abs(mean), std, 1.0)
  return mean.astype(np.float32), scale.astype(np.float32)


@jax.custom_vjp
def _project(feats, feats_t, kernel):
  """``feats @ kernel``, differentiated in ``kernel`` only, by the pre-transposed ``feats_t``: XLA's CPU dot
  contracting the long axis of an ``(N, D)`` operand, ``feats.T @ g``, is ~3x slower than ``feats_t @ g``."""
  return feats @ kernel


def _project_fwd(feats, feats_t, kernel):
  return feats @ kernel, feats_t


def _project_bwd(feats_t, cotangent):
  return None, None, feats_t @ cotangent


_project.defvjp(_project_fwd, _project_bwd)


# The data are arguments, not closed-over constants, so XLA does not embed them in the program, and l2, tol
# and max_iter are traced: one compilation per data shape serves the whole grid.
@jax.jit
def _minimise(params, feats, feats_t, labels, weights, eigvals, eigvecs, l2, tol, max_iter):
  """L-BFGS on ``J`` of :func:`fit_logistic_regression` from ``params``; one ``lax.while_loop``.

  The mean NLL is over the rows of non-zero ``weights``, a 0/1 mask: the held-out search and the refit share
  one data shape, so one compiled program.

  Correlated features make ``J`` ill-conditioned: with ``Sigma = U diag(e) U^T`` the features' second
  moment (``eigvals``, ``eigvecs``), the data term's curvature in ``W`` spans the spread of ``e``, and
  plain L-BFGS needs thousands of steps at small ``l2``. So it runs on ``V`` with ``W = P V``,
  ``P = U diag(d^(-1/2))``, ``d = max(e, 1e-6) + l2``: the same minimiser, but the curvature
  ``Sigma + l2 I`` (up to the softmax's factor) becomes the identity. The floor serves features spanning
  fewer than ``D`` dimensions, where rounding makes ``e`` ~0 or negative; it is relative, as ``sum(e)`` of
  standardised features is the number of non-constant dimensions. The stopping rule is on ``||grad J||``
  in ``(W, b)``. Returns ``(params, iterations)``.
  """
  solver = optax.lbfgs()
  d = jnp.maximum(eigvals, 1e-6) + l2
  precond = eigvecs * jax.lax.rsqrt(d)
  # ||W||^2 = ||P V||^2 = sum_j ||V_j||^2 / d_j, U being orthogonal.
  penalty_weights = 1.0 / d
  # A product, not whitened.T, which XLA would fold back into a dot contracting the long axis.
  whitened, whitened_t = feats @ precond, precond.T @ feats_t

  def objective(params):
    logits = _project(whitened, whitened_t, params["kernel"]) + params["bias"]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    nll = jnp.sum(weights * nll) / jnp.sum(weights)
    return nll + 0.5 * l2 * jnp.sum(penalty_weights[:, None] * params["kernel"] ** 2)

  value_and_grad = optax.value_and_grad_from_state(objective)

  def not_done(carry):
    _, state = carry
    count, grad = optax.tree.get(state, "count"), optax.tree.get(state, "grad")
    # grad_W = P^(-T) grad_V = U diag(d^(1/2)) grad_V.
    grad_kernel = eigvecs @ (grad["kernel"] * jnp.sqrt(d)[:, None])
    norm = jnp.sqrt(jnp.sum(grad_kernel ** 2) + jnp.sum(grad["bias"] ** 2))
    return (count == 0) | ((count < max_iter) & (norm >= tol))

  def iterate(carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=objective)
    return optax.apply_updates(params, updates), state

  start = dict(kernel=eigvecs.T @ params["kernel"] * jnp.sqrt(d)[:, None], bias=params["bias"])
  params, state = jax.lax.while_loop(not_done, iterate, (start, solver.init(start)))
  return dict(kernel=precond @ params["kernel"], bias=params["bias"]), optax.tree.get(state, "count")


def _accuracy(params, feats: np.ndarray, labels: np.ndarray) -> float:
  logits = feats @ np.asarray(params["kernel"]) + np.asarray(params["bias"])
  return float(np.mean(logits.argmax(axis=1) == labels))


def fit_logistic_regression(train_feats, train_labels, num_classes: int, *, l2: Optional[float] = None,
                            l2_grid: Sequence[float] = L2_GRID, heldout_fraction: float = 0.1, seed: int = 0,
                            max_iter: int = 1000, tol: float = 1e-5) -> dict:
  """Exact full-batch multinomial logistic regression on standardised features; L2 chosen on held-out data.

  The features are standardised per dimension with the training split's statistics, ``z = (x - mu) / s``
  (``s`` the std; 1 for a dimension constant to float32 precision), as MAE's affine-free BatchNorm does.
  L-BFGS, preconditioned by the features' second moment, then minimises the strictly convex (for
  ``l2 > 0``; the bias is unpenalised)

    J(W, b) = (1/N) sum_i -log softmax(W^T z_i + b)_{y_i} + (l2 / 2) ||W||_F^2

  until ``||grad J|| < tol`` or ``max_iter`` iterations. Standardising makes the penalty, and so the
  probe, invariant to rescaling or shifting a feature dimension: without it ``l2`` penalises a dimension
  by the inverse square of its scale, which distorts comparisons of encoders whose features differ in scale.

  This is scikit-learn's ``LogisticRegression(C=1 / (N * l2))`` (lbfgs, multinomial) on
  ``StandardScaler``-ed features: scikit-learn minimises ``C sum_i nll_i + ||W||^2 / 2 = C N J``.

  ``l2=None`` (the default) chooses it: a permutation seeded by ``seed`` holds out ``heldout_fraction`` of
  the training split, each value of ``l2_grid`` is fitted on the rest, largest first and each from the
  previous solution (a warm start along the regularisation path), and the best held-out accuracy wins
  (ties: the larger ``l2``). The probe is then refitted on the whole split with that ``l2``, from the
  winner's solution. Both stages standardise with the whole split's ``mu, s`` (they use no labels), so
  their solutions live in the same coordinates. A float ``l2`` skips the search and fits once.

  Args:
    train_feats, train_labels: ``(N, D)`` features and ``(N,)`` int labels.
    num_classes: output classes.
    l2: the penalty weight in ``J``; None: chosen from ``l2_grid`` (positive values) as above.
    heldout_fraction, seed: the held-out share of the training split and the seed of its permutation.
    max_iter, tol: stopping rule of every fit.

  Returns:
    The head for :func:`logistic_regression_logits`: ``'kernel'`` ``(D, C)``, ``'bias'`` ``(C,)``,
    ``'mean'`` and ``'scale'`` ``(D,)`` (logits ``((x - mean) / scale) @ kernel + bias``); ``'l2'``, the
    float used; ``'heldout_accuracy'``, ``{l2: held-out accuracy in [0, 1]}`` in search order (empty for a
    fixed ``l2``); ``'iterations'``, the final fit's L-BFGS steps (``max_iter``: ``tol`` was not reached).
  """
  feats, labels = _check_inputs(train_feats, train_labels, num_classes)
  grid = sorted({float(value) for value in l2_grid}, reverse=True)
  num_heldout = int(round(heldout_fraction * len(feats)))
  if l2 is None and (not grid or grid[-1] <= 0):
    raise ValueError(f"l2_grid must hold positive values; got {tuple(l2_grid)}.")
  if l2 is None and not 0 < num_heldout < len(feats):
    raise ValueError(f"heldout_fraction={heldout_fraction} of {len(feats)} examples leaves no held-out or no "
                     "fitting example; pass more examples or a fixed l2.")
  if l2 is not None and l2 < 0:
    raise ValueError(f"l2 must be non-negative; got {l2}.")
  mean, scale = _standardisation(feats)
  feats = (feats - mean) / scale
  # Only a preconditioner (see _minimise), so the whole split's moment serves the held-out search too.
  eigvals, eigvecs = (jnp.asarray(m, jnp.float32) for m in np.linalg.eigh(np.cov(feats.T, bias=True)))
  data = jnp.asarray(feats), jnp.asarray(feats.T), jnp.asarray(labels)

  def minimise(params, weights, l2):
    return _minimise(params, *data, jnp.asarray(weights, jnp.float32), eigvals, eigvecs, l2, tol, max_iter)

  params = dict(kernel=jnp.zeros((feats.shape[1], num_classes), jnp.float32),
                bias=jnp.zeros((num_classes,), jnp.float32))
  heldout_accuracy = {}
  if l2 is None:
    order = np.random.default_rng(seed).permutation(len(feats))
    heldout = order[:num_heldout]
    fitting = np.ones(len(feats))
    fitting[heldout] = 0
    best = None
    for value in grid:
      params, _ = minimise(params, fitting, value)
      heldout_accuracy[value] = _accuracy(params, feats[heldout], labels[heldout])
      # Strictly better only: the grid runs from the largest l2 down, so a tie keeps the larger one.
      if best is None or heldout_accuracy[value] > heldout_accuracy[best]:
        best, best_params = value, params
    l2, params = best, best_params
  params, iterations = minimise(params, np.ones(len(feats)), float(l2))
  return dict(jax.tree.map(np.asarray, params), mean=mean, scale=scale, l2=float(l2),
              heldout_accuracy=heldout_accuracy, iterations=int(iterations))


def logistic_regression_logits(head: dict, feats) -> np.ndarray:
  """Logits ``(N, C)`` of a :func:`fit_logistic_regression` head, standardised by the training statistics."""
  standardised = (np.asarray(feats, np.float32) - head["mean"]) / head["scale"]
  return standardised @ head["kernel"] + head["bias"]


def evaluate_logistic_regression(head: dict, feats, labels) -> float:
  """Top-1 accuracy (fraction in [0, 1]) of a :func:`fit_logistic_regression` head."""
  logits = logistic_regression_logits(head, feats)
  return float(np.mean(logits.argmax(axis=1) == np.asarray(labels)))
