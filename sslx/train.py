"""The one generic training loop.

abstract init (`jax.eval_shape`) → shardings from logical axis names → `jit(init)` or restore the latest
checkpoint → loop(batch → jitted step with donated state → metrics / checkpoint / pictures). The loop knows
nothing about any particular method: it only calls the `sslx.methods.Method` bundle.
"""
from __future__ import annotations

import glob
import json
import math
import os
import time
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from sslx import checkpoint as checkpoint_lib
from sslx import checks
from sslx import init_from
from sslx import models
from sslx import monitors
from sslx import optim
from sslx import parallel
from sslx import preemption
from sslx import profiling
from sslx import results as results_lib
from sslx import run_lock
from sslx import step_metrics
from sslx import viz
from sslx import xla_options
from sslx.data import device_augment as device_augment_lib
from sslx.data import pipeline
from sslx.data import prefetch
from sslx.methods import Method, RunLength, build_method, split_variables


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  model_state: Any  # every variable collection but params (BatchNorm's batch_stats), updated by the step
  opt_state: Any
  method_state: Any
  rng: jax.Array
  probe: Any = None  # the online linear probe's params and optimizer state (sslx/monitors.py), if any

  @property
  def variables(self) -> dict:
    return {"params": self.params, **self.model_state}


def schedule_length(config, num_examples: int) -> tuple[int, int]:
  """(steps per epoch, total steps); an epoch drops its last partial batch."""
  steps_per_epoch = max(num_examples // config.batch_size, 1)
  total = config.total_steps if config.total_steps is not None else config.num_epochs * steps_per_epoch
  return steps_per_epoch, int(total)


def make_train_step(method: Method, tx: optax.GradientTransformation, schedules: dict[str, Callable], *,
                    probe: Optional[monitors.OnlineProbe] = None,
                    prepare_batch: Optional[Callable[[dict, jax.Array], dict]] = None,
                    skip_non_finite: bool = False):
  """A pure ``(state, batch) -> (state, metrics)``; the per-step key is ``fold_in(state.rng, step)``.

  Gradients are taken with respect to ``params`` only; the other collections come back from the loss.
  ``prepare_batch(batch, key)`` runs first (augmentation on the device); ``probe`` trains the online
  linear probe on the variables the step started from. ``schedules`` (e.g. lr, weight decay) are logged.
  With ``skip_non_finite``, a step whose loss or gradients are not finite changes nothing but the step
  counter (so the next step draws a new batch and new keys) and reports ``nonfinite_skipped = 1``.
  """
  def train_step(state: TrainState, batch: dict):
    rng = jax.random.fold_in(state.rng, state.step)
    if prepare_batch is not None:
      rng, augment_rng = jax.random.split(rng)
      batch = prepare_batch(batch, augment_rng)

    def objective(params):
      return method.loss_fn({"params": params, **state.model_state}, state.method_state, batch, rng)

    (loss, (metrics, method_state, model_state)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    model_state = {**state.model_state, **model_state}
    method_state = method.after_update({"params": params, **model_state}, method_state, state.step)
    # param_norm is also the cheap way to learn that an update left a non-finite parameter behind.
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params),
               **{name: schedule(state.step) for name, schedule in schedules.items()}}
    probe_state = state.probe
    if probe is not None:
      probe_state, probe_metrics = probe.update(state.probe, state.variables, state.method_state, batch)
      metrics.update(probe_metrics)
    new_state = state.replace(step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state,
                              method_state=method_state, probe=probe_state)
    if skip_non_finite:
      finite = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
      kept = state.replace(step=state.step + 1)
      new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, kept)
      metrics["nonfinite_skipped"] = 1.0 - finite.astype(jnp.float32)
    return new_state, metrics
  return train_step


def example_batch(image_shape) -> dict:
  return {"image": jnp.zeros((1, *image_shape), jnp.float32), "label": jnp.zeros((1,), jnp.int32)}


def init_train_state(method: Method, tx: optax.GradientTransformation, rng, image_shape,
                     probe: Optional[monitors.OnlineProbe] = None) -> TrainState:
  """A fresh state; params may still carry logical-partitioning boxes (`nn.unbox` them to use directly)."""
  init_rng, state_rng = jax.random.split(rng)
  example = example_batch(image_shape)
  variables, method_state = method.init(init_rng, example)
  params, model_state = split_variables(variables)
  probe_state = None
  if probe is not None:
    feature_dim = jax.eval_shape(method.embed, nn.unbox(variables), nn.unbox(method_state),
                                 example["image"]).shape[-1]
    probe_state = probe.init(feature_dim)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                    opt_state=tx.init(nn.unbox(params)), method_state=method_state, rng=state_rng, probe=probe_state)


