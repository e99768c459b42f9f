"""MAE linear probe (BatchNorm + linear, LARS) and exact logistic regression on synthetic features."""
import jax
import numpy as np
import optax
import pytest

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


def test_logistic_regression_gradient_vanishes_at_the_solution():
  feats, labels, num_classes = _overlapping()
  params = lp.fit_logistic_regression(feats, labels, num_classes, l2=1e-2)
  value, grad = _objective_and_grad(_flat(params), feats.astype(np.float64), labels, num_classes, 1e-2)
  assert np.linalg.norm(grad) < 1e-4
  # Sanity of the check itself: away from the optimum the gradient is large.
  nudged = _flat(params) + 0.1 * np.random.RandomState(0).randn(_flat(params).size)
  _, grad_far = _objective_and_grad(nudged, feats.astype(np.float64), labels, num_classes, 1e-2)
  assert np.linalg.norm(grad_far) > 1e-2


def test_logistic_regression_matches_scipy():
  optimize = pytest.importorskip("scipy.optimize")
  feats, labels, num_classes = _overlapping()
  l2 = 1e-2
  params = lp.fit_logistic_regression(feats, labels, num_classes, l2=l2)
  f64 = feats.astype(np.float64)
  result = optimize.minimize(_objective_and_grad, np.zeros(_flat(params).size), jac=True, method="L-BFGS-B",
                             args=(f64, labels, num_classes, l2), options=dict(gtol=1e-10, maxiter=5000))
  ours, _ = _objective_and_grad(_flat(params), f64, labels, num_classes, l2)
  assert ours == pytest.approx(result.fun, abs=1e-6)
  # Softmax ignores a constant added to every bias, so compare the kernels and predicted probabilities.
  dim = feats.shape[1]
  np.testing.assert_allclose(params["kernel"], result.x[:dim * num_classes].reshape(dim, num_classes),
                             atol=2e-3)
  ref_logits = f64 @ result.x[:dim * num_classes].reshape(dim, num_classes) + result.x[dim * num_classes:]
  np.testing.assert_allclose(jax.nn.softmax(feats @ params["kernel"] + params["bias"]),
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
