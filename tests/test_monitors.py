"""Online probe, periodic kNN / diagnostics, held-out evaluation with best checkpoint, init_from."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sslx import checkpoint
from sslx import monitors
from sslx import train
from sslx.evaluate import diagnostics
from sslx.evaluate import knn
from sslx.evaluate import run as eval_run
from sslx.methods import build_method
from train_helpers import tiny_run_config


def _numpy_cross_entropy(logits, labels):
  shifted = logits - logits.max(axis=1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  return -log_probs[np.arange(len(labels)), labels]


def test_probe_loss_is_cross_entropy_over_labelled_rows():
  rng = np.random.default_rng(0)
  params = {"kernel": rng.normal(size=(6, 4)).astype(np.float32), "bias": rng.normal(size=4).astype(np.float32)}
  features = rng.normal(size=(9, 6)).astype(np.float32)
  labels = np.array([0, 3, 1, -1, 2, 2, 4, 0, 1])  # -1: unlabelled; 4: outside the probe's classes
  loss, accuracy = monitors.probe_loss(params, jnp.asarray(features), jnp.asarray(labels), 4)
  logits = features @ params["kernel"] + params["bias"]
  valid = (labels >= 0) & (labels < 4)
  np.testing.assert_allclose(loss, _numpy_cross_entropy(logits[valid], labels[valid]).mean(), rtol=1e-5)
  np.testing.assert_allclose(accuracy, 100 * np.mean(logits[valid].argmax(1) == labels[valid]), rtol=1e-6)


def test_online_probe_learns_separable_classes():
  rng = np.random.default_rng(1)
  centers = rng.normal(size=(3, 5)) * 4
  labels = rng.integers(3, size=512)
  images = (centers[labels] + rng.normal(size=(512, 5))).astype(np.float32)
  probe = monitors.OnlineProbe(embed=lambda variables, method_state, x: x, num_classes=3, batch_size=64,
                               tx=optax.adam(0.05))
  state = probe.init(5)
  update = jax.jit(lambda s, b: probe.update(s, None, None, b))
  for start in range(0, 512 * 4, 64):
    rows = np.arange(start, start + 64) % 512
    state, metrics = update(state, {"image": images[rows], "label": labels[rows]})
  predictions = np.asarray(monitors.probe_logits(state["params"], images)).argmax(1)
  assert np.mean(predictions == labels) > 0.95
  assert float(metrics["probe/loss"]) < 0.3


def test_probe_never_changes_the_pretraining_step():
  config = tiny_run_config()
  method = build_method(config)
  tx = optax.adamw(1e-3)
  probe = monitors.make_online_probe(config, method.embed, num_classes=10)
  shape = (28, 28, 1)
  with_probe = train.init_train_state(method, tx, jax.random.PRNGKey(0), shape, probe)
  without = train.init_train_state(method, tx, jax.random.PRNGKey(0), shape)
  batch = {"image": jax.random.normal(jax.random.PRNGKey(1), (16, *shape)), "label": jnp.arange(16) % 10}
  unbox = lambda s: jax.tree.map(lambda x: getattr(x, "value", x), s, is_leaf=lambda x: hasattr(x, "value"))
  schedules = {"lr": lambda s: 1e-3}
  new_with, metrics_with = jax.jit(train.make_train_step(method, tx, schedules, probe=probe))(
      unbox(with_probe), batch)
  new_without, metrics_without = jax.jit(train.make_train_step(method, tx, schedules))(unbox(without), batch)
  assert float(metrics_with["loss"]) == float(metrics_without["loss"])
  jax.tree.map(np.testing.assert_array_equal, new_with.params, new_without.params)
  assert "probe/loss" in metrics_with and "probe/loss" not in metrics_without
  assert not np.allclose(new_with.probe["params"]["kernel"], 0.0)  # the probe itself did learn


def test_run_logs_monitors_from_step_zero_and_they_match_an_offline_knn(tmp_path):
  config = tiny_run_config(total_steps=4)
  state, last = train.train(config, str(tmp_path))
  with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  monitor_steps = [row["step"] for row in rows if "monitor/knn20_top1" in row]
  assert monitor_steps == [0, 2, 4]  # step 0, then at every checkpoint
  for name in ("diag/std", "diag/rankme", "diag/uniformity", "monitor/probe_top1", "probe/loss"):
    assert name in last
  assert last["diag/collapsed"] == 0.0
  # The logged kNN and diagnostics are the offline protocol on the same subsets of the method's embedding.
  method = build_method(config)

  def subset(split, n):
    return eval_run.method_features(method.embed, (state.variables, state.method_state), config.data, config.eval,
                                    split, n)
  train_x, train_y = subset(config.data.split, 200)
  test_x, test_y = subset(config.data.eval_split, 100)
  offline = diagnostics.summary(test_x)
  for name in ("std", "rankme", "uniformity"):
    assert last[f"diag/{name}"] == pytest.approx(offline[name], rel=1e-5), name
  assert last["diag/rankme"] > 2  # a random 32-wide encoder's features span many directions
  expected = knn.knn_accuracy(train_x[:200], train_y[:200], test_x[:100], test_y[:100], 10, k=20)["top1"]
  assert last["monitor/knn20_top1"] == pytest.approx(100 * expected)
  assert 20 < last["monitor/knn20_top1"] <= 100  # chance is 10%


def test_monitor_can_be_switched_off(tmp_path):
  _, last = train.train(tiny_run_config(total_steps=2, **{"monitor.every_steps": 0}), str(tmp_path))
  assert not any(name.startswith(("monitor/", "diag/", "probe/")) for name in last)


def test_best_checkpointer_keeps_the_highest_score_across_reopening(tmp_path):
  state = {"params": {"w": jnp.ones(3)}}
  best = checkpoint.BestCheckpointer(str(tmp_path / "best"), "eval/top1")
  assert best.maybe_save(1, state, {"eval/top1": 50.0})
  assert not best.maybe_save(2, state, {"eval/top1": 40.0})
  assert best.maybe_save(3, state, {"eval/top1": 60.0, "eval/top5": 90.0})
  best.close()
  reopened = checkpoint.BestCheckpointer(str(tmp_path / "best"), "eval/top1")
  assert reopened.summary() == {"step": 3, "eval/top1": 60.0, "eval/top5": 90.0}
  assert not reopened.maybe_save(4, state, {"eval/top1": 55.0})
  with pytest.raises(ValueError, match="best_metric='eval/top1' is not among"):
    reopened.maybe_save(5, state, {"eval/loss": 1.0})
  reopened.close()
  assert os.listdir(tmp_path / "best") == ["3"]