def _abstract_with_shardings(abstract_boxed, shardings):
  return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                      nn.unbox(abstract_boxed), shardings)


class _Run:
  """State of one training run: everything the loop needs, set up before the first compilation."""

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, workdir
    self.is_lead = jax.process_index() == 0
    self.mesh = parallel.create_mesh(config.parallel.fsdp)
    self.batch_sharding = parallel.batch_sharding(self.mesh)
    self.loader = pipeline.make_train_loader(
        config.data, global_batch_size=config.batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count())
    self.steps_per_epoch, self.total_steps = schedule_length(config, self.loader.num_examples)
    self.method = build_method(config, RunLength(self.steps_per_epoch, self.total_steps))
    self.tx, self.schedules = optim.build_optimizer(config, steps_per_epoch=self.steps_per_epoch,
                                                    total_steps=self.total_steps)
    self.monitor = None
    if config.monitor.every_steps != 0:
      self.monitor = monitors.RepresentationMonitor(config, self.method.embed, self.mesh)
    num_classes = self.monitor.num_classes if self.monitor else config.monitor.num_classes
    self.probe = monitors.make_online_probe(config, self.method.embed, num_classes)
    self.checkpointer = checkpoint_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=config.checkpoint.max_to_keep,
        async_save=config.checkpoint.async_save, cleanup_partial=self.is_lead)
    self.best = None
    if config.checkpoint.best_metric is not None:
      self.best = checkpoint_lib.BestCheckpointer(os.path.join(workdir, "best"), config.checkpoint.best_metric,
                                                  cleanup_partial=self.is_lead)

  def _init_fn(self, rng):
    return init_train_state(self.method, self.tx, rng, self.loader.image_shape, self.probe)

  def initial_state(self) -> TrainState:
    """The latest checkpoint in the workdir if there is one (on this mesh), else a fresh init."""
    rng = jax.random.PRNGKey(self.config.seed)
    abstract_boxed = jax.eval_shape(self._init_fn, rng)
    rules = parallel.logical_axis_rules(self.config.parallel.fsdp)
    self.state_sharding = parallel.shardings_from_logical(abstract_boxed, self.mesh, rules)
    abstract = _abstract_with_shardings(abstract_boxed, self.state_sharding)
    restored = self.checkpointer.restore_latest(
        abstract, check_params=lambda step: self.checkpointer.check_params_match(step, abstract.params),
        all_agree=preemption.all_processes, barrier=preemption.barrier, is_lead=self.is_lead, log=self.log)
    if restored is None:
      self._refuse_to_forget_moved_checkpoints()
      state = xla_options.jit(lambda r: nn.unbox(self._init_fn(r)), out_shardings=self.state_sharding)(rng)
      mappings = init_from.parse_mappings(self.config.init_from)
      if mappings:
        state = self._initialised_from(state, mappings)
      return state
    step, state, data_state = restored
    self.loader.set_state(data_state)
    self.log(f"Resumed from {self.checkpointer.directory}/{step}")
    return state

  def _refuse_to_forget_moved_checkpoints(self) -> None:
    """A fresh start beside checkpoints that were all moved aside as unreadable would silently drop the run."""
    moved = sorted(glob.glob(os.path.join(self.checkpointer.directory, "*.corrupt*")))
    if moved:
      raise checkpoint_lib.CheckpointRestoreError(
          f"{self.checkpointer.directory} holds no readable checkpoint, only ones moved aside as unreadable: "
          f"{[os.path.basename(path) for path in moved]}; to start this run from scratch, delete them (or use "
          "another --workdir)")

  def check_saves(self, collective: bool) -> None:
    """Raises `CheckpointSaveError` once a save failed; with ``collective`` on every process together, so
    that none waits in the next save for a process that stopped."""
    failure = None
    try:
      self.checkpointer.raise_if_save_failed()
    except checkpoint_lib.CheckpointSaveError as error:
      failure = error
    if collective and not preemption.all_processes(failure is None):
      failure = failure or checkpoint_lib.CheckpointSaveError(
          f"another process failed to save a checkpoint in {self.checkpointer.directory}; see its output")
    if failure is not None:
      raise failure

  def log(self, line: str) -> None:
    if self.is_lead:
      print(line, flush=True)

  def _initialised_from(self, state: TrainState, mappings) -> TrainState:
    """``state`` with the subtrees of other runs that ``config.init_from`` names; nothing else changes."""
    parts = {name: getattr(state, name) for name in init_from.STATE_PARTS}
    shardings = {name: getattr(self.state_sharding, name) for name in init_from.STATE_PARTS}
    return state.replace(**init_from.apply_mappings(parts, mappings, shardings, self.mesh, log=self.log))


