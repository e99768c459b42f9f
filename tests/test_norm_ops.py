"""`sslx.models.norm_ops`: training-mode BatchNorm against the formula in numpy and PyTorch's autograd."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sslx.models import norm_ops

EPS = 1e-5


def _inputs(shape, seed):
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal(shape) * 3 + 2).astype(np.float32)
  channels = shape[-1]
  scale = rng.uniform(0.5, 2, channels).astype(np.float32)
  bias = rng.standard_normal(channels).astype(np.float32)
  cotangent = rng.standard_normal(shape).astype(np.float32)
  return x, scale, bias, cotangent


@pytest.mark.parametrize("shape", [(6, 5, 5, 3), (16, 7)])
def test_forward_is_the_formula(shape):
  x, scale, bias, _ = _inputs(shape, 0)
  y, mean, var = norm_ops.batch_norm_train(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias), EPS)
  x64 = x.astype(np.float64).reshape(-1, shape[-1])
  expected_mean, expected_var = x64.mean(0), x64.var(0)
  expected = (x64 - expected_mean) / np.sqrt(expected_var + EPS) * scale + bias
  np.testing.assert_allclose(mean, expected_mean, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(var, expected_var, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, shape[-1]), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(6, 5, 5, 3), (16, 7)])
def test_gradients_match_torch_batch_norm(shape):
  x, scale, bias, cotangent = _inputs(shape, 1)
  grads = jax.grad(lambda *a: jnp.sum(norm_ops.batch_norm_train(*a, EPS)[0] * cotangent), argnums=(0, 1, 2))(
      jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias))

  channels_first = (0, x.ndim - 1, *range(1, x.ndim - 1))  # torch wants (N, C, ...)
  tx = torch.tensor(x.transpose(channels_first), dtype=torch.float64, requires_grad=True)
  tscale = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
  tbias = torch.tensor(bias, dtype=torch.float64, requires_grad=True)
  y = torch.nn.functional.batch_norm(tx, None, None, tscale, tbias, training=True, eps=EPS)
  (y * torch.tensor(cotangent.transpose(channels_first), dtype=torch.float64)).sum().backward()

  channels_last = np.argsort(channels_first)
  np.testing.assert_allclose(grads[0], tx.grad.numpy().transpose(channels_last), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(grads[1], tscale.grad.numpy(), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(grads[2], tbias.grad.numpy(), rtol=1e-5, atol=1e-4)


def test_statistics_get_no_gradient():
  x, scale, bias, _ = _inputs((4, 3, 3, 2), 2)
  grads = jax.grad(lambda x: jnp.sum(norm_ops.batch_norm_train(x, scale, bias, EPS)[1]))(jnp.asarray(x))
  np.testing.assert_array_equal(grads, 0.0)


def test_more_than_2_to_the_31_rows_a_channel_trace():
  """128 images of 4096 x 4096 px (RotNet's 4 turns of a batch of 32) are 2**31 rows a channel, a count no
  int32 holds. Traced abstractly: nothing is allocated."""
  x = jax.ShapeDtypeStruct((128, 4096, 4096, 1), jnp.float32)
  channel = jax.ShapeDtypeStruct((1,), jnp.float32)
  loss = lambda *args: jnp.sum(norm_ops.batch_norm_train(*args, EPS)[0])
  grads = jax.eval_shape(jax.grad(loss, argnums=(0, 1, 2)), x, channel, channel)
  assert [g.shape for g in grads] == [x.shape, (1,), (1,)]


def test_channel_sums_of_a_big_batch_are_as_accurate_as_a_tree_sum():
  # 200k values a channel: adding them in one running float32 sum errs by ~1e-5 relative; by the batch
  # axis first (256 terms), then the positions, stays at float32's ~1e-7.
  x = (np.random.default_rng(3).standard_normal((256, 28, 28, 4)) * 0.01 + 0.003).astype(np.float32)
  sums = norm_ops.channel_sums(jnp.asarray(x))
  expected = x.astype(np.float64).sum(axis=(0, 1, 2))
  np.testing.assert_allclose(sums, expected, rtol=1e-6)
