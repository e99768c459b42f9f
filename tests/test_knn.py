"""Weighted kNN against a brute-force numpy reference, and frozen-encoder feature extraction."""
import subprocess
import sys

import jax
import numpy as np
import pytest

from sslx import methods
from sslx import models
from sslx.evaluate import features as features_lib
from sslx.evaluate import knn
from multiprocess_helpers import REPO, cpu_env


def _reference(train, train_labels, test, num_classes, k, temperature):
  """Full similarity matrix in float64, then argsort: the O(N_test x N_train) way."""
  a = train / np.linalg.norm(train, axis=1, keepdims=True)
  b = test / np.linalg.norm(test, axis=1, keepdims=True)
  sim = b.astype(np.float64) @ a.T.astype(np.float64)
  order = np.argsort(-sim, axis=1)[:, :k]
  scores = np.zeros((len(test), num_classes))
  for i in range(len(test)):
    for j in order[i]:
      scores[i, train_labels[j]] += np.exp(sim[i, j] / temperature)
  return sim, order, scores


def _reference_correct(scores, labels, topk):
  correct = []
  for row, label in zip(scores, labels, strict=True):
    voted = [c for c in np.argsort(-row, kind="stable") if row[c] > 0]
    correct.append(label in voted[:topk])
  return np.array(correct)


def _data(seed=3, num_train=250, num_test=37, dim=16, num_classes=10):
  rng = np.random.RandomState(seed)
  centers = rng.randn(num_classes, dim)
  train_labels = rng.randint(0, num_classes, num_train)
  test_labels = rng.randint(0, num_classes, num_test)
  # Overlapping classes, so predictions and top-1 / top-5 differ from example to example.
  train = (centers[train_labels] + 1.5 * rng.randn(num_train, dim)).astype(np.float32)
  test = (centers[test_labels] + 1.5 * rng.randn(num_test, dim)).astype(np.float32)
  return train, train_labels, test, test_labels, num_classes


def _assert_clear_cut(sim, k):
  """Float32 and float64 pick the same k neighbours only if ranks k and k + 1 do not nearly tie."""
  if k < sim.shape[1]:
    ranked = -np.sort(-sim, axis=1)
    assert np.min(ranked[:, k - 1] - ranked[:, k]) > 1e-5


# k > bank_chunk, chunk sizes that divide neither N, a single chunk, and k = N_train.
@pytest.mark.parametrize("k,query_chunk,bank_chunk", [
    (20, 7, 13), (200, 16, 33), (1, 64, 512), (5, 37, 250), (250, 10, 100)])
def test_matches_brute_force(k, query_chunk, bank_chunk):
  train, train_labels, test, test_labels, num_classes = _data()
  sim, order, ref_scores = _reference(train, train_labels, test, num_classes, k, 0.07)
  _assert_clear_cut(sim, k)

  sims, ids = knn.knn_search(train, test, k=k, query_chunk=query_chunk, bank_chunk=bank_chunk)
  # Same neighbours, each with its own similarity, in decreasing order (near-ties inside the top k
  # may come in either order).
  np.testing.assert_array_equal(np.sort(ids, axis=1), np.sort(order, axis=1))
  np.testing.assert_allclose(sims, np.take_along_axis(sim, ids, axis=1), atol=1e-5)
  np.testing.assert_allclose(sims, np.take_along_axis(sim, order, axis=1), atol=1e-5)

  predictions, scores = knn.knn_classify(train, train_labels, test, num_classes, k=k,
                                         query_chunk=query_chunk, bank_chunk=bank_chunk)
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-4)
  np.testing.assert_array_equal(predictions, ref_scores.argmax(axis=1))

  acc = knn.knn_accuracy(train, train_labels, test, test_labels, num_classes, k=k,
                         query_chunk=query_chunk, bank_chunk=bank_chunk)
  assert acc["top1"] == pytest.approx(_reference_correct(ref_scores, test_labels, 1).mean())
  assert acc["top5"] == pytest.approx(_reference_correct(ref_scores, test_labels, 5).mean())


def test_accuracies_are_not_trivial():
  # Guards the reference test against data where every method scores 0 or 1.
  train, train_labels, test, test_labels, num_classes = _data()
  acc = knn.knn_accuracy(train, train_labels, test, test_labels, num_classes, k=20)
  assert 0.2 < acc["top1"] < acc["top5"] < 1.0


def test_several_k_from_one_search_match_separate_runs():
  train, train_labels, test, test_labels, num_classes = _data()
  together = knn.knn_accuracies(train, train_labels, test, test_labels, num_classes, ks=(20, 200),
                                query_chunk=8, bank_chunk=64)
  for k in (20, 200):
    assert together[k] == knn.knn_accuracy(train, train_labels, test, test_labels, num_classes, k=k)


def test_with_one_neighbour_top5_is_top1():
  train, train_labels, test, test_labels, num_classes = _data()
  acc = knn.knn_accuracy(train, train_labels, test, test_labels, num_classes, k=1)
  assert acc["top5"] == acc["top1"]


def test_padded_bank_rows_are_never_selected():
  # Every real similarity is negative; an unmasked zero padding row (similarity 0) would win.
  rng = np.random.RandomState(0)
  train = -np.abs(rng.randn(10, 4)).astype(np.float32) - 0.1
  test = np.abs(rng.randn(5, 4)).astype(np.float32) + 0.1
  sims, ids = knn.knn_search(train, test, k=10, query_chunk=3, bank_chunk=4)
  assert np.all(sims < 0)
  np.testing.assert_array_equal(np.sort(ids, axis=1), np.tile(np.arange(10), (5, 1)))
  _, scores = knn.knn_classify(train, np.arange(10) % 3, test, 3, k=10, bank_chunk=4)
  np.testing.assert_allclose(scores.sum(axis=1), np.exp(sims / 0.07).sum(axis=1), rtol=1e-5)