def train(config, workdir: str) -> tuple[TrainState, dict[str, float]]:
  """Runs (or resumes) a training run in ``workdir``; returns the final state and the last logged metrics.

  Pretraining and fine-tuning alike: the method bundle of ``config.method.name`` says what is trained.
  SIGTERM, SIGINT and ``config.checkpoint.max_minutes`` end the run after the current step with a
  checkpoint, raising `sslx.preemption.Preempted`; the same call resumes. A run that already reached its
  last step changes nothing and returns its recorded results.
  """
  checks.validate_workdir(workdir)
  checks.validate_run_config(config)
  lock = run_lock.WorkdirLock(workdir)
  locked = None
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except run_lock.WorkdirLockedError as error:
      locked = error
  if not preemption.all_processes(locked is None):
    raise locked or run_lock.WorkdirLockedError(f"the lead process could not lock the workdir {workdir}")
  try:
    # One process reads its own flag at no cost, so it checks every step; several agree by a collective.
    check_every = config.checkpoint.stop_check_every_steps if jax.process_count() > 1 else 1
    with preemption.StopRequests(max_minutes=config.checkpoint.max_minutes, check_every_steps=check_every) as stops:
      run = _Run(config, workdir)
      # The run's mesh is the current mesh wherever the step, evaluation, monitors and pictures are traced
      # and run: a loss that compares each example with the whole global batch (sslx.losses.info_nce) finds
      # it there and splits its work over the devices, with no mesh passed through the method.
      with jax.set_mesh(run.mesh):
        return _train(run, stops)
  finally:
    lock.release()


def _train(run: _Run, stops: preemption.StopRequests) -> tuple[TrainState, dict[str, float]]:
  cfg, workdir = run.config, run.workdir
  state = run.initial_state()
  start_step = int(state.step)
  if start_step >= run.total_steps:
    return state, _finished_already(run, start_step)
  device_augment = device_augment_lib.build_device_augmentation(cfg.data)
  train_step = xla_options.jit(make_train_step(run.method, run.tx, run.schedules, probe=run.probe,
                                               prepare_batch=device_augment,
                                               skip_non_finite=cfg.nan_policy == "skip"),
                               in_shardings=(run.state_sharding, run.batch_sharding),
                               out_shardings=(run.state_sharding, parallel.replicated(run.mesh)),
                               donate_argnums=(0,))
  held_out = monitors.make_held_out_evaluation(run.method, cfg, run.mesh, run.state_sharding)
  eval_period = None if held_out is None else cfg.eval.every_epochs * run.steps_per_epoch
  monitor_period = cfg.monitor.every_steps or cfg.checkpoint.every_steps
  # Every process computes the pictures (parameters may span hosts); only the lead writes them.
  visualize = None
  if run.method.visualize:
    visualize = xla_options.jit(run.method.visualize, out_shardings=parallel.replicated(run.mesh))
    viz_batch = pipeline.make_viz_batch(cfg.data, cfg.viz_num_images)

  logger = step_metrics.RunLogger(cfg, workdir, total_steps=run.total_steps, start_step=start_step,
                                  is_lead=run.is_lead)
  attention = models.attention_implementation(cfg.model)
  run.log(f"{cfg.method.name} | {cfg.model.name} {cfg.model.get('variant', '')}"
          f"{f' | {attention} attention' if attention else ''} | {jax.device_count()} "
          f"{jax.default_backend()} device(s) | {run.steps_per_epoch} steps/epoch | {run.total_steps} steps | "
          f"workdir {os.path.abspath(workdir)}")
  if run.monitor is not None and start_step == 0:
    logger.write(0, {name: value for name, value in _evaluate(run, state, 0, None, True).items()
                     if name != "seconds"})

  batches = prefetch.DevicePrefetcher(run.loader, lambda batch: parallel.global_batch(batch, run.batch_sharding))
  guard = step_metrics.NonFiniteGuard(cfg, run.checkpointer)
  single_process = jax.process_count() == 1
  pending: list[tuple[int, Any]] = []
  last_scalars: dict[str, float] = {}
  first_step_start = time.time()
  profiler = profiling.StepProfiler(cfg.get("profile_steps"), os.path.join(workdir, "tensorboard"))
  for step in range(start_step + 1, run.total_steps + 1):
    profiler.step(step, state)
    state, device_metrics = train_step(state, next(batches))
    pending.append((step, device_metrics))
    is_last = step == run.total_steps
    stop = None if is_last else stops.agreed_stop(step)
    log_now = step % cfg.log_every_steps == 0 or is_last or step == start_step + 1 or stop is not None
    save_now = step % cfg.checkpoint.every_steps == 0 or is_last or stop is not None
    # One process sees its own failed save at once; several agree on it before the next save.
    if single_process or save_now:
      run.check_saves(collective=not single_process)
    if log_now or save_now:
      fetched = jax.device_get(pending)
      guard.check(fetched)
      pending.clear()
    evaluated = {}
    if stop is None:
      evaluated = _evaluate(run, state, step, held_out if step_metrics.is_due(eval_period, step, is_last) else None,
                            run.monitor is not None and step_metrics.is_due(monitor_period, step, is_last))
    logger.progress.exclude(evaluated.pop("seconds", 0.0))
    if log_now:
      last_scalars = step_metrics.mean_metrics(fetched, run.schedules)
      if step == start_step + 1:
        run.log(f"first step (with compilation) took {time.time() - first_step_start:.1f}s")
      images_per_s = logger.progress.report(step, {k: last_scalars[k] for k in ("loss", "lr")})
      if math.isfinite(images_per_s):
        last_scalars["images_per_s"] = images_per_s
    if evaluated:
      last_scalars.update(evaluated)
    if log_now or evaluated:
      logger.write(step, last_scalars if log_now else evaluated)
    if save_now:
      logger.flush()
      run.checkpointer.save(step, state, batches.get_state())
    if stop is not None:
      _stop_early(run, [batches, logger, profiler], step, stop)
    if visualize is not None and (step % cfg.viz_every_steps == 0 or is_last):
      jax.block_until_ready(state)
      viz_start = time.time()
      rng = jax.random.fold_in(jax.random.PRNGKey(cfg.seed + 1), step)
      pictures = jax.device_get(visualize(state.variables, state.method_state, viz_batch, rng))
      if run.is_lead:
        path = os.path.join(workdir, "pictures", f"step_{step:07d}.png")
        viz.save_image_grid(path, {name: viz.denormalize(images, cfg.data.mean, cfg.data.std)
                                   for name, images in pictures.items()})
      logger.progress.exclude(time.time() - viz_start)
  profiler.close(state)
  batches.close()
  logger.close()
  _close_checkpointers(run)
  if run.is_lead:
    _write_results(run, last_scalars)
  run.log(f"done: step {int(state.step)} | loss {last_scalars.get('loss', float('nan')):.4f} | "
          f"checkpoints in {run.checkpointer.directory}")
  return state, last_scalars


