"""Unrolled <-> stacked block layouts: exact conversion of params and optimizer states, the optimizer's
per-layer rules on stacked leaves, init_from across layouts, sharded runs with scanned blocks."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import linen as nn

from conftest import tiny_mae_config
from multiprocess_helpers import REPO, cpu_env
from sslx import optim
from sslx import parallel
from sslx import train
from sslx.convert import scan_layout
from sslx.evaluate import finetune_ops
from sslx.methods import RunLength, mae
from sslx.models import vit
from train_helpers import tiny_run_config



def _assert_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def mae_params():
  """Unrolled params of an MAE with 2 encoder and 2 decoder blocks (numbers, not just shapes)."""
  config = tiny_mae_config()
  config.method.decoder.depth = 2
  variables, _ = jax.jit(mae.build(config, RunLength(1, 1)).init)(
      jax.random.key(0), {"image": jnp.zeros((1, 32, 32, 3))})
  return nn.unbox(variables)["params"]


def test_round_trip_is_exact_and_stacks_block_i_at_index_i(mae_params):
  stacked = scan_layout.stack_blocks(mae_params)
  assert set(stacked["encoder"]) == {"patch_embed", "cls_token", "blocks", "norm"}
  for part in ("encoder", "decoder"):
    kernels = stacked[part]["blocks"]["attn"]["qkv"]["kernel"]
    for i in range(2):
      np.testing.assert_array_equal(kernels[i], mae_params[part][f"block_{i}"]["attn"]["qkv"]["kernel"])
  _assert_identical(scan_layout.unstack_blocks(stacked), mae_params)
  _assert_identical(scan_layout.to_layout(mae_params, scan_blocks=False), mae_params)
  _assert_identical(scan_layout.to_layout(stacked, scan_blocks=True), stacked)
  numpy_tree = jax.tree.map(np.asarray, mae_params)
  assert isinstance(jax.tree.leaves(scan_layout.stack_blocks(numpy_tree))[0], np.ndarray)


def test_conversion_refuses_what_it_cannot_convert(mae_params):
  encoder = dict(mae_params["encoder"])
  with pytest.raises(TypeError, match="nn.unbox"):
    scan_layout.stack_blocks(jax.tree.map(lambda x: nn.LogicallyPartitioned(x, (None,) * x.ndim), encoder))
  with pytest.raises(ValueError, match=r"\[1\] are not block_0"):
    scan_layout.stack_blocks({"block_1": encoder["block_1"]})
  with pytest.raises(ValueError, match="pass depth"):
    scan_layout.unstack_blocks({"blocks": optax.MaskedNode()})
  assert scan_layout.unstack_blocks({"blocks": optax.MaskedNode()}, depth=2) == {
      "block_0": optax.MaskedNode(), "block_1": optax.MaskedNode()}


def test_match_layout_converts_each_place_to_the_target_layout(mae_params):
  stacked = scan_layout.stack_blocks(mae_params)
  mixed = {"encoder": stacked["encoder"], "decoder": mae_params["decoder"]}
  _assert_identical(scan_layout.match_layout(mae_params, mixed), mixed)
  _assert_identical(scan_layout.match_layout(stacked, mae_params), mae_params)


def _run_optimizer(tx, params, grads):
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  return updates, state


def _grads_like(params, seed=1):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)


def _config(**optimizer):
  return ml_collections.ConfigDict(dict(batch_size=256, optimizer=dict(base_lr=0.1, **optimizer),
                                        schedule=dict(warmup_epochs=0.0, min_lr=0.0)))


def test_adamw_state_and_update_convert_exactly(mae_params):
  """One AdamW step in either layout: the stacked update and state are the converted unrolled ones."""
  tx, _ = optim.build_optimizer(_config(name="adamw", weight_decay=0.05, wd_mults=optim.MAE_PRETRAIN_WD_MULTS),
                                steps_per_epoch=2, total_steps=4)
  grads = _grads_like(mae_params)
  updates, state = _run_optimizer(tx, mae_params, grads)
  stacked_updates, stacked_state = _run_optimizer(tx, scan_layout.stack_blocks(mae_params),
                                                  scan_layout.stack_blocks(grads))
  _assert_identical(stacked_updates, scan_layout.stack_blocks(updates))
  _assert_identical(stacked_state, scan_layout.stack_blocks(state))
  _assert_identical(scan_layout.unstack_blocks(stacked_state), state)


def test_a_whole_train_state_converts_to_the_other_layouts_state():
  """What switching a run's layout takes: the restored TrainState (params, AdamW state), converted."""
  def abstract_state(scan):
    config = tiny_run_config(**{"model.scan_blocks": scan})
    method = mae.build(config, RunLength(1, 1))
    tx, _ = optim.build_optimizer(config, steps_per_epoch=1, total_steps=1)
    return jax.eval_shape(lambda: nn.unbox(train.init_train_state(method, tx, jax.random.key(0), (28, 28, 1))))

  unrolled, stacked = abstract_state(False), abstract_state(True)
  is_key = lambda leaf: jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
  zeros = jax.tree.map(lambda leaf: jax.random.key(0) if is_key(leaf) else np.zeros(leaf.shape, leaf.dtype), unrolled)
  shapes = lambda tree: jax.tree.map(lambda leaf: (leaf.shape, leaf.dtype), tree)
  assert shapes(scan_layout.stack_blocks(zeros)) == shapes(stacked)
  assert shapes(scan_layout.unstack_blocks(scan_layout.stack_blocks(zeros))) == shapes(unrolled)


