r"""Top ops and time per op category of a `jax.profiler` trace (an ``*.xplane.pb``).

Reads the XSpace file with jaxlib's own reader (`jax.profiler.ProfileData`), so it needs neither TensorFlow
nor TensorBoard's profile plugin. XLA's ops are the events that name an HLO instruction: those of the
accelerator planes (``/device:*``: a plane's ``XLA Ops`` line, else its kernels' ``hlo_op``), or on a
CPU-only trace those of the host's XLA threads. Each op gets a category:

  matmul/conv         dot, convolution, or a fusion holding one; cuBLAS / cuDNN GEMM and conv calls
  attention/softmax   fused attention calls (cuDNN fmha, flash attention); ops other than matmuls whose
                      JAX name lies in an attention scope (``.../attn/...``: softmax, scaling, masking) or
                      says softmax; fusions of an exponential and a reduce (a log-softmax loss too)
  collectives         all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute
  copies/transposes   copy, transpose and fusions of data movement only (slices, pads, concatenates)
  elementwise/fusion  every other op
  host/other          device time in no op (memory copies between host and device), and the device's
                      idle time between the first and the last op: dispatch and host work the device
                      waited for

Categories come from the optimised HLO when it is known: ``--hlo``, or a ``*.hlo.txt`` beside the trace
file (``bench_throughput.py --profile_dir`` writes ``train_step.hlo.txt`` there;
``XLA_FLAGS=--xla_dump_to=DIR`` dumps any program's as ``*after_optimizations.txt``), and from the op's name
otherwise. Shares are of the summed time of every category; ops that overlap (CPU threads, GPU streams)
each count in full.

  python experiments/summarize_trace.py /tmp/profile                # newest trace under the directory
  python experiments/summarize_trace.py runs/x/tensorboard --top=30 --module=train_step
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
import re
from typing import Iterable, Optional

from absl import app
from absl import flags
import jax

_PATH = flags.DEFINE_string("path", None, "An *.xplane.pb, or a directory holding one (the newest is read); "
                            "also the first positional argument.")
_HLO = flags.DEFINE_string("hlo", None, "Optimised HLO text of the traced program (default: a *.hlo.txt "
                           "beside the trace file).")
_TOP = flags.DEFINE_integer("top", 15, "Ops to list.", lower_bound=1)
_MODULE = flags.DEFINE_string("module", None,
                               "Only ops of HLO modules whose name holds this (e.g. train_step).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Append the summary as one JSON line to this file.")

CATEGORIES = ("matmul/conv", "attention/softmax", "collectives", "copies/transposes", "elementwise/fusion",
              "host/other")
_COLLECTIVES = {"all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
                "all-reduce-start", "all-gather-start", "collective-permute-start", "ragged-all-to-all"}
_MOVES = {"copy", "transpose", "copy-start", "copy-done", "bitcast", "reshape", "slice", "dynamic-slice",
          "dynamic-update-slice", "concatenate", "pad", "broadcast", "gather", "reverse", "parameter",
          "constant", "get-tuple-element", "tuple"}
# The JAX-level scopes of attention (sslx's and Flax's modules, jax.nn.dot_product_attention): what is not a
# matmul in them is the softmax and its scaling and masking.
_ATTENTION_SCOPE = re.compile(r"(^|[/(])(attn|attention|self_attention|dot_product_attention)([/)]|$)|softmax")
_CONTAINERS = {"while", "conditional", "call", "async-start", "async-done"}
# Lines of a device plane that repeat the ops or group them (modules, steps), not time of their own.
_DERIVED_LINES = ("XLA Modules", "Steps", "XLA TraceMe", "Framework Ops", "Framework Name Scope",
                  "Source code", "TensorFlow Name Scope", "TensorFlow Ops")


@dataclasses.dataclass(frozen=True)
class Event:
  name: str             # the HLO instruction, or what the device did outside any op ('MemcpyH2D')
  module: Optional[str]
  start_ns: float
  duration_ns: float
  is_op: bool


@dataclasses.dataclass(frozen=True)
class HloOp:
  opcode: str
  inner: frozenset      # opcodes inside a fusion (its called computations, recursively)
  target: str           # a custom call's target
  op_name: str          # the JAX-level name (metadata op_name)


# ---------------------------------------------------------------------------------------------------------
# Reading the trace.

def find_trace(path: str) -> str:
  """``path`` itself, or the newest ``*.xplane.pb`` under the directory ``path``."""
  if os.path.isfile(path):
    return path
  found = glob.glob(os.path.join(path, "**", "*.xplane.pb"), recursive=True)
  if not found:
    raise FileNotFoundError(f"no *.xplane.pb under {path}")
  return max(found, key=os.path.getmtime)


def _device_events(plane) -> list[Event]:
  lines = list(plane.lines)
  ops_line = next((line for line in lines if line.name == "XLA Ops"), None)
  events = []
  for line in lines:
    if line.name in _DERIVED_LINES:
      continue
    for event in line.events:
      stats = dict(event.stats)
      if ops_line is not None:
        is_op = line is ops_line
        if not is_op and "hlo_op" in stats:
          continue  # the kernels of an op the 'XLA Ops' line already holds
      else:
        is_op = "hlo_op" in stats
      name = stats.get("hlo_op", event.name) if not ops_line else event.name
      events.append(Event(str(name), stats.get("hlo_module"), event.start_ns, event.duration_ns, is_op))
  return events


def _host_op_events(plane) -> list[Event]:
  """A CPU backend's ops: the events of the host's XLA threads that name an HLO instruction."""
  events = []
  for line in plane.lines:
    for event in line.events:
      stats = dict(event.stats)
      if "hlo_op" in stats:
        events.append(Event(str(stats["hlo_op"]), stats.get("hlo_module"), event.start_ns, event.duration_ns,
                            True))
  return events


def load_events(path: str) -> tuple[list[Event], str]:
  """The device's events of a trace, and which planes they came from."""
  data = jax.profiler.ProfileData.from_file(path)
  planes = list(data.planes)
  devices = [plane for plane in planes if plane.name.startswith("/device:")]
  events = [event for plane in devices for event in _device_events(plane)]
  if any(event.is_op for event in events):
    return events, ", ".join(plane.name for plane in devices)
  hosts = [plane for plane in planes if plane.name.startswith("/host:") and plane.name != "/host:metadata"]
  return [event for plane in hosts for event in _host_op_events(plane)], ", ".join(p.name for p in hosts)