def _close_checkpointers(run: _Run) -> None:
  run.checkpointer.close()
  if run.best is not None:
    run.best.close()


def _stop_early(run: _Run, closables, step: int, stop: tuple[str, int]) -> None:
  """Waits for the checkpoint of ``step`` to be on disk, closes everything and raises `Preempted`."""
  reason, exit_code = stop
  for closable in closables:
    closable.close()
  _close_checkpointers(run)
  raise preemption.Preempted(
      f"stopped by {reason} after step {step}/{run.total_steps}: checkpoint {run.checkpointer.directory}/"
      f"{step}; run the same command to resume", exit_code)


def _finished_already(run: _Run, step: int) -> dict[str, float]:
  """A rerun of a finished run: says so, and leaves (or, if the run died before writing it, writes)
  results.json; returns the last logged metrics."""
  _close_checkpointers(run)
  path = os.path.join(run.workdir, "results.json")
  last = results_lib.logged_metrics_at(os.path.join(run.workdir, "metrics.jsonl"), step)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      last = json.load(f).get("last") or last
  elif run.is_lead:
    _write_results(run, last)
  run.log(f"already finished: step {step}/{run.total_steps} in {run.checkpointer.directory}; results in "
          f"{path} (raise config.total_steps or config.num_epochs to train on)")
  return last


def _evaluate(run: _Run, state: TrainState, step: int, held_out: Optional[Callable[[TrainState], dict]],
              monitor: bool) -> dict[str, float]:
  """Held-out evaluation and monitor reports due at ``step`` (+ 'seconds' they took), best checkpoint."""
  if held_out is None and not monitor:
    return {}
  jax.block_until_ready(state)  # the steps in flight are training time, not evaluation time
  start = time.time()
  out = {}
  if monitor:
    out.update(run.monitor.report(state.variables, state.method_state, state.probe and state.probe["params"]))
  if held_out is not None:
    scores = held_out(state)
    print(f"step {step}: " + " | ".join(f"{name} {value:.2f}" for name, value in scores.items()), flush=True)
    if run.best is not None:
      run.best.maybe_save(step, state, scores)
    out.update(scores)
  out["seconds"] = time.time() - start
  return out


def _write_results(run: _Run, last_scalars: dict[str, float]) -> None:
  results = {"task": run.config.task, "init_from": run.config.init_from, "last": last_scalars}
  if run.best is not None:
    results["best"] = run.best.summary()
  results_lib.write_json(os.path.join(run.workdir, results_lib.RESULTS), results)
