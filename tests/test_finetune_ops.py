"""Layer-wise learning-rate decay and mixup / cutmix with label smoothing."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from sslx.evaluate import finetune_ops
from sslx.models import vit


@pytest.fixture(scope="module")
def vit_params():
  model = vit.VisionTransformer(patch_size=8, width=16, depth=3, num_heads=2, mlp_dim=32,
                               pos_embed="learned")
  # Only names and shapes matter here, so trace the initialisation without running it.
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False))
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.meta.unbox(shapes["params"]))
  return dict(encoder=params, head=dict(kernel=jnp.zeros((16, 5)), bias=jnp.zeros(5)))


@pytest.mark.parametrize("decay", [0.75, 0.65])
def test_layer_decay_multipliers_follow_beit_convention(vit_params, decay):
  mult = finetune_ops.layer_decay_multipliers(vit_params, decay)
  depth = 3
  enc = mult["encoder"]
  for name in ("cls_token", "pos_embed"):
    assert enc[name] == decay ** (depth + 1)
  for leaf in jax.tree.leaves(enc["patch_embed"]):
    assert leaf == decay ** (depth + 1)
  for i in range(depth):
    for leaf in jax.tree.leaves(enc[f"block_{i}"]):
      assert leaf == decay ** (depth - i)
  for leaf in jax.tree.leaves(enc["norm"]) + jax.tree.leaves(mult["head"]):
    assert leaf == 1.0
  assert jax.tree.structure(mult) == jax.tree.structure(vit_params)


def test_layer_decay_with_explicit_depth_and_missing_blocks(vit_params):
  mult = finetune_ops.layer_decay_multipliers(vit_params, 0.5, num_layers=11)
  assert mult["encoder"]["cls_token"] == 0.5 ** 12
  assert jax.tree.leaves(mult["encoder"]["block_2"])[0] == 0.5 ** 9
  with pytest.raises(ValueError, match="block_"):
    finetune_ops.layer_decay_multipliers(dict(head=jnp.zeros(3)), 0.5)


def test_scale_by_layer_decay_scales_each_update(vit_params):
  mult = finetune_ops.layer_decay_multipliers(vit_params, 0.75)
  tx = optax.chain(optax.sgd(1.0), finetune_ops.scale_by_layer_decay(mult))
  grads = jax.tree.map(jnp.ones_like, vit_params)
  updates, _ = tx.update(grads, tx.init(vit_params), vit_params)
  jax.tree.map(lambda u, m: np.testing.assert_allclose(u, -m * np.ones_like(u), rtol=1e-6), updates, mult)


# One compilation per distinct option set, shared by the tests below.
_mix = jax.jit(finetune_ops.mix_batch,
               static_argnames=("mixup_alpha", "cutmix_alpha", "switch_prob", "label_smoothing"))


def _batch(batch=6, size=16, num_classes=5):
  # Each image holds a distinct constant, so mirrored partners differ at every pixel.
  images = jnp.broadcast_to(jnp.arange(1.0, batch + 1)[:, None, None, None], (batch, size, size, 3))
  labels = jax.nn.one_hot(jnp.array([0, 1, 2, 3, 4, 0][:batch]), num_classes)
  return images, labels


def test_cutmix_label_weight_is_the_pasted_area():
  images, labels = _batch()
  areas = []
  for seed in range(20):
    mixed, soft = _mix(jax.random.key(seed), images, labels, switch_prob=1.0, label_smoothing=0.0)
    pasted = np.asarray(mixed != images)[..., 0]
    # One box, same place in every image, filled from the mirrored example.
    np.testing.assert_array_equal(pasted, np.broadcast_to(pasted[0], pasted.shape))
    np.testing.assert_array_equal(np.asarray(mixed)[pasted], np.asarray(images[::-1])[pasted])
    area = pasted[0].mean()
    areas.append(area)
    np.testing.assert_allclose(soft, (1 - area) * labels + area * labels[::-1], atol=1e-6)
  assert min(areas) < max(areas)  # boxes of different sizes, some clipped at the border


def test_mixup_mixes_images_and_labels_with_the_same_lambda():
  images, labels = _batch()
  for seed in range(5):
    mixed, soft = _mix(jax.random.key(seed), images, labels, switch_prob=0.0, label_smoothing=0.0)
    # images[i] = i + 1, so lambda can be read back from any pixel of the first image.
    lam = float((mixed[0, 0, 0, 0] - images[-1, 0, 0, 0]) / (images[0, 0, 0, 0] - images[-1, 0, 0, 0]))
    np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], rtol=1e-5)
    np.testing.assert_allclose(soft, lam * labels + (1 - lam) * labels[::-1], atol=1e-5)


@pytest.mark.parametrize("switch_prob", [0.0, 0.5, 1.0])
def test_soft_labels_sum_to_one_and_are_smoothed(switch_prob):
  images, labels = _batch()
  for seed in range(10):
    mixed, soft = _mix(jax.random.key(seed), images, labels, switch_prob=switch_prob)
    assert mixed.shape == images.shape and mixed.dtype == images.dtype
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, rtol=1e-6)
    assert float(soft.min()) >= 0.1 / 5 - 1e-7


def test_both_switch_outcomes_occur():
  images, labels = _batch()
  kinds = set()
  for seed in range(20):
    mixed, _ = _mix(jax.random.key(seed), images, labels)
    # Cutmix leaves some pixels untouched; mixup changes every pixel of the first image.
    kinds.add("cutmix" if bool(jnp.any(mixed[0] == images[0])) else "mixup")
  assert kinds == {"cutmix", "mixup"}


def test_no_mixing_only_smooths():
  images, labels = _batch()
  mixed, soft = finetune_ops.mix_batch(jax.random.key(0), images, labels, mixup_alpha=0.0,
                                       cutmix_alpha=0.0)
  np.testing.assert_array_equal(mixed, images)
  np.testing.assert_allclose(soft, 0.9 * labels + 0.1 / 5, rtol=1e-6)