def test_scale_of_features_does_not_matter():
  train, train_labels, test, _, num_classes = _data()
  _, scores = knn.knn_classify(train, train_labels, test, num_classes)
  _, scaled = knn.knn_classify(train * 1e3, train_labels, test * 1e-3, num_classes)
  np.testing.assert_allclose(scaled, scores, rtol=1e-4)


def test_bad_arguments_raise():
  train, train_labels, test, test_labels, num_classes = _data()
  with pytest.raises(ValueError, match="k=251"):
    knn.knn_search(train, test, k=251)
  with pytest.raises(ValueError, match="train_labels"):
    knn.knn_classify(train, np.full(len(train), -1), test, num_classes)
  with pytest.raises(ValueError, match="same D"):
    knn.knn_search(train, test[:, :3], k=1)


# ---- feature extraction ----

def _tiny_vit(pooling=None, drop_path_rate=0.5):
  """A ViT built through the encoder registry, as every evaluation builds it from ``config.model``."""
  return models.encoder_from_config(models.default_config(
      "vit", variant="Ti/8", width=32, depth=2, num_heads=2, mlp_dim=64, pooling=pooling,
      drop_path_rate=drop_path_rate, dtype="float32"))


def _batches(images, labels, batch_size):
  """Fixed-size batches; the last is padded with junk rows whose mask is False."""
  batches = []
  for start in range(0, len(images), batch_size):
    image, label = images[start:start + batch_size], labels[start:start + batch_size]
    pad = batch_size - len(image)
    batches.append(dict(
        image=np.concatenate([image, np.full((pad, *image.shape[1:]), 7.0, np.float32)]),
        label=np.concatenate([label, -np.ones(pad, label.dtype)]),
        mask=np.arange(batch_size) < len(image)))
  return batches


@pytest.mark.parametrize("pooling", [None, "cls", "mean"])
def test_extract_features_drops_padding_and_runs_in_eval_mode(pooling):
  model = _tiny_vit(pooling)
  rng = np.random.RandomState(0)
  images = rng.randn(10, 16, 16, 3).astype(np.float32)
  labels = np.arange(10)
  variables = model.init(jax.random.key(0), images[:1], train=False)
  # A method's embed over its online encoder, the one door every evaluation reads an encoder through.
  embed, _ = methods.frozen_encoder(model, lambda variables, method_state: variables)

  feats, got_labels = features_lib.extract_features(embed, (variables, {}), _batches(images, labels, 4))
  # Eval mode: a high drop-path rate would change outputs (and need an rng) if train were True.
  _, aux = model.apply(variables, images, train=False)
  # None: the encoder's default, its class token.
  expected = aux["patch_tokens"].mean(axis=1) if pooling == "mean" else aux["cls_token"]
  assert feats.shape == (10, 32) and feats.dtype == np.float32
  np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got_labels, labels)


def test_extract_features_passes_the_whole_state_to_embed():
  """``state`` is ``(variables, method_state)``; an embed may read either (an EMA teacher lives in the
  latter)."""
  images = np.random.RandomState(1).randn(6, 4, 4, 1).astype(np.float32)
  state = ({"params": {"scale": np.float32(2.0)}}, {"shift": np.float32(-1.0)})

  def embed(variables, method_state, batch):
    return batch.reshape(len(batch), -1) * variables["params"]["scale"] + method_state["shift"]

  feats, _ = features_lib.extract_features(embed, state, _batches(images, np.arange(6), 4))
  np.testing.assert_allclose(feats, 2.0 * images.reshape(6, -1) - 1.0, rtol=1e-6)


_SHARDED_FEATURES_SCRIPT = """
import jax, numpy as np
from sslx import methods, models, parallel
from sslx.evaluate import features
assert jax.device_count() == 4
model = models.encoder_from_config(models.default_config(
    "vit", variant="Ti/8", width=32, depth=2, num_heads=2, mlp_dim=64, pooling="mean", dtype="float32"))
embed, _ = methods.frozen_encoder(model, lambda variables, method_state: variables)
images = np.random.RandomState(0).randn(14, 16, 16, 3).astype(np.float32)
state = (model.init(jax.random.key(0), images[:1], train=False), {})
# Two batches of 8 whose last 2 rows are padding: 12 real rows.
batches = [dict(image=images[i:i + 8], label=np.arange(i, i + 8), mask=np.arange(8) < 6)
           for i in (0, 6)]
plain, plain_labels = features.extract_features(embed, state, batches)
for fsdp in (1, 2):
  mesh = parallel.create_mesh(fsdp)
  sharded, labels = features.extract_features(embed, state, batches, mesh=mesh)
  np.testing.assert_allclose(sharded, plain, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(labels, np.arange(12))
# 6 rows do not split over 4 devices: padded to 8 with masked rows, which never come back.
odd, odd_labels = features.extract_features(embed, state, [dict(image=images[:6], label=np.arange(6))],
                                            mesh=mesh)
np.testing.assert_allclose(odd, plain[:6], rtol=1e-5, atol=1e-6)
np.testing.assert_array_equal(odd_labels, np.arange(6))
print("features match")
"""


def test_extract_features_sharded_over_four_devices():
  result = subprocess.run([sys.executable, "-c", _SHARDED_FEATURES_SCRIPT], env=cpu_env(4), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "features match" in result.stdout


def test_unknown_pooling_is_named_by_the_encoder_config():
  config = models.default_config("vit", variant="Ti/8", pooling="max")
  with pytest.raises(ValueError, match="config.model.pooling='max'"):
    models.validate_config(config, image_size=16)