@pytest.fixture(scope="module")
def finetune_params():
  """A ViT with 3 blocks and a head, as fine-tuning trains it."""
  model = vit.VisionTransformer(patch_size=8, width=16, depth=3, num_heads=2, mlp_dim=32)
  params = nn.unbox(jax.jit(lambda key: model.init(key, jnp.zeros((1, 16, 16, 3)), train=False))(jax.random.key(0)))
  return dict(encoder=params["params"], head=dict(logits=dict(kernel=jnp.ones((16, 5)), bias=jnp.zeros(5))))


def test_layer_decay_gives_each_stacked_layer_its_unrolled_update(finetune_params):
  stacked = scan_layout.stack_blocks(finetune_params)
  multipliers = finetune_ops.layer_decay_multipliers(stacked, 0.65)
  np.testing.assert_allclose(multipliers["encoder"]["blocks"]["attn"]["qkv"]["kernel"][:, 0, 0],
                             [0.65 ** 3, 0.65 ** 2, 0.65])
  assert multipliers["encoder"]["blocks"]["norm1"]["scale"].shape == (3, 1)
  assert finetune_ops.num_blocks(stacked) == 3
  tx, _ = optim.build_optimizer(_config(name="adamw", weight_decay=0.05, layer_decay=0.65), steps_per_epoch=2,
                                total_steps=4)
  grads = _grads_like(finetune_params)
  updates, _ = _run_optimizer(tx, finetune_params, grads)
  stacked_updates, _ = _run_optimizer(tx, stacked, scan_layout.stack_blocks(grads))
  _assert_identical(stacked_updates, scan_layout.stack_blocks(updates))


def test_lars_trust_ratio_is_taken_per_stacked_layer(finetune_params):
  tx, _ = optim.build_optimizer(_config(name="lars", weight_decay=1e-2), steps_per_epoch=2, total_steps=4)
  grads = _grads_like(finetune_params)
  updates, _ = _run_optimizer(tx, finetune_params, grads)
  stacked_updates, _ = _run_optimizer(tx, scan_layout.stack_blocks(finetune_params), scan_layout.stack_blocks(grads))
  _assert_identical(stacked_updates, scan_layout.stack_blocks(updates))


def test_rules_naming_blocks_are_refused_with_stacked_blocks():
  config = _config(name="adamw", frozen=("encoder/block_0/.*",))
  optim.validate_optimizer_config(config)
  config.model = dict(scan_blocks=True)
  with pytest.raises(ValueError, match=r"config.optimizer.frozen: 'encoder/block_0/\.\*' names unrolled blocks"):
    optim.validate_optimizer_config(config)
  config = _config(name="adamw", lr_mults=(("encoder/block_1.*", 0.5),))
  config.model = dict(scan_blocks=True)
  with pytest.raises(ValueError, match="config.optimizer.lr_mults"):
    optim.validate_optimizer_config(config)


def test_stacked_params_keep_the_layers_axis_whole_under_fsdp():
  config = tiny_run_config(**{"model.scan_blocks": True})
  method = mae.build(config, RunLength(1, 1))
  boxed = jax.eval_shape(lambda: method.init(jax.random.key(0), {"image": jnp.zeros((1, 28, 28, 1))})[0]["params"])
  specs = nn.logical_to_mesh(nn.get_partition_spec(boxed), parallel.logical_axis_rules(2))
  assert specs["encoder"]["blocks"]["attn"]["qkv"]["kernel"] == jax.sharding.PartitionSpec(None, "fsdp", None)
  assert specs["decoder"]["blocks"]["mlp"]["fc2"]["bias"] == jax.sharding.PartitionSpec(None, "fsdp")


@pytest.fixture(scope="module")
def source_runs(tmp_path_factory):
  """Two 1-step tiny MAE runs, unrolled and scanned: {scan_blocks: (workdir, final state)}."""
  runs = {}
  for scan in (False, True):
    workdir = str(tmp_path_factory.mktemp(f"scan_{scan}"))
    runs[scan] = workdir, train.train(tiny_run_config(total_steps=1, **{"model.scan_blocks": scan}), workdir)[0]
  return runs


@pytest.mark.parametrize("source_scan", [False, True])
def test_init_from_loads_an_encoder_saved_in_the_other_layout(source_runs, tmp_path, source_scan):
  workdir, source_state = source_runs[source_scan]
  config = tiny_run_config(init_from=workdir, seed=7, **{"model.scan_blocks": not source_scan})
  state = train._Run(config, str(tmp_path / "target")).initial_state()
  expected = scan_layout.to_layout(source_state.params["encoder"], scan_blocks=not source_scan)
  _assert_identical(state.params["encoder"], expected)


def test_one_and_eight_devices_give_the_same_loss_and_gradients_with_scanned_blocks():
  overrides = {"model.scan_blocks": True, "model.remat": "matmuls", "model.depth": 2, "model.drop_path_rate": 0.2}
  result = subprocess.run([sys.executable, os.path.join(REPO, "tests", "sharded_gradients.py"),
                           json.dumps(overrides), "1,2"], env=cpu_env(8), cwd=REPO, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "gradients match" in result.stdout