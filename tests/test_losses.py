import jax.numpy as jnp
import numpy as np
import pytest

from sslx import losses


def _data(seed=0, shape=(3, 8, 12)):
  rng = np.random.RandomState(seed)
  pred = rng.randn(*shape).astype(np.float32)
  target = (rng.rand(*shape) * 3 + 1).astype(np.float32)
  mask = (rng.rand(*shape[:2]) < 0.5).astype(np.float32)
  mask[:, 0] = 1
  return pred, target, mask


def _reference(pred, target, mask, norm_pix, p, eps=1e-6):
  total, count = 0.0, 0.0
  for b in range(pred.shape[0]):
    for i in range(pred.shape[1]):
      t = target[b, i].astype(np.float64)
      if norm_pix:
        t = (t - t.mean()) / np.sqrt(t.var(ddof=1) + eps)
      total += mask[b, i] * np.mean(np.abs(pred[b, i] - t) ** p)
      count += mask[b, i]
  return total / count


@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("p", [1, 2])
def test_matches_numpy_reference(norm_pix, p):
  pred, target, mask = _data()
  loss = losses.masked_reconstruction_loss(pred, target, mask, norm_pix=norm_pix, p=p)
  assert loss.shape == () and loss.dtype == jnp.float32
  np.testing.assert_allclose(float(loss), _reference(pred, target, mask, norm_pix, p), rtol=1e-5)


def test_only_masked_patches_count():
  pred, target, mask = _data()
  loss = losses.masked_reconstruction_loss(pred, target, mask)
  changed_visible = pred + 5.0 * (1 - mask)[..., None]
  np.testing.assert_allclose(losses.masked_reconstruction_loss(changed_visible, target, mask), loss,
                             rtol=1e-6)
  changed_masked = pred + 5.0 * mask[..., None]
  assert float(losses.masked_reconstruction_loss(changed_masked, target, mask)) > float(loss) + 1


def test_no_mask_averages_all_patches():
  pred, target, _ = _data()
  np.testing.assert_allclose(
      losses.masked_reconstruction_loss(pred, target, norm_pix=False),
      losses.masked_reconstruction_loss(pred, target, np.ones(pred.shape[:2]), norm_pix=False), rtol=1e-6)


def test_low_precision_predictions_give_float32_loss():
  pred, target, mask = _data()
  loss = losses.masked_reconstruction_loss(jnp.asarray(pred, jnp.bfloat16), target, mask)
  assert loss.dtype == jnp.float32


def test_normalize_patches_round_trip():
  _, target, _ = _data()
  normalized, mean, std = losses.normalize_patches(target)
  np.testing.assert_allclose(np.asarray(normalized * std + mean), target, rtol=1e-5)
  np.testing.assert_allclose(np.var(np.asarray(normalized), axis=-1, ddof=1), 1.0, rtol=1e-3)