def count_steps(path: str) -> int:
  """Distinct ``step_num`` of the trace's step markers (`jax.profiler.StepTraceAnnotation`); 0 if none."""
  steps = set()
  for plane in jax.profiler.ProfileData.from_file(path).planes:
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        if "step_num" in stats and "hlo_op" not in stats:
          steps.add(stats["step_num"])
  return len(steps)


# ---------------------------------------------------------------------------------------------------------
# The optimised HLO: what each instruction is.

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([^\s(]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?([^\s=]+) = (.*)$")
_OPCODE = re.compile(r"(?:^|[\s)}\]])([a-z][a-z0-9\-]*)\(")


def parse_hlo(text: str) -> dict[str, HloOp]:
  """Instruction name -> `HloOp`, over every computation of an HLO module's text."""
  raw = {}
  opcodes, callees = collections.defaultdict(set), collections.defaultdict(set)
  computation = None
  for line in text.splitlines():
    header = _COMPUTATION.match(line)
    if header and not line.startswith(" "):
      computation = header.group(1)
      continue
    instruction = _INSTRUCTION.match(line)
    opcode = _OPCODE.search(instruction.group(2)) if instruction and computation else None
    if not opcode:
      continue
    rest = instruction.group(2)
    calls = re.findall(r"(?:calls|to_apply|body|condition)=%?([^\s,}]+)", rest)
    target = re.search(r'custom_call_target="([^"]*)"', rest)
    op_name = re.search(r'op_name="([^"]*)"', rest)
    raw[instruction.group(1)] = (opcode.group(1), calls, target.group(1) if target else "",
                                 op_name.group(1) if op_name else "")
    opcodes[computation].add(opcode.group(1))
    callees[computation].update(calls)
  return {name: HloOp(opcode, frozenset(_inner_opcodes(calls, opcodes, callees)), target, op_name)
          for name, (opcode, calls, target, op_name) in raw.items()}


def _inner_opcodes(calls: list[str], opcodes: dict, callees: dict) -> set:
  """Opcodes of the called computations, following the calls inside them (nested fusions, reductions)."""
  seen, todo, inner = set(), list(calls), set()
  while todo:
    computation = todo.pop()
    if computation in seen:
      continue
    seen.add(computation)
    inner |= opcodes.get(computation, set())
    todo.extend(callees.get(computation, ()))
  return inner


def _classify_hlo(op: HloOp) -> str:
  ops = {op.opcode} | op.inner
  target = op.target.lower()
  if op.opcode == "custom-call" and any(key in target for key in ("fmha", "flash", "attention")):
    return "attention/softmax"
  if ops & {"dot", "convolution"} or (op.opcode == "custom-call" and any(
      key in target for key in ("gemm", "matmul", "conv", "cublas", "dot"))):
    return "matmul/conv"
  if "exponential" in ops and "reduce" in ops or _ATTENTION_SCOPE.search(op.op_name):
    return "attention/softmax"
  if ops & _COLLECTIVES:
    return "collectives"
  if ops <= _MOVES | {"fusion"}:
    return "copies/transposes"
  return "elementwise/fusion"


_NAME_RULES = (
    ("attention/softmax", r"fmha|flash|attention|softmax"),
    ("matmul/conv", r"dot|conv|gemm|matmul|cublas|ynn_fusion|xnn_fusion"),
    ("collectives", r"all-reduce|all-gather|reduce-scatter|all-to-all|collective"),
    ("copies/transposes", r"^(copy|transpose|bitcast)|memcpy"),
)


def classify(name: str, hlo: dict[str, HloOp]) -> str:
  """The category of the op ``name``: from its HLO instruction where known, else from the name."""
  if name in hlo:
    return _classify_hlo(hlo[name])
  return next((category for category, pattern in _NAME_RULES if re.search(pattern, name, re.IGNORECASE)),
              "elementwise/fusion")


def _is_container(name: str, hlo: dict[str, HloOp]) -> bool:
  if name in hlo:
    return hlo[name].opcode in _CONTAINERS
  return re.match(r"(while|conditional|call)(\.|$)", name) is not None


# ---------------------------------------------------------------------------------------------------------
# The summary.

def busy_ns(events: Iterable[Event]) -> float:
  """Length of the union of the events' intervals."""
  total, end = 0.0, None
  for event in sorted(events, key=lambda e: e.start_ns):
    stop = event.start_ns + event.duration_ns
    if end is None or event.start_ns > end:
      total += event.duration_ns
      end = stop
    elif stop > end:
      total += stop - end
      end = stop
  return total


def summarize(events: list[Event], hlo: dict[str, HloOp], module: Optional[str] = None) -> dict:
  """Per-op and per-category totals (ms), the device window and its idle share."""
  # A loop's or a call's event spans the ops of its body, which have events of their own.
  events = [event for event in events if not (event.is_op and _is_container(event.name, hlo))]
  if module:
    events = [event for event in events if not event.is_op or module in (event.module or "")]
  if not any(event.is_op for event in events):
    raise ValueError("the trace holds no XLA op" + (f" of a module named like {module!r}" if module else ""))
  ops = collections.defaultdict(lambda: [0.0, 0])
  categories = dict.fromkeys(CATEGORIES, 0.0)
  for event in events:
    category = classify(event.name, hlo) if event.is_op else "host/other"
    categories[category] += event.duration_ns
    if event.is_op:
      ops[(event.module, event.name)][0] += event.duration_ns
      ops[(event.module, event.name)][1] += 1
  window = max(e.start_ns + e.duration_ns for e in events) - min(e.start_ns for e in events)
  idle = max(window - busy_ns(events), 0.0)
  categories["host/other"] += idle
  total = sum(categories.values())
  top = sorted(ops.items(), key=lambda item: -item[1][0])
  return dict(
      window_ms=window / 1e6, idle_ms=idle / 1e6, total_ms=total / 1e6,
      categories={name: dict(ms=ns / 1e6, share=ns / total) for name, ns in categories.items()},
      ops=[dict(op=name, module=mod, ms=ns / 1e6, share=ns / total, count=count,
                category=classify(name, hlo), op_name=hlo[name].op_name if name in hlo else "")
           for (mod, name), (ns, count) in top])


def format_summary(summary: dict, top: int, steps: int) -> str:
  per_step = f" ({summary['window_ms'] / steps:.2f} ms per step over {steps} steps)" if steps else ""
  lines = [f"device window {summary['window_ms']:.2f} ms{per_step}, idle {summary['idle_ms']:.2f} ms "
           f"({100 * summary['idle_ms'] / summary['window_ms']:.1f}%)", "",
           "| category | ms | share |", "| --- | --- | --- |"]
  lines += [f"| {name} | {row['ms']:.2f} | {100 * row['share']:.1f}% |"
            for name, row in summary["categories"].items()]
  lines += ["", f"top {top} ops by total time", "| op | category | count | ms | share | JAX op |",
            "| --- | --- | --- | --- | --- | --- |"]
  lines += [f"| {row['op']} | {row['category']} | {row['count']} | {row['ms']:.2f} | "
            f"{100 * row['share']:.1f}% | {_short(row['op_name'])} |" for row in summary["ops"][:top]]
  return "\n".join(lines)


def _short(op_name: str, width: int = 70) -> str:
  """The end of a JAX op name (the innermost scopes say most)."""
  return op_name if len(op_name) <= width else "..." + op_name[-(width - 3):]


def _default_hlo(trace: str) -> Optional[str]:
  """The ``*.hlo.txt`` beside the trace file (where ``bench_throughput.py --profile_dir`` writes it)."""
  found = sorted(glob.glob(os.path.join(os.path.dirname(trace), "*.hlo.txt")))
  return found[0] if found else None


def main(argv) -> None:
  path = _PATH.value or (argv[1] if len(argv) > 1 else None)
  if path is None:
    raise app.UsageError("name a trace: summarize_trace.py PATH (an *.xplane.pb or a directory holding one)")
  trace = find_trace(path)
  hlo_path = _HLO.value or _default_hlo(trace)
  hlo = {}
  if hlo_path:
    with open(hlo_path, encoding="utf-8") as f:
      hlo = parse_hlo(f.read())
  events, planes = load_events(trace)
  steps = count_steps(trace)
  summary = summarize(events, hlo, _MODULE.value)
  print(f"trace {trace}\nops from {planes}; categories from {hlo_path or 'op names'}\n")
  print(format_summary(summary, _TOP.value, steps))
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "a", encoding="utf-8") as f:
      f.write(json.dumps(dict(trace=trace, hlo=hlo_path, steps=steps, **summary)) + "\n")


if __name__ == "__main__":
  app.run(main)
