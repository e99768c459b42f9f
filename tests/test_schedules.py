"""sslx.schedules against their formulas, eagerly and on traced steps inside jit."""
import math

import jax
import jax.numpy as jnp
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
