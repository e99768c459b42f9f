"""config.nan_policy='skip': a non-finite step changes nothing but the step count; too many in a row stop."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sslx import step_metrics
from sslx import train
from sslx.methods import Method
from train_helpers import tiny_run_config


def _toy_method():
  """Loss ``mean((w - x)^2)``, with ``x`` straight from the batch, so a NaN in the batch poisons the loss."""
  def loss_fn(variables, method_state, batch, rng):
    del rng
    loss = jnp.mean((variables["params"]["w"] - batch["image"]) ** 2)
    return loss, ({}, {"seen": method_state["seen"] + 1}, {})

  return Method(name="toy", num_views=1, init=lambda rng, batch: ({"params": {"w": jnp.zeros(3)}}, {"seen": 0}),
                loss_fn=loss_fn, embed=lambda variables, state, images: images,
                encoder_variables=lambda variables, state: variables)


def _state(method, tx):
  variables, method_state = method.init(None, None)
  return train.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"], model_state={},
                          opt_state=tx.init(variables["params"]), method_state=method_state,
                          rng=jax.random.PRNGKey(0))


@pytest.mark.parametrize("skip", [False, True])
def test_a_non_finite_step_is_skipped_whole(skip):
  method, tx = _toy_method(), optax.adam(0.1)
  step = jax.jit(train.make_train_step(method, tx, {}, skip_non_finite=skip))
  state, metrics = step(_state(method, tx), {"image": jnp.ones(3)})
  assert float(metrics.get("nonfinite_skipped", 0.0)) == 0.0 and np.all(np.asarray(state.params["w"]) > 0)
  good = jax.device_get(state)
  state, metrics = step(state, {"image": jnp.array([1.0, np.nan, 1.0])})
  if not skip:
    assert "nonfinite_skipped" not in metrics and np.isnan(np.asarray(state.params["w"])).any()
    return
  assert float(metrics["nonfinite_skipped"]) == 1.0 and int(state.step) == 2
  for name in ("params", "opt_state", "method_state"):
    jax.tree.map(np.testing.assert_array_equal, getattr(state, name), getattr(good, name))


class _Checkpointer:
  directory = "/nowhere"

  def close(self):
    pass

  def all_steps(self):
    return [4]


def _metrics(step, skipped):
  value = np.nan if skipped else 1.0
  return step, {"loss": value, "grad_norm": value, "param_norm": 1.0, "nonfinite_skipped": float(skipped)}


def test_skips_in_a_row_stop_the_run_and_a_good_step_resets_the_count(capsys):
  guard = step_metrics.NonFiniteGuard(tiny_run_config(nan_policy="skip", nan_max_skips=3), _Checkpointer())
  guard.check([_metrics(1, True), _metrics(2, True), _metrics(3, False), _metrics(4, True), _metrics(5, True)])
  assert "step 5: loss nan, grad_norm nan: update skipped (2 in a row)" in capsys.readouterr().out
  with pytest.raises(step_metrics.NonFiniteLossError, match=r"3 updates in a row were not finite \(config.nan_max_skips=3\), "
                                                     r"the last at step 6; stopping. Kept checkpoints: \[4\]"):
    guard.check([_metrics(6, True)])


def test_stop_policy_stops_at_the_first_non_finite_step():
  guard = step_metrics.NonFiniteGuard(tiny_run_config(), _Checkpointer())
  with pytest.raises(step_metrics.NonFiniteLossError, match=r"loss = nan at step 2"):
    guard.check([(1, {"loss": 1.0, "grad_norm": 1.0, "param_norm": 1.0}),
                 (2, {"loss": np.nan, "grad_norm": 1.0, "param_norm": 1.0})])


def test_logged_means_leave_skipped_steps_out():
  scalars = step_metrics.mean_metrics([_metrics(1, False), _metrics(2, True), (3, {**_metrics(3, False)[1], "loss": 3.0})],
                                schedule_names=())
  assert scalars["loss"] == 2.0 and scalars["nonfinite_skipped"] == 1.0
