"""Pure step -> value schedules (learning rate, weight decay, EMA momentum, temperatures).

Every function takes the step first, works on Python numbers and on traced integer steps alike (so a
method can call it inside its jitted ``after_update``), returns a float32 scalar, and holds its value
outside the range it describes: ``step < 0`` reads as 0 and ``step > total_steps`` as ``total_steps``.
"""
from __future__ import annotations

import jax.numpy as jnp


def _fraction(step, span):
  """``clip(step / span, 0, 1)``, and 1 when ``span <= 0`` (a zero-length ramp is already over)."""
  step, span = jnp.asarray(step, jnp.float32), jnp.asarray(span, jnp.float32)
  return jnp.where(span > 0, jnp.clip(step / jnp.maximum(span, 1.0), 0.0, 1.0), 1.0)


def linear_warmup(step, warmup_steps, start, end):
  """``start + (end - start) * min(t / W, 1)``: a linear ramp over ``W = warmup_steps``, then ``end``.

  E.g. DINO's teacher temperature, 0.04 -> 0.07 over its first 30 epochs (DINO steps it once per epoch
  with ``linspace``, which reaches ``end`` one epoch earlier than this per-step ramp).
  """
  return start + (end - start) * _fraction(step, warmup_steps)


def cosine_decay(step, total_steps, start, end):
  """Half-cosine ``end + (start - end) * (1 + cos(pi t / T)) / 2`` from ``start`` at 0 to ``end`` at ``T``.

  ``T = total_steps``. The weight-decay schedule (DINO: 0.04 -> 0.4) and the decay part of the learning
  rate schedule.
  """
  return end + (start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * _fraction(step, total_steps)))


def cosine_momentum(step, total_steps, base):
  """``m_t = 1 - (1 - m_0) (cos(pi t / T) + 1) / 2``: EMA momentum rising from ``m_0 = base`` to 1.

  The teacher / target-network momentum of BYOL (Grill et al. 2020, ``m_0 = 0.996``) and DINO (Caron et
  al. 2021); it is `cosine_decay` from ``base`` to 1.
  """
  return cosine_decay(step, total_steps, base, 1.0)


def multistep_decay(step, milestones, start, gamma):
  """``start * gamma^n(t)`` with ``n(t)`` the number of ``milestones`` ``<= t`` (a step decay).

  E.g. SimMIM's ViT-B pretraining: the learning rate times 0.1 from epoch 700 of 800 (counted as torch's
  ``MultiStepLR`` and SimMIM's scheduler count: milestone ``m`` applies from step ``m`` on). ``milestones``:
  Python numbers.
  """
  step = jnp.maximum(jnp.asarray(step), 0)  # an integer step stays exact past float32's 2^24
  passed = sum((step >= m).astype(jnp.float32) for m in milestones)
  return jnp.asarray(start, jnp.float32) * jnp.asarray(gamma, jnp.float32) ** passed
