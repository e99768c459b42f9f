"""The one generic training loop.

abstract init (`jax.eval_shape`) → shardings from logical axis names → `jit(init)` or restore the latest
checkpoint → loop(batch → jitted step with donated state → metrics / checkpoint / pictures). The loop knows
nothing about any particular method: it only calls the `sslx.methods.Method` bundle.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sslx import checkpoint as checkpoint_lib
from sslx import config as config_lib
from sslx import metrics as metrics_lib
from sslx import optim
from sslx import parallel
from sslx import viz
from sslx.data import pipeline
from sslx.methods import Method, build_method


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  method_state: Any
  rng: jax.Array


class NonFiniteLossError(FloatingPointError):
  """Loss, gradients or parameters stopped being finite; the run stops and keeps its last good checkpoint."""


def schedule_length(config, num_examples: int) -> tuple[int, int]:
  """(steps per epoch, total steps); an epoch drops its last partial batch."""
  steps_per_epoch = max(num_examples // config.batch_size, 1)
  total = config.total_steps if config.total_steps is not None else config.num_epochs * steps_per_epoch
  return steps_per_epoch, int(total)


def make_train_step(method: Method, tx: optax.GradientTransformation, schedule):
  """A pure ``(state, batch) -> (state, metrics)``; the per-step key is ``fold_in(state.rng, step)``."""
  def train_step(state: TrainState, batch: dict):
    rng = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.value_and_grad(method.loss_fn, has_aux=True)
    (loss, (metrics, method_state)), grads = grad_fn(state.params, state.method_state, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    method_state = method.after_update(params, method_state, state.step)
    # param_norm is also the cheap way to learn that an update left a non-finite parameter behind.
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
               "param_norm": optax.tree.norm(params), "lr": schedule(state.step)}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, method_state=method_state)
    return new_state, metrics
  return train_step


def init_train_state(method: Method, tx: optax.GradientTransformation, rng, image_shape) -> TrainState:
  """A fresh state; params may still carry logical-partitioning boxes (`nn.unbox` them to use directly)."""
  init_rng, state_rng = jax.random.split(rng)
  example = {"image": jnp.zeros((1, *image_shape), jnp.float32), "label": jnp.zeros((1,), jnp.int32)}
  params, method_state = method.init(init_rng, example)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    method_state=method_state, rng=state_rng)


def _abstract_with_shardings(abstract_boxed, shardings):
  return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                      nn.unbox(abstract_boxed), shardings)


class _Run:
  """State of one pretraining run: everything the loop needs, set up before the first compilation."""

  def __init__(self, config, workdir: str):
    config_lib.validate_config(config)
    self.config, self.workdir = config, workdir
    self.is_lead = jax.process_index() == 0
    self.mesh = parallel.create_mesh(config.parallel.fsdp)
    self.batch_sharding = parallel.batch_sharding(self.mesh)
    self.loader = pipeline.make_train_loader(
        config.data, global_batch_size=config.batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count())
    self.steps_per_epoch, self.total_steps = schedule_length(config, self.loader.num_examples)
    self.method = build_method(config)
    self.schedule = optim.learning_rate_schedule(
        config, steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps)
    self.tx = optim.build_optimizer(config, self.schedule)
    self.checkpointer = checkpoint_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=config.checkpoint.max_to_keep,
        async_save=config.checkpoint.async_save)

  def _init_fn(self, rng):
    return init_train_state(self.method, self.tx, rng, self.loader.image_shape)

  def initial_state(self) -> TrainState:
    """The latest checkpoint in the workdir if there is one (on this mesh), else a fresh init."""
    rng = jax.random.PRNGKey(self.config.seed)
    abstract_boxed = jax.eval_shape(self._init_fn, rng)
    rules = parallel.logical_axis_rules(self.config.parallel.fsdp)
    self.state_sharding = parallel.shardings_from_logical(abstract_boxed, self.mesh, rules)
    latest = self.checkpointer.latest_step()
    if latest is None:
      return jax.jit(lambda r: nn.unbox(self._init_fn(r)), out_shardings=self.state_sharding)(rng)
    abstract = _abstract_with_shardings(abstract_boxed, self.state_sharding)
    self.checkpointer.check_params_match(latest, abstract.params)
    state, data_state = self.checkpointer.restore(latest, abstract)
    self.loader.set_state(data_state)
    print(f"Resumed from {self.checkpointer.directory}/{latest}", flush=True)
    return state


def _check_finite(step_metrics: list[tuple[int, dict]], checkpointer) -> None:
  for step, values in step_metrics:
    for name in ("loss", "grad_norm", "param_norm"):
      if not math.isfinite(float(values[name])):
        checkpointer.close()  # finish the saves in flight: they hold good states
        kept = checkpointer.all_steps()
        raise NonFiniteLossError(
            f"{name} = {float(values[name])} at step {step}; stopping. Kept checkpoints: "
            f"{kept or 'none'} in {checkpointer.directory} (the newest one is the last good state).")


def _mean_metrics(step_metrics: list[tuple[int, dict]]) -> dict[str, float]:
  names = step_metrics[0][1].keys()
  scalars = {name: float(np.mean([values[name] for _, values in step_metrics])) for name in names}
  scalars["lr"] = float(step_metrics[-1][1]["lr"])
  return scalars


def pretrain(config, workdir: str) -> tuple[TrainState, dict[str, float]]:
  """Runs (or resumes) pretraining in ``workdir``; returns the final state and the last logged metrics."""
  run = _Run(config, workdir)
  cfg = run.config
  state = run.initial_state()
  train_step = jax.jit(make_train_step(run.method, run.tx, run.schedule),
                       in_shardings=(run.state_sharding, run.batch_sharding),
                       out_shardings=(run.state_sharding, parallel.replicated(run.mesh)),
                       donate_argnums=(0,))
  # Every process computes the pictures (parameters may span hosts); only the lead writes them.
  visualize = None
  if run.method.visualize:
    visualize = jax.jit(run.method.visualize, out_shardings=parallel.replicated(run.mesh))
    viz_batch = _viz_batch(cfg)

  if run.is_lead:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(cfg.to_json_best_effort(indent=2))
    jsonl = metrics_lib.JsonlWriter(os.path.join(workdir, "metrics.jsonl"))
    tensorboard = metrics_lib.TensorBoardWriter(os.path.join(workdir, "tensorboard"))
  progress = metrics_lib.ProgressLine(run.total_steps, cfg.batch_size)
  print(f"{cfg.method.name} | {cfg.model.variant} | {jax.device_count()} {jax.default_backend()} device(s) | "
        f"{run.steps_per_epoch} steps/epoch | {run.total_steps} steps | workdir {os.path.abspath(workdir)}",
        flush=True)

  pending: list[tuple[int, Any]] = []
  last_scalars: dict[str, float] = {}
  start_step = int(state.step)
  first_step_start = time.time()
  for step in range(start_step + 1, run.total_steps + 1):
    batch = parallel.global_batch(next(run.loader), run.batch_sharding)
    state, step_metrics = train_step(state, batch)
    pending.append((step, step_metrics))
    is_last = step == run.total_steps
    log_now = step % cfg.log_every_steps == 0 or is_last or step == start_step + 1
    save_now = step % cfg.checkpoint.every_steps == 0 or is_last
    if log_now or save_now:
      fetched = jax.device_get(pending)
      _check_finite(fetched, run.checkpointer)
      pending.clear()
      if log_now:
        last_scalars = _mean_metrics(fetched)
        if step == start_step + 1:
          print(f"first step (with compilation) took {time.time() - first_step_start:.1f}s", flush=True)
        images_per_s = progress.report(step, {k: last_scalars[k] for k in ("loss", "lr")})
        if math.isfinite(images_per_s):
          last_scalars["images_per_s"] = images_per_s
        if run.is_lead:
          jsonl.write(step, last_scalars)
          tensorboard.write_scalars(step, last_scalars)
    if save_now:
      run.checkpointer.save(step, state, run.loader.get_state())
    if visualize is not None and (step % cfg.viz_every_steps == 0 or is_last):
      rng = jax.random.fold_in(jax.random.PRNGKey(cfg.seed + 1), step)
      pictures = jax.device_get(visualize(state.params, state.method_state, viz_batch, rng))
      if run.is_lead:
        path = os.path.join(workdir, "pictures", f"step_{step:07d}.png")
        viz.save_image_grid(path, {name: viz.denormalize(images, cfg.data.mean, cfg.data.std)
                                   for name, images in pictures.items()})
  progress.close()
  run.checkpointer.close()
  if run.is_lead:
    jsonl.close()
    tensorboard.close()
    print(f"done: step {int(state.step)} | loss {last_scalars.get('loss', float('nan')):.4f} | "
          f"checkpoints in {run.checkpointer.directory} | pictures in {os.path.join(workdir, 'pictures')}",
          flush=True)
  return state, last_scalars


def _viz_batch(config) -> dict:
  """A fixed set of held-out images, so successive pictures show the same examples."""
  loader = pipeline.make_eval_loader(config.data, split=config.data.eval_split, batch_size=config.viz_num_images)
  batch = next(iter(loader))
  return {"image": jnp.asarray(batch["image"]), "label": jnp.asarray(batch["label"])}
