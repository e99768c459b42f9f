"""MAE linear probe (BatchNorm + linear, LARS) and exact logistic regression: synthetic features, and
random features of real Fashion-MNIST images against scikit-learn."""
import jax
import numpy as np
import optax
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from sslx.data import sources
from sslx.evaluate import linear_probe as lp


def _separable(seed=0, num=2048, dim=16, num_classes=4):
  """Well-separated Gaussian classes, then badly scaled and shifted so the BatchNorm has work to do."""
  rng = np.random.RandomState(seed)
  means = 3.0 * rng.randn(num_classes, dim)
  scale, shift = rng.uniform(0.1, 10.0, dim), rng.uniform(-20.0, 20.0, dim)

  def sample(n):
    labels = rng.randint(0, num_classes, n)
    return ((means[labels] + 0.5 * rng.randn(n, dim)) * scale + shift).astype(np.float32), labels

  return sample(num), sample(512), num_classes


@pytest.fixture(scope="module")
def trained():
  (x, y), test, num_classes = _separable()
  losses = []
  params, batch_stats = lp.train_linear_probe(x, y, num_classes, epochs=200, batch_size=1024,
                                              warmup_epochs=20, seed=0,
                                              on_epoch=lambda epoch, loss: losses.append(loss))
  return params, batch_stats, (x, y), test, num_classes, losses


def test_probe_reaches_the_logistic_regression_accuracy(trained):
  params, batch_stats, (x, y), (x_test, y_test), num_classes, losses = trained
  exact = lp.fit_logistic_regression(x, y, num_classes, l2=1e-3)
  assert lp.evaluate_logistic_regression(exact, x, y) == 1.0
  assert lp.evaluate_logistic_regression(exact, x_test, y_test) == 1.0
  assert lp.evaluate_linear_probe(params, batch_stats, x, y) == 1.0
  assert lp.evaluate_linear_probe(params, batch_stats, x_test, y_test) == 1.0
  assert len(losses) == 200 and losses[-1] < losses[0]


def test_probe_structure_and_init():
  (x, y), _, num_classes = _separable(num=256)
  params, batch_stats = lp.train_linear_probe(x, y, num_classes, epochs=1, batch_size=256, base_lr=0.0,
                                              warmup_epochs=0)
  # Learning rate 0: the parameters are still the initialisation, and BN has no scale or bias.
  assert set(params) == {"head"} and set(batch_stats) == {"norm"}
  assert set(batch_stats["norm"]) == {"mean", "var"}
  np.testing.assert_array_equal(params["head"]["bias"], 0.0)
  assert params["head"]["kernel"].shape == (16, num_classes)
  assert np.std(params["head"]["kernel"]) == pytest.approx(0.01, rel=0.3)


def test_running_statistics_track_the_data(trained):
  _, batch_stats, (x, _), _, _, _ = trained
  # Every batch is half the data, so batch statistics (and their running average) sit near the full
  # data's; a probe still using its initial stats (0, 1) would fail by orders of magnitude.
  std = x.std(axis=0)
  np.testing.assert_allclose(batch_stats["norm"]["mean"], x.mean(axis=0), atol=0.1 * std.max())
  np.testing.assert_allclose(batch_stats["norm"]["var"], x.var(axis=0), rtol=0.15)


