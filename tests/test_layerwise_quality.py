"""experiments/layerwise_quality.py: the tokens it reads after each ViT block are the encoder's own (the last
one, layer-normalised by numpy, is `Method.embed`'s class token), every block is scored on its own columns,
and an encoder without ViT blocks is refused."""
import os
import sys

import jax
import numpy as np
import pytest

import contrastive_helpers as helpers
from sslx.evaluate import run as eval_run
from test_configs import load_config

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import layerwise_quality  # experiments/ is not a package: on the path above

SIZE, DEPTH = 16, 3


def _images(count=6, seed=0):
  return np.random.default_rng(seed).normal(size=(count, SIZE, SIZE, 1)).astype(np.float32)


@pytest.fixture(scope="module")
def vit_run():
  config = helpers.tiny_config("rotation_fashion_mnist", **{"model.dtype": "float32", "model.depth": DEPTH,
                                                            "data.image_size": SIZE})
  method, state = eval_run.random_init(config, seed=0)
  return config, method, state


def _final_norm(variables):
  """The encoder's final LayerNorm parameters: the one 'norm' that is not inside a block."""
  flat = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
  found = {}
  for path, leaf in flat:
    names = [getattr(key, "key", str(key)) for key in path]
    if len(names) >= 2 and names[-2] == "norm" and not any(name.startswith("blocks") for name in names):
      found[names[-1]] = np.asarray(leaf)
  return found["scale"], found["bias"]


def test_one_pooled_token_per_block_and_the_last_normalised_is_the_embedding(vit_run):
  config, method, (variables, method_state) = vit_run
  images = _images()
  tokens = layerwise_quality.pooled_block_tokens(method.embed, "cls", variables, method_state, images)
  assert len(tokens) == DEPTH and all(t.shape == (len(images), config.model.width) for t in tokens)
  last = np.asarray(tokens[-1], np.float64)
  scale, bias = _final_norm(variables)
  normalised = (last - last.mean(-1, keepdims=True)) / np.sqrt(last.var(-1, keepdims=True) + 1e-6) * scale + bias
  np.testing.assert_allclose(normalised, method.embed(variables, method_state, images), atol=1e-5)
  # Each block changes the class token: the blocks are read one by one, not one of them several times.
  assert all(not np.allclose(tokens[b], tokens[b + 1]) for b in range(DEPTH - 1))


def test_mean_pooling_reads_the_patch_tokens_not_the_class_token(vit_run):
  _, method, (variables, method_state) = vit_run
  images = _images()
  cls = layerwise_quality.pooled_block_tokens(method.embed, "cls", variables, method_state, images)
  mean = layerwise_quality.pooled_block_tokens(method.embed, "mean", variables, method_state, images)
  assert len(mean) == DEPTH and not np.allclose(cls[0], mean[0])
  with pytest.raises(ValueError, match="pooling='max'"):
    layerwise_quality.pooled_block_tokens(method.embed, "max", variables, method_state, images)


def test_each_block_is_scored_on_its_own_columns(vit_run, monkeypatch):
  config, method, state = vit_run
  splits = {"train": (_images(40, seed=1), np.arange(40) % 4), "test": (_images(12, seed=2), np.arange(12) % 4)}

  def features_of_fixed_images(embed, run_state, data_config, eval_config, split, limit=None):
    del data_config, eval_config, limit
    images, labels = splits[split]
    return np.asarray(embed(*run_state, images)), labels

  monkeypatch.setattr(eval_run, "method_features", features_of_fixed_images)
  config.data.update(dict(split="train", eval_split="test"))
  eval_config = config.eval.copy_and_resolve_references()
  eval_config.update(dict(knn_ks=(3,), probe="logistic", probe_l2=1e-3))
  rows = layerwise_quality.score_blocks(method.embed, state, config.data, eval_config, "cls")
  assert [row["block"] for row in rows] == list(range(1, DEPTH + 1))
  for block, row in enumerate(rows):
    train, test = ((np.asarray(layerwise_quality.pooled_block_tokens(method.embed, "cls", *state, images)[block]),
                    labels) for images, labels in splits.values())
    expected = {**eval_run.score_features("knn", train, test, eval_config),
                **eval_run.score_features("linear_probe", train, test, eval_config)}
    assert row["knn3_top1"] == pytest.approx(expected["knn3_top1"])
    assert row["linear_top1"] == pytest.approx(expected["linear_top1"])


def test_an_encoder_without_vit_blocks_is_refused():
  config = load_config("rotation_fashion_mnist", "resnet,test")
  method, (variables, method_state) = eval_run.random_init(config, seed=0)
  with pytest.raises(ValueError, match="no unscanned ViT blocks"):
    layerwise_quality.pooled_block_tokens(method.embed, "cls", variables, method_state,
                                          np.zeros((2, config.data.image_size, config.data.image_size, 1),
                                                   np.float32))
