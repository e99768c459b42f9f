import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslx import checkpoint


def _state(width=3):
  return {"step": jnp.array(5, jnp.int32), "params": {"dense": {"kernel": jnp.arange(4.0 * width).reshape(4, width)}},
          "opt_state": {"mu": jnp.ones((4, width))}}


def _abstract(state):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def test_save_restore_roundtrip_with_data_state(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2)
  state = _state()
  for step in (1, 2, 3):
    ckpt.save(step, state, {"next_index": step * 10})
  ckpt.wait()
  assert ckpt.all_steps() == [2, 3]  # max_to_keep
  reopened = checkpoint.Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2)
  assert reopened.latest_step() == 3
  restored, data = reopened.restore(3, _abstract(state))
  assert data == {"next_index": 30}
  jax.tree.map(np.testing.assert_array_equal, restored, state)


def test_checkpoint_of_another_model_is_named(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2)
  ckpt.save(7, _state(width=3), {})
  ckpt.close()
  reopened = checkpoint.Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2)
  reopened.check_params_match(7, _abstract(_state(width=3))["params"])  # same model: fine
  with pytest.raises(ValueError, match=r"(?s)another model.*dense/kernel: checkpoint \(4, 3\) vs config \(4, 5\)"):
    reopened.check_params_match(7, _abstract(_state(width=5))["params"])
