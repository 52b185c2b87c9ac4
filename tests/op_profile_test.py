"""benchmarks/op_profile.py: device time is attributed to the right kind of op, and all of it."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
from absl.testing import absltest

from benchmarks import op_profile

# A hand-written optimised module: a header whose tuple result carries /*index=5*/ (which holds
# an '=' and once ended a computation early), a variadic reduce-window, a cuDNN convolution
# called from a fusion, a transposing fusion with arithmetic fused in, and a while loop.
_HLO = """HloModule jit_step, is_scheduled=true

%rw_comp (p0: f32[4,8], p1: s32[4,8]) -> (f32[4,4], s32[4,4], /*index=5*/s32[4,4]) {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = s32[4,8]{1,0} parameter(1)
  ROOT %reduce-window.1 = (f32[4,4]{1,0}, s32[4,4]{1,0}) reduce-window(%p0, %p1), window={size=1x2}
}

%fused_t (p: f32[8,4]) -> f32[4,8] {
  %p = f32[8,4]{1,0} parameter(0)
  %transpose.1 = f32[4,8]{1,0} transpose(%p), dimensions={1,0}
  ROOT %multiply.1 = f32[4,8]{1,0} multiply(%transpose.1, %transpose.1)
}

%fused_conv (a: f32[1,8,8,4], b: f32[3,3,4,4]) -> f32[1,8,8,4] {
  %a = f32[1,8,8,4]{3,2,1,0} parameter(0)
  %b = f32[3,3,4,4]{3,2,1,0} parameter(1)
  ROOT %cc = (f32[1,8,8,4], u8[0]) custom-call(%a, %b), custom_call_target="__cudnn$convForward"
}

