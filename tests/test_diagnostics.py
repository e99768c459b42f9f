"""Embedding diagnostics against direct numpy formulas."""
import numpy as np
import pytest

from sslx.evaluate import diagnostics


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_rankme_of_equal_singular_values_is_the_rank(rank):
  rng = np.random.RandomState(rank)
  u, _ = np.linalg.qr(rng.randn(40, rank))
  v, _ = np.linalg.qr(rng.randn(12, rank))
  z = 5.0 * u @ v.T  # rank r, all r non-zero singular values equal
  assert float(diagnostics.rankme(z)) == pytest.approx(rank, rel=1e-3)


def test_rankme_matches_numpy_formula():
  z = np.random.RandomState(0).randn(50, 10) * np.linspace(0.1, 3.0, 10)
  sigma = np.linalg.svd(z, compute_uv=False)
  p = sigma / sigma.sum() + 1e-7
  assert float(diagnostics.rankme(z)) == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-4)


def test_alignment_matches_numpy():
  rng = np.random.RandomState(1)
  z, z_pos = rng.randn(30, 8), rng.randn(30, 8)
  expected = np.mean(np.sum((_unit(z) - _unit(z_pos)) ** 2, axis=1))
  assert float(diagnostics.alignment(z, z_pos)) == pytest.approx(expected, rel=1e-5)
  expected_alpha1 = np.mean(np.linalg.norm(_unit(z) - _unit(z_pos), axis=1))
  assert float(diagnostics.alignment(z, z_pos, alpha=1.0)) == pytest.approx(expected_alpha1, rel=1e-5)
  assert float(diagnostics.alignment(z, 3.0 * z)) == pytest.approx(0.0, abs=1e-6)


def test_uniformity_matches_numpy_over_pairs():
  z = np.random.RandomState(2).randn(25, 6)
  f = _unit(z)
  pairs = [np.sum((f[i] - f[j]) ** 2) for i in range(len(f)) for j in range(i + 1, len(f))]
  expected = np.log(np.mean(np.exp(-2.0 * np.array(pairs))))
  assert float(diagnostics.uniformity(z)) == pytest.approx(expected, rel=1e-5)


def test_uniformity_orders_spread_and_collapsed_sets():
  rng = np.random.RandomState(3)
  spread = rng.randn(200, 16)
  clumped = rng.randn(16) + 0.05 * rng.randn(200, 16)
  assert float(diagnostics.uniformity(spread)) < float(diagnostics.uniformity(clumped))
  assert float(diagnostics.uniformity(clumped)) == pytest.approx(0.0, abs=0.05)  # log E exp(0) = 0


def test_embedding_std_and_collapse_flag():
  rng = np.random.RandomState(4)
  healthy = rng.randn(500, 64)
  stats = diagnostics.embedding_std(healthy)
  np.testing.assert_allclose(stats["per_dim_std"], _unit(healthy).std(axis=0), rtol=1e-5)
  assert float(stats["mean_std"]) == pytest.approx(1 / np.sqrt(64), rel=0.1)
  assert not bool(stats["collapsed"])
  collapsed = diagnostics.embedding_std(rng.randn(64) + 1e-4 * rng.randn(500, 64))
  assert bool(collapsed["collapsed"])


def test_summary_has_every_scalar():
  rng = np.random.RandomState(5)
  z = rng.randn(40, 8)
  out = diagnostics.summary(z, z + 0.1 * rng.randn(40, 8))
  assert set(out) == {"std", "collapsed", "rankme", "uniformity", "alignment"}
  assert all(isinstance(value, float) for value in out.values())
  assert "alignment" not in diagnostics.summary(z)
