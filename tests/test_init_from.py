"""config.init_from: a run's encoder, or (run_dir, source subtree, target subtree) mappings, shape-checked."""
import jax
import numpy as np
import pytest

from sslx import init_from
from sslx import train
from sslx.methods import finetune
from train_helpers import tiny_run_config


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A 2-step tiny MAE run: (workdir, final state)."""
  workdir = tmp_path_factory.mktemp("source")
  state, _ = train.train(tiny_run_config(total_steps=2), str(workdir))
  return str(workdir), state


def _assert_equal_trees(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_a_workdir_loads_only_the_encoder_of_a_run(source, tmp_path):
  workdir, source_state = source
  state = train._Run(tiny_run_config(init_from=workdir, seed=7), str(tmp_path / "target")).initial_state()
  _assert_equal_trees(state.params["encoder"], source_state.params["encoder"])
  fresh = train._Run(tiny_run_config(seed=7), str(tmp_path / "fresh")).initial_state()
  _assert_equal_trees(state.params["decoder"], fresh.params["decoder"])
  _assert_equal_trees(state.opt_state, fresh.opt_state)


def test_a_mapping_writes_into_method_state(source, tmp_path):
  """A fine-tuning run's EMA copy starts from the pretrained encoder while its online encoder stays random."""
  workdir, source_state = source
  pretrain = tiny_run_config()
  config = finetune.finetune_config(pretrain, num_classes=10, batch_size=16, num_epochs=1, base_lr=1e-3,
                                    layer_decay=0.75, drop_path_rate=0.0,
                                    augmentation="random_resized_crop(28, scale=(1, 1))|hflip")
  config.method.ema_decay = 0.99
  config.init_from = ((workdir, "encoder/params", "method_state/ema/params/encoder"),)
  config.total_steps = 1
  config.eval.every_epochs = None
  config.checkpoint.best_metric = None
  config.lock()
  state = train._Run(config, str(tmp_path / "ft")).initial_state()
  _assert_equal_trees(state.method_state["ema"]["params"]["encoder"], source_state.params["encoder"])
  assert not np.array_equal(state.params["encoder"]["cls_token"], source_state.params["encoder"]["cls_token"])


def test_explicit_paths_copy_any_subtree(source, tmp_path):
  workdir, source_state = source
  config = tiny_run_config(init_from=((workdir, "params/decoder", "params/decoder"),), seed=3)
  state = train._Run(config, str(tmp_path / "target")).initial_state()
  _assert_equal_trees(state.params["decoder"], source_state.params["decoder"])
  assert not np.array_equal(state.params["encoder"]["cls_token"], source_state.params["encoder"]["cls_token"])


def test_a_shape_mismatch_names_the_subtree_and_both_shapes(source, tmp_path):
  workdir, _ = source
  wider = tiny_run_config(init_from=workdir, **{"model.width": 48})
  with pytest.raises(ValueError, match=r"(?s)config.init_from\[0\] .*'encoder', 'encoder'.*"
                                       r"params/block_0/attn/proj/bias: source \(32,\) vs target \(48,\)"):
    train._Run(wider, str(tmp_path / "target")).initial_state()
  missing = tiny_run_config(init_from=((workdir, "params/nothing", "params/decoder"),))
  with pytest.raises(ValueError, match="has no 'params/nothing'"):
    train._Run(missing, str(tmp_path / "target2")).initial_state()


def test_bad_mappings_are_named_before_anything_runs(tmp_path):
  with pytest.raises(ValueError, match="config.init_from\\[0\\] run_dir=.*nowhere.*not the --workdir"):
    init_from.parse_mappings(str(tmp_path / "nowhere"))
  with pytest.raises(ValueError, match="config.init_from\\[0\\]=.*not a .*triple"):
    init_from.parse_mappings(((str(tmp_path), "encoder"),))
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(ValueError, match="target 'weights/encoder' is neither 'encoder' nor a path"):
    init_from.parse_mappings(((str(tmp_path), "encoder", "weights/encoder"),))
  assert init_from.parse_mappings(None) == []
  assert init_from.parse_mappings(str(tmp_path)) == [init_from.Mapping(str(tmp_path), "encoder", "encoder")]


def test_extra_source_leaves_are_ignored_and_listed():
  source = {"params": {"cls_token": np.zeros((1, 1, 4)), "mask_token": np.zeros((1, 1, 4))}}
  target = {"params": {"cls_token": np.zeros((1, 1, 4))}}
  assert init_from.check_target_shapes(source, target, what="x") == ["params/mask_token"]
