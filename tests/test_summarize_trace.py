"""experiments/summarize_trace.py: HLO instructions get the right category; a real CPU trace is summarised."""
import os
import sys

import jax
import jax.numpy as jnp
import pytest

from sslx import profiling

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import summarize_trace  # experiments/ is not a package: on the path above

# Shaped like XLA's optimised HLO text (GPU names), one instruction of each kind.
_HLO = """HloModule jit_step, is_scheduled=true

%fused_dot (p0: bf16[8,16], p1: bf16[16,4]) -> bf16[8,4] {
  %p0 = bf16[8,16]{1,0} parameter(0)
  %p1 = bf16[16,4]{1,0} parameter(1)
  ROOT %dot.1 = bf16[8,4]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%region_add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add.9 = f32[] add(%a, %b)
}

%fused_softmax (p0.1: f32[8,4]) -> f32[8] {
  %p0.1 = f32[8,4]{1,0} parameter(0)
  %exp.1 = f32[8,4]{1,0} exponential(%p0.1)
  %c = f32[] constant(0)
  ROOT %reduce.1 = f32[8]{0} reduce(%exp.1, %c), dimensions={1}, to_apply=%region_add
}

%fused_transpose (p0.2: f32[8,4]) -> f32[4,8] {
  %p0.2 = f32[8,4]{1,0} parameter(0)
  ROOT %transpose.1 = f32[4,8]{0,1} transpose(%p0.2), dimensions={1,0}
}

%fused_gelu (p0.3: f32[8,4]) -> f32[8,4] {
  %p0.3 = f32[8,4]{1,0} parameter(0)
  ROOT %tanh.1 = f32[8,4]{1,0} tanh(%p0.3)
}

ENTRY %main.1 (x: bf16[8,16], w: bf16[16,4]) -> (f32[4,8], f32[8]) {
  %x = bf16[8,16]{1,0} parameter(0)
  %w = bf16[16,4]{1,0} parameter(1)
  %gemm_fusion_dot.1 = bf16[8,4]{1,0} fusion(%x, %w), kind=kCustom, calls=%fused_dot, metadata={op_name="jit(step)/encoder/block_0/mlp/fc1/dot_general"}
  %custom-call.2 = (bf16[8,4]{1,0}, s8[64]{0}) custom-call(%x, %w), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(step)/encoder/block_0/attn/dot_product_attention"}
  %custom-call.3 = (bf16[8,4]{1,0}, s8[64]{0}) custom-call(%x, %w), custom_call_target="__cublas$gemm"
  %convert.1 = f32[8,4]{1,0} convert(%gemm_fusion_dot.1)
  %loop_fusion = f32[8,4]{1,0} fusion(%convert.1), kind=kLoop, calls=%fused_gelu, metadata={op_name="jit(step)/encoder/block_0/mlp/tanh"}
  %scale_fusion = f32[8,4]{1,0} fusion(%convert.1), kind=kLoop, calls=%fused_gelu, metadata={op_name="jit(step)/transpose(jvp(attn))/mul"}
  %input_reduce_fusion = f32[8]{0} fusion(%loop_fusion), kind=kInput, calls=%fused_softmax
  %all-reduce.1 = f32[8]{0} all-reduce(%input_reduce_fusion), replica_groups={}, to_apply=%region_add
  %transpose_fusion = f32[4,8]{0,1} fusion(%loop_fusion), kind=kLoop, calls=%fused_transpose
  %while.1 = f32[8] while(%all-reduce.1), condition=%region_add, body=%region_add
  ROOT %tuple.1 = (f32[4,8]{0,1}, f32[8]{0}) tuple(%transpose_fusion, %all-reduce.1)
}
"""


def test_hlo_instructions_are_categorised():
  hlo = summarize_trace.parse_hlo(_HLO)
  expected = {"gemm_fusion_dot.1": "matmul/conv", "custom-call.2": "attention/softmax",
              "custom-call.3": "matmul/conv", "convert.1": "elementwise/fusion",
              "loop_fusion": "elementwise/fusion", "scale_fusion": "attention/softmax",
              "input_reduce_fusion": "attention/softmax", "all-reduce.1": "collectives",
              "transpose_fusion": "copies/transposes"}
  assert {name: summarize_trace.classify(name, hlo) for name in expected} == expected
  assert hlo["gemm_fusion_dot.1"].op_name == "jit(step)/encoder/block_0/mlp/fc1/dot_general"
  assert summarize_trace.classify("cublas-gemm.7", {}) == "matmul/conv"  # from the name alone
  assert summarize_trace.classify("copy.3", {}) == "copies/transposes"


def test_busy_time_is_the_union_of_intervals():
  events = [summarize_trace.Event("a", None, start, length, True) for start, length in
            ((0, 10), (5, 10), (30, 5), (31, 1))]
  assert summarize_trace.busy_ns(events) == 20


def test_loops_count_through_their_body_and_gaps_are_host_time():
  hlo = summarize_trace.parse_hlo(_HLO)
  events = [summarize_trace.Event("while.1", "m", 0, 100e6, True),  # spans the two ops of its body
            summarize_trace.Event("gemm_fusion_dot.1", "m", 0, 30e6, True),
            summarize_trace.Event("loop_fusion", "m", 60e6, 40e6, True),
            summarize_trace.Event("MemcpyH2D", None, 40e6, 10e6, False)]
  summary = summarize_trace.summarize(events, hlo)
  assert summary["window_ms"] == 100 and summary["idle_ms"] == 20 and summary["total_ms"] == 100
  shares = {name: row["share"] for name, row in summary["categories"].items()}
  assert shares["matmul/conv"] == pytest.approx(0.3) and shares["elementwise/fusion"] == pytest.approx(0.4)
  assert shares["host/other"] == pytest.approx(0.3)  # the copy and the idle gaps
  assert [row["op"] for row in summary["ops"]] == ["loop_fusion", "gemm_fusion_dot.1"]


def test_a_cpu_trace_is_summarised(tmp_path):
  def loss(x, w):
    with jax.named_scope("attn"):
      scores = jax.nn.softmax(x @ w.T)
    return (scores @ w).sum()

  compiled = jax.jit(jax.grad(loss)).lower(jnp.ones((64, 32)), jnp.ones((64, 32))).compile()
  profiler, grads = profiling.StepProfiler((1, 2), str(tmp_path)), None
  for step in (1, 2, 3):
    profiler.step(step, grads)
    grads = compiled(jnp.ones((64, 32)), jnp.ones((64, 32)))
  profiler.close(grads)

  trace = summarize_trace.find_trace(str(tmp_path))
  events, planes = summarize_trace.load_events(trace)
  summary = summarize_trace.summarize(events, summarize_trace.parse_hlo(compiled.as_text()), module="jit_loss")
  assert planes and summarize_trace.count_steps(trace) == 2
  assert sum(row["share"] for row in summary["categories"].values()) == pytest.approx(1.0)
  assert summary["categories"]["matmul/conv"]["ms"] > 0
  assert summary["ops"] and all(row["count"] == 2 and row["module"] == "jit_loss" for row in summary["ops"])
  text = summarize_trace.format_summary(summary, top=5, steps=2)
  assert "per step over 2 steps" in text and "| matmul/conv |" in text

