r"""Training-step throughput, memory and MFU of any method bundle, from its run config.

Builds the method, the optimizer, the online probe, the device augmentation and the jitted train step the
way `sslx.train` does (``make_train_step`` / ``init_train_state``, the run's mesh and shardings over the local
devices, a donated state), then times it on one fixed batch, so only compute is measured. The batch is one
batch of the run's own training loader on ``config.data.source='synthetic'`` (the config's image shape,
views and uint8-or-float format), repeated to the batch size. Each configuration (batch per device x dtype)
prints one JSON line: images/s, median step time, compile time, XLA's memory analysis and the device's
peak memory, model FLOPs per image (analytic where `model_flops` has the method's formula, else XLA's
count) beside XLA's count, and MFU against the device's peak.

  python experiments/bench_throughput.py --config=configs/mae_vitb.py:local --config.model.variant=Ti/8 \
      --config.data.image_size=32 --batch_per_device=8 --steps=2 --warmup_steps=1           # CPU check
  python experiments/bench_throughput.py --config=configs/mae_vitb.py --batch_per_device=128,256 \
      --dtype=bfloat16 --json_out=bench_throughput.jsonl                                     # GPU
  python experiments/bench_throughput.py --config=configs/finetune.py:vitl --find_max_batch    # GPU
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import gc
import glob
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Optional

from absl import flags
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sslx import checks
from sslx import cli
from sslx import monitors
from sslx import optim
from sslx import parallel
from sslx import profiling
from sslx import train
from sslx import xla_options
from sslx.data import device_augment as device_augment_lib
from sslx.data import pipeline
from sslx.methods import RunLength, build_method
from sslx.models import vit

import model_flops

SAMPLE_ROWS = 16  # rows the loader really makes; the batch repeats them (their content costs nothing)
DTYPES = ("float32", "bfloat16", "auto")


@dataclasses.dataclass(frozen=True)
class Options:
  """What to measure besides the config; the command line's flags, one to one."""
  steps: int = 10
  warmup_steps: int = 2
  peak_tflops: Optional[float] = None
  max_batch: Optional[int] = None
  batch_multiple: int = 1
  json_out: Optional[str] = None
  profile_dir: Optional[str] = None
  profile_steps: int = 3
  config_name: str = ""
  overrides: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Step:
  """A compiled train step with its state and batch, ready to run."""
  compiled: Any
  state: Any
  batch: dict
  compile_s: float
  has_probe: bool
  loss: Optional[float] = None  # of the last step run


def configured(config, batch_per_device: int, dtype: Optional[str]):
  """A validated copy of ``config`` with the batch size, the dtype and a synthetic data source."""
  config = copy.deepcopy(config)
  config.batch_size = batch_per_device * jax.device_count()
  if dtype is not None:
    config.model.dtype = dtype
  # One process reads its sample batch itself; workers would only cost start-up time.
  config.data.update(dict(source="synthetic", num_workers=0, prefetch=1))
  checks.validate_run_config(config)
  return config


def _sample_batch(config) -> tuple[dict, tuple[int, int, int], int]:
  """(a host batch of ``config.batch_size`` rows in the loader's format, the model's image shape, the
  loader's number of examples)."""
  rows = min(SAMPLE_ROWS, config.batch_size)
  loader = pipeline.make_train_loader(config.data, global_batch_size=rows, seed=config.seed)
  sample = next(loader)
  loader.close()
  repeat = np.arange(config.batch_size) % rows
  return ({key: np.asarray(value)[repeat] for key, value in sample.items()}, loader.image_shape,
          loader.num_examples)


def _probe_classes(config, labels: np.ndarray) -> Optional[int]:
  """The online probe's classes as `sslx.train` finds them: the config's, else (with a monitor) from the
  labels."""
  if config.monitor.num_classes is not None or config.monitor.every_steps == 0:
    return config.monitor.num_classes
  return int(labels.max()) + 1 if labels.size and labels.min() >= 0 else None