def test_eval_mode_uses_running_statistics(trained):
  params, batch_stats, (x, _), _, _, _ = trained
  alone = lp.linear_probe_logits(params, batch_stats, x[:1])
  with_others = lp.linear_probe_logits(params, batch_stats, x[:64])[:1]
  with_shifted_others = lp.linear_probe_logits(params, batch_stats,
                                               np.concatenate([x[:1], x[1:64] * 5.0 + 100.0]))[:1]
  np.testing.assert_allclose(with_others, alone, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(with_shifted_others, alone, rtol=1e-5, atol=1e-6)
  # Train mode normalises with the batch's own statistics, which do depend on the other rows.
  train_mode, _ = lp.LinearProbe(params["head"]["kernel"].shape[1]).apply(
      {"params": params, "batch_stats": batch_stats}, np.concatenate([x[:1], x[1:64] * 5.0 + 100.0]),
      train=True, mutable=["batch_stats"])
  assert np.max(np.abs(np.asarray(train_mode[:1]) - alone)) > 1e-2


def test_probe_rejects_too_few_examples():
  (x, y), _, num_classes = _separable(num=100)
  with pytest.raises(ValueError, match="full batch"):
    lp.train_linear_probe(x, y, num_classes, batch_size=256)
  with pytest.raises(ValueError, match="Labels"):
    lp.train_linear_probe(x, y + 10, num_classes, batch_size=64)


def _overlapping(seed=1, num=300, dim=6, num_classes=3):
  rng = np.random.RandomState(seed)
  labels = rng.randint(0, num_classes, num)
  feats = rng.randn(num_classes, dim)[labels] + rng.randn(num, dim)
  return feats.astype(np.float32), labels, num_classes


def _objective_and_grad(w_flat, feats, labels, num_classes, l2):
  """Float64 numpy objective (mean NLL + l2/2 ||W||^2) and its gradient, for scipy and the checks."""
  dim = feats.shape[1]
  kernel, bias = w_flat[:dim * num_classes].reshape(dim, num_classes), w_flat[dim * num_classes:]
  logits = feats @ kernel + bias
  logits = logits - logits.max(axis=1, keepdims=True)
  probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  onehot = np.eye(num_classes)[labels]
  value = -np.mean(np.log(probs[np.arange(len(labels)), labels])) + 0.5 * l2 * np.sum(kernel ** 2)
  d_logits = (probs - onehot) / len(labels)
  grad = np.concatenate([(feats.T @ d_logits + l2 * kernel).ravel(), d_logits.sum(axis=0)])
  return value, grad


def _flat(params):
  return np.concatenate([params["kernel"].ravel(), params["bias"]]).astype(np.float64)


def _standardised(head, feats):
  return (feats.astype(np.float64) - head["mean"]) / head["scale"]


def test_logistic_regression_gradient_vanishes_at_the_solution():
  feats, labels, num_classes = _overlapping()
  params = lp.fit_logistic_regression(feats, labels, num_classes, l2=1e-2)
  value, grad = _objective_and_grad(_flat(params), _standardised(params, feats), labels, num_classes, 1e-2)
  assert np.linalg.norm(grad) < 1e-4
  # Sanity of the check itself: away from the optimum the gradient is large.
  nudged = _flat(params) + 0.1 * np.random.RandomState(0).randn(_flat(params).size)
  _, grad_far = _objective_and_grad(nudged, _standardised(params, feats), labels, num_classes, 1e-2)
  assert np.linalg.norm(grad_far) > 1e-2


def test_logistic_regression_matches_scipy():
  optimize = pytest.importorskip("scipy.optimize")
  feats, labels, num_classes = _overlapping()
  l2 = 1e-2
  params = lp.fit_logistic_regression(feats, labels, num_classes, l2=l2)
  # The objective is over standardised features; the check standardises with the training statistics.
  np.testing.assert_allclose(params["mean"], feats.mean(axis=0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(params["scale"], feats.std(axis=0), rtol=1e-5)
  f64 = _standardised(params, feats)
  result = optimize.minimize(_objective_and_grad, np.zeros(_flat(params).size), jac=True, method="L-BFGS-B",
                             args=(f64, labels, num_classes, l2), options=dict(gtol=1e-10, maxiter=5000))
  ours, _ = _objective_and_grad(_flat(params), f64, labels, num_classes, l2)
  assert ours == pytest.approx(result.fun, abs=1e-6)
  # Softmax ignores a constant added to every bias, so compare the kernels and predicted probabilities.
  dim = feats.shape[1]
  np.testing.assert_allclose(params["kernel"], result.x[:dim * num_classes].reshape(dim, num_classes),
                             atol=2e-3)
  ref_logits = f64 @ result.x[:dim * num_classes].reshape(dim, num_classes) + result.x[dim * num_classes:]
  np.testing.assert_allclose(jax.nn.softmax(lp.logistic_regression_logits(params, feats)),
                             jax.nn.softmax(ref_logits), atol=1e-3)


def test_lars_skips_the_bias_like_mae():
  # One LARS step from the probe's optimizer on a hand-made gradient: the kernel moves by
  # lr * 0.001 * ||W|| / ||g|| * g, the bias by plain lr * g.
  params = dict(kernel=np.full((2, 2), 3.0, np.float32), bias=np.ones(2, np.float32))
  grads = dict(kernel=np.full((2, 2), 0.5, np.float32), bias=np.full(2, 0.5, np.float32))
  tx = optax.lars(0.1, weight_decay=0.0, weight_decay_mask=lp._matrices_only,
                  trust_ratio_mask=lp._matrices_only, momentum=0.9)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["kernel"], -0.1 * 0.001 * (6.0 / 1.0) * 0.5, rtol=1e-5)
  np.testing.assert_allclose(updates["bias"], -0.1 * 0.5, rtol=1e-6)


# --- Against scikit-learn on random features of real images -----------------------------------------------


@pytest.fixture(scope="module")
def fashion_features():
  """ReLU random features of the first 2000 / 1000 Fashion-MNIST train / test images, each dimension
  multiplied by a scale in [1e-3, 1e3]: on raw features a fixed L2 would penalise dimensions 1e12 apart."""
  rng = np.random.default_rng(0)
  projection = rng.standard_normal((28 * 28, 64)).astype(np.float32) / 28
  scales = (10.0 ** rng.uniform(-3, 3, 64)).astype(np.float32)

  def features(split, num):
    source = sources.IdxSource(sources.DEFAULT_IDX_DIR, split)
    examples = [source[i] for i in range(num)]
    pixels = np.stack([example["image"].reshape(-1) for example in examples]).astype(np.float32) / 255
    return np.maximum(pixels @ projection, 0) * scales, np.array([example["label"] for example in examples])

  return features("train", 2000), features("test", 1000)


def _fit(model, feats, labels):
  # scikit-learn's OpenMP threads spin-wait on busy shared cores: one thread is ~100x faster there.
  with threadpool_limits(1):
    return model.fit(feats, labels)


def _scikit_learn_probe(train_x, train_y, l2_grid, *, heldout_fraction=0.1, seed=0):
  """The probe's protocol in scikit-learn: ``StandardScaler`` statistics of the whole training split, the same
  held-out slice, ``C = 1 / (n * l2)`` for ``n`` fitting examples, ties to the larger ``l2``.

  Returns ``(scaler, model, chosen l2, {l2: held-out accuracy})``.
  """
  scaler = StandardScaler().fit(train_x)
  feats = scaler.transform(train_x)
  num_heldout = int(round(heldout_fraction * len(feats)))
  order = np.random.default_rng(seed).permutation(len(feats))
  heldout, fitting = order[:num_heldout], order[num_heldout:]
  model = LogisticRegression(tol=1e-6, max_iter=10_000, warm_start=True)
  accuracies = {}
  for l2 in sorted(l2_grid, reverse=True):
    _fit(model.set_params(C=1 / (len(fitting) * l2)), feats[fitting], train_y[fitting])
    accuracies[l2] = model.score(feats[heldout], train_y[heldout])
  chosen = max(accuracies, key=lambda l2: (accuracies[l2], l2))
  _fit(model.set_params(C=1 / (len(feats) * chosen)), feats, train_y)
  return scaler, model, chosen, accuracies


def test_held_out_search_matches_scikit_learn(fashion_features):
  (train_x, train_y), (test_x, test_y) = fashion_features
  head = lp.fit_logistic_regression(train_x, train_y, 10)
  scaler, model, chosen, accuracies = _scikit_learn_probe(train_x, train_y, lp.L2_GRID)
  assert list(head["heldout_accuracy"]) == list(accuracies) == sorted(lp.L2_GRID, reverse=True)
  # The 200 held-out images: the same solutions misclassify at most one image differently.
  np.testing.assert_allclose(list(head["heldout_accuracy"].values()), list(accuracies.values()), atol=0.0051)
  assert head["l2"] == chosen and head["l2"] in lp.L2_GRID
  assert head["heldout_accuracy"][head["l2"]] == max(head["heldout_accuracy"].values())
  ours = lp.evaluate_logistic_regression(head, test_x, test_y)
  theirs = model.score(scaler.transform(test_x), test_y)
  assert abs(ours - theirs) <= 0.005 and theirs > 0.7


def test_fixed_l2_matches_scikit_learn_predictions(fashion_features):
  (train_x, train_y), (test_x, test_y) = fashion_features
  head = lp.fit_logistic_regression(train_x, train_y, 10, l2=1e-3)
  assert head["l2"] == 1e-3 and head["heldout_accuracy"] == {}
  scaler = StandardScaler().fit(train_x)
  model = _fit(LogisticRegression(C=1 / (len(train_x) * 1e-3), tol=1e-6, max_iter=10_000),
               scaler.transform(train_x), train_y)
  ours = lp.logistic_regression_logits(head, test_x).argmax(axis=1)
  assert np.mean(ours == model.predict(scaler.transform(test_x))) >= 0.99


def test_default_search_is_invariant_to_rescaling_features(fashion_features):
  (train_x, train_y), (test_x, test_y) = fashion_features
  head = lp.fit_logistic_regression(train_x, train_y, 10)
  rng = np.random.default_rng(1)
  factors = (10.0 ** rng.uniform(-3, 3, train_x.shape[1])).astype(np.float32)
  shifts = (rng.uniform(-10, 10, train_x.shape[1]) * factors * train_x.std(axis=0)).astype(np.float32)
  rescaled = lp.fit_logistic_regression(train_x * factors + shifts, train_y, 10)
  np.testing.assert_allclose(rescaled["scale"], head["scale"] * factors, rtol=1e-4)
  assert rescaled["l2"] == head["l2"]
  accuracy = lp.evaluate_logistic_regression(head, test_x, test_y)
  assert lp.evaluate_logistic_regression(rescaled, test_x * factors + shifts, test_y) == pytest.approx(
      accuracy, abs=0.001)


def test_search_breaks_ties_towards_the_larger_l2_and_is_deterministic():
  # Separable classes: every grid point classifies the held-out slice perfectly.
  (x, y), _, num_classes = _separable(num=512)
  head = lp.fit_logistic_regression(x, y, num_classes, l2_grid=(1e-3, 1e-1, 1e-2))
  assert head["heldout_accuracy"] == {1e-1: 1.0, 1e-2: 1.0, 1e-3: 1.0} and head["l2"] == 1e-1
  again = lp.fit_logistic_regression(x, y, num_classes, l2_grid=(1e-3, 1e-1, 1e-2))
  np.testing.assert_array_equal(again["kernel"], head["kernel"])


def test_constant_and_duplicated_dimensions():
  feats, labels, num_classes = _overlapping()
  padded = np.concatenate([feats, np.full((len(feats), 1), 7.0, np.float32), feats[:, :1]], axis=1)
  head = lp.fit_logistic_regression(padded, labels, num_classes, l2=1e-2)
  assert head["scale"][-2] == 1.0 and np.isfinite(head["kernel"]).all()
  # Only the penalty acts on a constant dimension, and the minimiser splits a duplicated one evenly.
  np.testing.assert_allclose(head["kernel"][-2], 0.0, atol=1e-3)
  np.testing.assert_allclose(head["kernel"][-1], head["kernel"][0], atol=1e-3)


def test_logistic_regression_rejects_bad_settings():
  feats, labels, num_classes = _overlapping()
  with pytest.raises(ValueError, match="positive"):
    lp.fit_logistic_regression(feats, labels, num_classes, l2_grid=(1e-2, 0.0))
  with pytest.raises(ValueError, match="held-out"):
    lp.fit_logistic_regression(feats, labels, num_classes, heldout_fraction=0.001)
  with pytest.raises(ValueError, match="non-negative"):
    lp.fit_logistic_regression(feats, labels, num_classes, l2=-1.0)
