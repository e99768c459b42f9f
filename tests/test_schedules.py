"""sslx.schedules against their formulas, eagerly and on traced steps inside jit."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sslx import schedules

TOTAL, WARMUP = 100, 30
STEPS = (-5, 0, 1, 29, 30, 50, 99, 100, 150)  # outside [0, TOTAL] each schedule holds its end value


def _check(fn, formula):
  jitted = jax.jit(fn)
  for step in STEPS:
    want = formula(min(max(step, 0), TOTAL))
    np.testing.assert_allclose(float(fn(step)), want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(jitted(jnp.int32(step))), want, rtol=1e-6, atol=1e-7)


def test_cosine_momentum_rises_from_base_to_one():
  base = 0.996
  _check(lambda s: schedules.cosine_momentum(s, TOTAL, base),
         lambda t: 1 - (1 - base) * (math.cos(math.pi * t / TOTAL) + 1) / 2)
  assert float(schedules.cosine_momentum(0, TOTAL, base)) == pytest.approx(base)
  assert float(schedules.cosine_momentum(TOTAL, TOTAL, base)) == pytest.approx(1.0)


def test_linear_warmup_ramps_then_holds():
  start, end = 0.04, 0.07  # DINO's teacher temperature
  _check(lambda s: schedules.linear_warmup(s, WARMUP, start, end),
         lambda t: start + (end - start) * min(t / WARMUP, 1.0))


def test_linear_warmup_of_zero_steps_is_already_at_the_end():
  assert float(schedules.linear_warmup(0, 0, 0.0, 2.0)) == 2.0
  assert float(jax.jit(schedules.linear_warmup)(jnp.int32(0), 0, 0.0, 2.0)) == 2.0


@pytest.mark.parametrize("start, end", [(1.0, 0.1), (0.04, 0.4)])  # decreasing (lr) and increasing (DINO wd)
def test_cosine_decay_is_a_half_cosine_from_start_to_end(start, end):
  _check(lambda s: schedules.cosine_decay(s, TOTAL, start, end),
         lambda t: end + (start - end) * 0.5 * (1 + math.cos(math.pi * t / TOTAL)))
  np.testing.assert_allclose(float(schedules.cosine_decay(TOTAL // 2, TOTAL, start, end)), (start + end) / 2,
                             rtol=1e-6)


def test_multistep_decay_multiplies_by_gamma_from_each_milestone_on():
  milestones, gamma = (30, 70), 0.1
  _check(lambda s: schedules.multistep_decay(s, milestones, 2.0, gamma),
         lambda t: 2.0 * gamma ** sum(t >= m for m in milestones))
  values = [float(schedules.multistep_decay(s, milestones, 2.0, gamma)) for s in (29, 30, 69, 70)]
  assert values == pytest.approx([2.0, 0.2, 0.2, 0.02])
  assert float(schedules.multistep_decay(5, (), 2.0, gamma)) == 2.0


def test_learning_rate_schedule_warms_up_then_steps_down_at_the_milestones():
  """SimMIM's shape (`sslx.optim`, ``config.schedule.decay='multistep'``): a linear ramp over 1 epoch, then
  the peak until epoch 7 of 8 and a tenth of it after; milestones are counted in epochs."""
  from sslx import optim  # only this test needs the optimizer module
  config = ml_collections.ConfigDict(dict(
      batch_size=1024, optimizer=dict(base_lr=1e-4, lr_batch_base=512),
      schedule=dict(warmup_epochs=1.0, min_lr=0.0, decay="multistep", milestone_epochs=(7,), gamma=0.1)))
  optim.validate_optimizer_config(config)
  schedule = jax.jit(optim.learning_rate_schedule(config, steps_per_epoch=10, total_steps=80))
  peak = 1e-4 * 1024 / 512
  # A milestone past the run never applies (and is no step an int32 could hold).
  beyond = config.copy_and_resolve_references()
  beyond.schedule.milestone_epochs = (7, 9, 1e300)
  optim.validate_optimizer_config(beyond)
  for lr in (schedule, jax.jit(optim.learning_rate_schedule(beyond, steps_per_epoch=10, total_steps=80))):
    for step, want in ((0, 0.0), (5, peak / 2), (10, peak), (69, peak), (70, peak * 0.1), (79, peak * 0.1)):
      np.testing.assert_allclose(float(lr(jnp.int32(step))), want, rtol=1e-6, err_msg=str(step))
  for key, value, message in (("decay", "step", r"config\.schedule\.decay='step'"),
                              ("milestone_epochs", (0.5,), r"config\.schedule\.milestone_epochs=\(0\.5,\)"),
                              ("milestone_epochs", (7, 3), r"must be increasing"),
                              ("gamma", 0.0, r"config\.schedule\.gamma=0\.0")):
    bad = config.copy_and_resolve_references()
    bad.schedule[key] = value
    with pytest.raises(ValueError, match=message):
      optim.validate_optimizer_config(bad)
