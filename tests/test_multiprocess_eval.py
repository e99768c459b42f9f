"""Feature extraction and kNN over several processes and devices agree with one process on one device.

The multi-process test starts two real JAX processes on this machine (CPU collectives over gloo, two
CPU devices each) by running this file as a script, ``python tests/test_multiprocess_eval.py OUTDIR``,
with the cluster's environment of ``multiprocess_helpers.start_processes``.
"""
import json
import os
import subprocess
import sys
from unittest import mock

import jax
import numpy as np

from multiprocess_helpers import NUM_PROCESSES, REPO, cpu_env, logs_of_successful, start_processes, wait_for
from sslx import parallel
from sslx import recipes
from sslx.evaluate import run


def tiny_knn_config():
  """kNN of a random 1-block ViT on Fashion-MNIST: the first 1,152 training images, all 10k test images.

  Global batch 384 = 192 rows per process on two processes: the last of the 27 test batches of each
  process holds 8 of its 5,000 images and 184 padding rows, and the bank limit (1,000) ends inside
  the third batch.
  """
  config = run.eval_task_config("knn", recipes.mae_fashion_mnist())
  config.model.update(dict(variant="Ti/7", width=32, depth=1, num_heads=2, mlp_dim=64, dtype="float32"))
  config.eval.update(dict(batch_size=384, max_train_examples=1000, knn_ks=(20,)))
  return config


def evaluate_recording_features(config, workdir):
  """``run.evaluate``, and the ``{split: (features, labels)}`` it extracted on the way."""
  extracted, extract = {}, run.method_features

  def recording(embed, state, data_config, eval_config, split, *args, **kwargs):
    extracted[split] = extract(embed, state, data_config, eval_config, split, *args, **kwargs)
    return extracted[split]

  with mock.patch.object(run, "method_features", recording):
    return run.evaluate(config, workdir), extracted


def test_two_processes_get_the_single_process_features_and_knn_accuracy(tmp_path):
  with start_processes(lambda process_id: [sys.executable, os.path.abspath(__file__), str(tmp_path)],
                       logs_dir=tmp_path) as workers:
    expected_results, expected = evaluate_recording_features(tiny_knn_config(), str(tmp_path / "single"))
    logs = logs_of_successful(wait_for(workers))

  assert len(expected["train"][0]) == 1152 and len(expected["test"][0]) == 10_000
  for i in range(NUM_PROCESSES):
    got = np.load(tmp_path / f"features_{i}.npz")
    for split, (features, labels) in expected.items():
      np.testing.assert_array_equal(got[f"{split}_labels"], labels)
      np.testing.assert_allclose(got[f"{split}_features"], features, rtol=0, atol=1e-5)
    with open(tmp_path / f"results_{i}.json", encoding="utf-8") as f:
      results = json.load(f)
    assert {k: results[k] for k in ("knn20_top1", "knn20_top5")} == {
        k: expected_results[k] for k in ("knn20_top1", "knn20_top5")}
  # Only the first process writes results.json and prints.
  with open(tmp_path / "eval_0" / "results.json", encoding="utf-8") as f:
    assert json.load(f)["knn20_top1"] == expected_results["knn20_top1"]
  assert not os.path.exists(tmp_path / "eval_1")
  assert "knn20_top1" in logs[0] and "knn20_top1" not in logs[1]


_EIGHT_DEVICES_SCRIPT = """
import itertools
import jax
import numpy as np
from sslx import parallel
from sslx.data import pipeline
from sslx.evaluate import features, run
from tests.test_multiprocess_eval import tiny_knn_config
assert jax.device_count() == 8
config = tiny_knn_config()
config.eval.batch_size = 100  # 12.5 rows per device: every batch is padded to 104 rows on the mesh
method, state = run.random_init(config, config.seed)
sharded, labels = run.method_features(method.embed, state, config.data, config.eval, "test", limit=2000)
batches = list(itertools.islice(pipeline.make_eval_loader(config.data, split="test", batch_size=100), 20))
for mesh in (None, parallel.create_mesh(2)):  # one device; 8 devices as data 4 x fsdp 2
  x, y = features.extract_features(method.embed, state, batches, mesh=mesh)
  np.testing.assert_array_equal(y, labels)
  np.testing.assert_allclose(x, sharded, rtol=0, atol=1e-5)
print("eight devices match one")
"""


def test_extraction_on_eight_devices_matches_one_device():
  result = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES_SCRIPT], env=cpu_env(num_devices=8), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "eight devices match one" in result.stdout


if __name__ == "__main__":
  outdir = sys.argv[1]
  jax.config.update("jax_num_cpu_devices", 2)
  parallel.maybe_initialize_distributed()
  process_id = jax.process_index()
  assert jax.device_count() == 2 * NUM_PROCESSES and process_id == int(os.environ["JAX_PROCESS_ID"])
  worker_results, worker_features = evaluate_recording_features(
      tiny_knn_config(), os.path.join(outdir, f"eval_{process_id}"))
  np.savez(os.path.join(outdir, f"features_{process_id}.npz"),
           **{f"{split}_{name}": array for split, arrays in worker_features.items()
              for name, array in zip(("features", "labels"), arrays, strict=True)})
  with open(os.path.join(outdir, f"results_{process_id}.json"), "w", encoding="utf-8") as out:
    json.dump(worker_results, out)