ENTRY %main (x: f32[8,4]) -> f32[4,8] {
  %x = f32[8,4]{1,0} parameter(0)
  %t_fusion = f32[4,8] fusion(%x), kind=kLoop, calls=%fused_t, metadata={op_name="jit(f)/t"}
  %wrapped_rw = (f32[4,4]{1,0}, s32[4,4]{1,0}) fusion(%t_fusion, %x), kind=kLoop, calls=%rw_comp
  %conv_fusion = f32[1,8,8,4]{3,2,1,0} fusion(%x, %x), kind=kCustom, calls=%fused_conv
  %gemm = (f32[8,8]{1,0}, s8[0]{0}) custom-call(%x, %x), custom_call_target="__cublas$lt$matmul"
  %loop = (s32[], f32[4,8]{1,0}) while(%x), condition=%fused_t, body=%fused_t
  ROOT %add.9 = f32[4,8]{1,0} add(%t_fusion, %t_fusion)
}
"""


class HloOpsTest(absltest.TestCase):

  def test_categories_of_a_hand_written_module(self):
    ops = op_profile.hlo_ops(_HLO)
    self.assertEqual(op_profile.module_name(_HLO), "jit_step")
    got = {name: ops[name].category for name in
           ("t_fusion", "wrapped_rw", "conv_fusion", "gemm", "loop", "add.9")}
    self.assertEqual(got, {"t_fusion": "transpose/copy", "wrapped_rw": "reduce",
                           "conv_fusion": "conv", "gemm": "matmul", "loop": "control",
                           "add.9": "elementwise"})
    self.assertEqual(ops["t_fusion"].source, "jit(f)/t")
    self.assertEqual(ops["wrapped_rw"].shape, "(f32[4,4]{1,0}, s32[4,4]{1,0})")


def _event(name, ns, **stats):
  return SimpleNamespace(name=name, duration_ns=ns, stats=list(stats.items()))


def _trace(*lines, plane="/device:GPU:0"):
  host = SimpleNamespace(name="/host:CPU", lines=[SimpleNamespace(name="python", events=[
      _event("PjitFunction(step)", 9e9)])])
  return SimpleNamespace(planes=[host, SimpleNamespace(
      name=plane, lines=[SimpleNamespace(name=n, events=e) for n, e in lines])])


class SummarizeTest(absltest.TestCase):
  """The three ways a trace names an event's op, read from hand-built traces."""

  def _check(self, data, expect_busy):
    s = op_profile.summarize(data, _HLO, steps=2)
    self.assertAlmostEqual(s["busy_ms"], expect_busy)
    self.assertEqual(s["coverage"], 1.0)
    return s

  def test_xla_ops_line_named_by_the_op_and_kernels_not_counted_twice(self):
    data = _trace(("XLA Modules", [_event("jit_step(3)", 5e6)]),
                  ("XLA Ops", [_event("%t_fusion = f32[4,8] fusion(%x)", 1e6),
                               _event("conv_fusion", 3e6)]),
                  ("Stream #1(Compute)", [_event("sm90_xmma_fprop", 3e6)]))
    s = self._check(data, (1e6 + 3e6) / 1e6 / 2)
    self.assertEqual(s["by_category"]["conv"], 1.5)
    self.assertEqual(s["by_category"]["transpose/copy"], 0.5)

  def test_kernels_named_by_their_annotation(self):
    kernel = "Thunk:#hlo_op=gemm,hlo_module=jit_step,program_id=3#"
    data = _trace(("Stream #1(Compute)", [
        _event("cutlass_gemm", 2e6, annotation=kernel),
        _event("other_program", 7e6, annotation="Thunk:#hlo_op=gemm,hlo_module=jit_other#"),
        _event("memcpy", 1e6)]))
    s = self._check(data, 1.0)
    self.assertEqual(s["top"][0]["op"], "gemm")
    self.assertEqual(s["top"][0]["calls_per_step"], 0.5)

  def test_thunks_named_by_hlo_op_stats(self):
    data = _trace(("tf_XLAPjRtCpuClient", [
        _event("wrapped_rw", 4e6, hlo_op="wrapped_rw", hlo_module="jit_step"),
        _event("loop", 9e6, hlo_op="loop", hlo_module="jit_step")]), plane="/host:CPU")
    s = self._check(data, 2.0)
    self.assertEqual(s["by_category"]["reduce"], 2.0)
    self.assertEqual(s["control_ms"], 4.5)  # listed, not added to the busy time

  def test_events_of_the_module_that_name_no_op_of_it_are_listed(self):
    # Kernels run from a command buffer (a CUDA graph) are named by the graph, not by their op.
    graph = "Thunk:#hlo_op=command_buffer_3,hlo_module=jit_step#"
    data = _trace(("Stream #1(Compute)", [
        _event("cutlass_gemm", 1e6, annotation="Thunk:#hlo_op=gemm,hlo_module=jit_step#"),
        _event("loop_add_fusion", 3e6, annotation=graph)]))
    s = op_profile.summarize(data, _HLO, steps=1)
    self.assertAlmostEqual(s["coverage"], 0.25)
    self.assertEqual(s["unattributed"], [{"name": "command_buffer_3", "ms": 3.0}])
    self.assertIn("Not in the program's HLO: command_buffer_3 (3.000 ms/step)",
                  op_profile.top_table(s))
    self.assertEqual(op_profile.per_step(s, 2)["unattributed"][0]["ms"], 1.5)


class ProfileTest(absltest.TestCase):

  def test_a_traced_program_is_attributed_whole(self):
    def step(x, w, m):
      y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
      return y, w, jnp.tanh(m @ m)

    x = jnp.ones((4, 16, 16, 8))
    w = jnp.full((3, 3, 8, 8), 0.01)
    m = jnp.eye(128)
    compiled = jax.jit(step).lower(x, w, m).compile()
    _, summary = op_profile.profile(lambda s: compiled(*s), (x, w, m), compiled.as_text(), 2)
    self.assertEqual(summary["module"], op_profile.module_name(compiled.as_text()))
    self.assertGreaterEqual(summary["coverage"], 0.9)
    self.assertGreater(summary["by_category"]["conv"], 0)
    self.assertGreater(summary["by_category"]["matmul"], 0)
    self.assertAlmostEqual(summary["busy_ms"], sum(summary["by_category"].values()))
    self.assertEqual(summary["top"][0]["ms"], max(r["ms"] for r in summary["top"]))
    table = op_profile.category_table({"a": summary})
    self.assertIn("| conv |", table)
    halved = op_profile.per_step(summary, 2)
    self.assertAlmostEqual(halved["busy_ms"], summary["busy_ms"] / 2)


if __name__ == "__main__":
  absltest.main()