def build_step(config) -> _Step:
  """Initialises the state on the run's shardings and compiles the run's jitted train step."""
  host_batch, image_shape, num_examples = _sample_batch(config)
  steps_per_epoch, total_steps = train.schedule_length(config, num_examples)
  method = build_method(config, RunLength(steps_per_epoch, total_steps))
  tx, schedules = optim.build_optimizer(config, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  probe = monitors.make_online_probe(config, method.embed, _probe_classes(config, host_batch["label"]))
  mesh = parallel.create_mesh(config.parallel.fsdp)
  batch_sharding = parallel.batch_sharding(mesh)

  def init_fn(rng):
    return train.init_train_state(method, tx, rng, image_shape, probe)

  rng = jax.random.PRNGKey(config.seed)
  state_sharding = parallel.shardings_from_logical(jax.eval_shape(init_fn, rng), mesh,
                                                   parallel.logical_axis_rules(config.parallel.fsdp))
  state = xla_options.jit(lambda r: nn.unbox(init_fn(r)), out_shardings=state_sharding)(rng)
  device_augment = device_augment_lib.build_device_augmentation(config.data)
  step = xla_options.jit(train.make_train_step(method, tx, schedules, probe=probe, prepare_batch=device_augment,
                                               skip_non_finite=config.nan_policy == "skip"),
                         in_shardings=(state_sharding, batch_sharding),
                         out_shardings=(state_sharding, parallel.replicated(mesh)), donate_argnums=(0,))
  batch = parallel.global_batch(host_batch, batch_sharding)
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  return _Step(compiled, state, batch, time.perf_counter() - start, probe is not None)


def _run_steps(step: _Step, count: int, profiler: Optional[profiling.StepProfiler] = None) -> list[float]:
  """Seconds of each of ``count`` steps, each waited for (so that a median means something)."""
  seconds, metrics = [], None
  for i in range(1, count + 1):
    if profiler is not None:
      profiler.step(i, step.state)
    start = time.perf_counter()
    step.state, metrics = step.compiled(step.state, step.batch)
    jax.block_until_ready(step.state)
    seconds.append(time.perf_counter() - start)
  if profiler is not None:
    profiler.close(step.state)
  step.loss = float(metrics["loss"]) if metrics else None
  return seconds


def _profile(step: _Step, options: Options) -> None:
  """Traces ``options.profile_steps`` more steps into ``options.profile_dir``; the step's optimised HLO goes
  into the trace's own directory (``plugins/profile/<time>/``), where summarize_trace.py looks for it."""
  profiler = profiling.StepProfiler((1, options.profile_steps), options.profile_dir)
  _run_steps(step, options.profile_steps, profiler)
  run_dir = max(glob.glob(os.path.join(options.profile_dir, "plugins", "profile", "*")), key=os.path.getmtime)
  with open(os.path.join(run_dir, "train_step.hlo.txt"), "w", encoding="utf-8") as f:
    f.write(step.compiled.as_text())


def memory_fields(compiled) -> dict:
  """XLA's memory analysis of the compiled step (per device), and the device's own counters where it keeps
  them (``peak_bytes_in_use``: the most this process has held at once since it started)."""
  analysis = compiled.memory_analysis()
  names = ("argument", "output", "alias", "temp", "generated_code")
  out = {f"memory_{name}_bytes": getattr(analysis, f"{name}_size_in_bytes", None) if analysis else None
         for name in names}
  out["memory_xla_peak_bytes"] = getattr(analysis, "peak_memory_in_bytes", None) if analysis else None
  stats = jax.local_devices()[0].memory_stats() or {}
  out["memory_peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
  out["memory_bytes_limit"] = stats.get("bytes_limit")
  return out


def flops_fields(config, compiled, has_probe: bool) -> dict:
  """Model FLOPs per image of one step: the method's formula (+ the online probe's forward pass), or XLA's
  count where the method has none; XLA's count of the per-device program beside it, and their ratio."""
  per_device = config.batch_size // jax.device_count()
  xla_flops = (compiled.cost_analysis() or {}).get("flops")
  xla_per_image = xla_flops / per_device if xla_flops else None
  analytic = model_flops.train_flops_per_image(config)
  probe = model_flops.online_probe_flops(config, config.batch_size) if has_probe else 0
  if analytic is not None and probe is not None:
    per_image, source = analytic + probe / config.batch_size, "analytic"
  else:
    per_image, source = xla_per_image, "xla"
  ratio = per_image / xla_per_image if per_image and xla_per_image else None
  return dict(model_flops_per_image=per_image, flops_source=source, xla_flops_per_image=xla_per_image,
              model_over_xla_flops=ratio,
              probe_flops_per_image=(probe / config.batch_size) if has_probe and probe is not None else None)


def dtype_name(config) -> str:
  return jnp.dtype(vit.resolve_dtype(config.model.get("dtype", "auto"))).name


def measure(config, options: Options) -> dict:
  """Compiles, warms up and times the train step of a `configured` config; returns its JSON record."""
  step = build_step(config)
  _run_steps(step, options.warmup_steps)
  seconds = _run_steps(step, options.steps)
  if options.profile_dir:
    _profile(step, options)
  median = statistics.median(seconds)
  devices = jax.device_count()
  per_device = config.batch_size // devices
  device_kind = jax.local_devices()[0].device_kind
  dtype = dtype_name(config)
  record = dict(
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      config=options.config_name, overrides=options.overrides, method=config.method.name,
      model=f"{config.model.name} {config.model.get('variant', '')}".strip(),
      model_config=config.model.to_dict(),
      image_size=config.data.image_size, batch_per_device=per_device, global_batch=config.batch_size,
      devices=devices, device_kind=device_kind, backend=jax.default_backend(), dtype=dtype,
      online_probe=step.has_probe, steps=options.steps, warmup_steps=options.warmup_steps,
      images_per_s=config.batch_size / median, step_ms=1e3 * median, step_ms_min=1e3 * min(seconds),
      step_ms_max=1e3 * max(seconds), compile_s=step.compile_s, loss=step.loss,
      **memory_fields(step.compiled), **flops_fields(config, step.compiled, step.has_probe))
  peak = model_flops.peak_flops(device_kind, dtype, options.peak_tflops)
  achieved = (record["model_flops_per_image"] or 0) * per_device / median
  record.update(model_tflops_per_s_per_device=achieved / 1e12, peak_tflops=peak / 1e12 if peak else None,
                mfu=achieved / peak if peak else None, jax=jax.__version__, flax=flax.__version__)
  return record


def is_out_of_memory(error: BaseException) -> bool:
  """Whether an error from compiling or running a step says the device ran out of memory."""
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def search_max_batch(fits: Callable[[int], bool], start: int, cap: Optional[int] = None,
                     multiple: int = 1) -> Optional[int]:
  """The largest batch (a multiple of ``multiple``, at most ``cap``) with ``fits(batch)``: doubling from
  ``start`` until one fails, then bisection between the last that fitted and the first that failed.
  Assumes that a batch fits whenever a larger one does. None when not even ``multiple`` fits."""
  if cap is not None:
    cap -= cap % multiple
  fitting, failing, batch = 0, None, max(start - start % multiple, multiple)
  while failing is None:
    if not fits(batch):
      failing = batch
    elif cap is not None and batch >= cap:
      return batch
    else:
      fitting, batch = batch, min(2 * batch, cap) if cap is not None else 2 * batch
  while failing - fitting > multiple:
    middle = (fitting + failing) // 2
    middle -= middle % multiple
    if middle <= fitting:
      break
    if fits(middle):
      fitting = middle
    else:
      failing = middle
  return fitting or None


def find_max_batch(config, dtype: Optional[str], start: int, options: Options) -> Optional[dict]:
  """The record of the largest batch per device that compiles and runs (``search_max_batch`` on out-of-memory
  errors), with every try in ``max_batch_search``; None when not even the smallest fits."""
  records, tries = {}, []

  def fits(batch_per_device: int) -> bool:
    try:
      records[batch_per_device] = measure(configured(config, batch_per_device, dtype), options)
    except Exception as error:  # pylint: disable=broad-except  (XLA raises its runtime error type)
      if not is_out_of_memory(error):
        raise
    if batch_per_device not in records:
      # Out of the except block, the error's traceback no longer holds the failed try's arrays.
      gc.collect()
      tries.append(dict(batch_per_device=batch_per_device, fits=False))
      _log(f"batch {batch_per_device} per device: out of memory")
      return False
    tries.append(dict(batch_per_device=batch_per_device, fits=True,
                      images_per_s=records[batch_per_device]["images_per_s"]))
    _log(f"batch {batch_per_device} per device: {records[batch_per_device]['images_per_s']:.1f} images/s")
    return True

  best = search_max_batch(fits, start, options.max_batch, options.batch_multiple)
  if best is None:
    return None
  return dict(records[best], max_batch_search=tries)


def _log(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def emit(record: dict, json_out: Optional[str]) -> None:
  """Prints the record as one JSON line, and appends it to ``json_out``."""
  line = json.dumps(record)
  print(line, flush=True)
  if json_out:
    with open(json_out, "a", encoding="utf-8") as f:
      f.write(line + "\n")


def run(config, options: Options, batches_per_device: Optional[list[int]] = None,
        dtypes: Optional[list[Optional[str]]] = None, max_batch_search: bool = False) -> list[dict]:
  """Measures every (batch per device, dtype) pair, or with ``max_batch_search`` the largest batch of each
  dtype (searched from the first batch); prints and returns one record each."""
  batches_per_device = batches_per_device or [max(config.batch_size // jax.device_count(), 1)]
  records = []
  for dtype in dtypes or [None]:
    if max_batch_search:
      found = find_max_batch(config, dtype, batches_per_device[0], options)
      if found is None:
        _log(f"dtype {dtype}: not even batch {options.batch_multiple} per device fits")
      candidates = [found] if found else []
    else:
      candidates = (measure(configured(config, batch, dtype), options) for batch in batches_per_device)
    for record in candidates:
      emit(record, options.json_out)
      records.append(record)
  return records


def _define_flags() -> None:
  """The command line (only when run as a script, so tests import this module without defining flags)."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Run config: configs/<file>.py[:arg]; --config.KEY=VALUE "
                                  "overrides any key (model.scan_blocks, model.remat, ...).",
                                  lock_config=True)
  flags.mark_flag_as_required("config")
  flags.DEFINE_list("batch_per_device", None, "Batches per device to measure (default: the config's batch "
                    "size over the device count); with --find_max_batch, the first to try.")
  flags.DEFINE_list("dtype", None, f"Compute dtypes to measure, of {DTYPES} (default: config.model.dtype).")
  flags.DEFINE_integer("steps", 10, "Timed steps; the step time is their median.", lower_bound=1)
  flags.DEFINE_integer("warmup_steps", 2, "Untimed steps after compilation.", lower_bound=0)
  flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s of one device for MFU (default: the bf16 table).")
  flags.DEFINE_bool("find_max_batch", False, "Find the largest batch per device that fits in memory.")
  flags.DEFINE_integer("max_batch", None, "Largest batch per device --find_max_batch tries (needed on CPU, "
                       "which does not report running out of memory).", lower_bound=1)
  flags.DEFINE_integer("batch_multiple", 1, "--find_max_batch tries multiples of this only.", lower_bound=1)
  flags.DEFINE_string("json_out", None, "Append the JSON lines to this file.")
  flags.DEFINE_string("profile_dir", None, "Also trace --profile_steps steps after the timed ones into this "
                      "directory, with the step's optimised HLO beside the trace, for summarize_trace.py.")
  flags.DEFINE_integer("profile_steps", 3, "Steps traced with --profile_dir.", lower_bound=1)


def main(argv) -> None:
  del argv
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  bad = [dtype for dtype in f.dtype or [] if dtype not in DTYPES]
  if bad:
    raise flags.ValidationError(f"--dtype={','.join(bad)}: each must be one of {DTYPES}")
  options = Options(steps=f.steps, warmup_steps=f.warmup_steps, peak_tflops=f.peak_tflops,
                    max_batch=f.max_batch, batch_multiple=f.batch_multiple, json_out=f.json_out,
                    profile_dir=f.profile_dir, profile_steps=f.profile_steps,
                    config_name=config_flags.get_config_filename(f["config"]),
                    overrides={key: _jsonable(value)
                               for key, value in config_flags.get_override_values(f["config"]).items()})
  if f.find_max_batch and jax.default_backend() == "cpu" and f.max_batch is None:
    raise flags.ValidationError("--find_max_batch on a CPU needs --max_batch (a CPU reports no "
                                "out-of-memory)")
  batches = [int(batch) for batch in f.batch_per_device] if f.batch_per_device else None
  run(f.config, options, batches, f.dtype, f.find_max_batch)


def _jsonable(value: Any) -> Any:
  return value if isinstance(value, (int, float, str, bool, type(None), list, tuple)) else repr(value)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
