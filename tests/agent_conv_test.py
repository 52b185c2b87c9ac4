"""benchmarks/agent_conv.py: every formulation of the per-agent convolution is one function."""

import json
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from benchmarks import agent_conv

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class AgentConvTest(parameterized.TestCase):

  @parameterized.parameters("grouped", "padded32", "taps", "dw_patches", "dw_taps", "dw_pallas")
  def test_matches_a_loop_over_agents(self, name):
    k1, k2 = jax.random.split(jax.random.key(0))
    x = jax.random.normal(k1, (3, 2, 6, 6, 5))
    w = jax.random.normal(k2, (3, 3, 3, 5, 7))
    want = np.stack([np.asarray(agent_conv.conv(x[i], w[i])) for i in range(3)])
    got = agent_conv.formulation(name)(x, w)
    self.assertEqual(got.shape, want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # And so is its gradient (what a training step runs).
    g = jnp.ones_like(got)
    ref = agent_conv.value_and_grads(agent_conv.grouped)(x, w, g)
    out = agent_conv.value_and_grads(agent_conv.formulation(name))(x, w, g)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)

  def test_single_uses_one_kernel_for_all_agents(self):
    x = jax.random.normal(jax.random.key(1), (2, 2, 4, 4, 3))
    w = jnp.stack([jnp.ones((3, 3, 3, 2)), jnp.zeros((3, 3, 3, 2))])
    out = agent_conv.single(x, w)
    np.testing.assert_allclose(out[1], agent_conv.conv(x[1], w[0]), rtol=1e-5, atol=1e-5)

  def test_pinned_launch_holds_only_inside_its_block(self):
    from benchmarks import conv_grad  # noqa: PLC0415

    self.assertEqual(agent_conv.launch_pin("dw_pallas@16:4:2"), (16, 4, 2))
    self.assertIsNone(agent_conv.launch_pin("dw_pallas"))
    with conv_grad.pinned_launch((16, 4, 2)):
      self.assertEqual(conv_grad.launch(9, 32, 4), (16, 4, 2))
    self.assertEqual(conv_grad.launch(9, 32, 4), conv_grad.LAUNCH[(32, 4)])
    with self.assertRaisesRegex(Exception, "'dw_pallas@x' should be "
                                "dw_pallas@<rows>:<warps>:<stages>"):
      agent_conv.formulation("dw_pallas@x")

  def test_unknown_formulation_is_one_line(self):
    with self.assertRaisesRegex(Exception, "unknown 'im2col'; expected single, grouped"):
      agent_conv.formulation("im2col")


class AgentConvSmokeTest(absltest.TestCase):

  def test_smoke_run_times_every_formulation(self):
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, "conv.jsonl")
      proc = subprocess.run([sys.executable, "-m", "benchmarks.agent_conv", "--smoke", "--dtypes",
                             "float32", "--out", out], cwd=_ROOT, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=False)
      self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
      with open(out) as f:
        rows = [json.loads(line) for line in f]
    self.assertEqual([r["formulation"] for r in rows],
                     ["single", "grouped", "padded32", "padded64", "taps", "dw_patches",
                      "dw_taps", "dw_pallas"])
    for r in rows:
      self.assertEqual(r["status"], "ok", r)
      self.assertGreater(r["ms"], 0)
      # Gradients checked against the grouped convolution's (16 channels: conv_grad's path).
      if r["formulation"] not in ("single", "grouped"):
        self.assertLess(r["grad_err"], 1e-5, r)
    self.assertEqual(rows[0]["over_single"], 1.0)
    self.assertIn("| float32 | 16x8 | taps |", proc.stdout)


if __name__ == "__main__":
  absltest.main()
