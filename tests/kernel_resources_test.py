"""benchmarks/kernel_resources.py: the Pallas kernel's Triton IR, lowered for CUDA on a CPU."""

import importlib.util
import json
import os
import re
import subprocess
import sys

from absl.testing import absltest

from benchmarks import kernel_resources

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TritonIrTest(absltest.TestCase):

  def test_one_kernel_nine_products_rows_as_asked(self):
    text = kernel_resources.triton_ir(16, 8, "float32", k=2, batch=1)
    self.assertEqual(len(re.findall(r"= tt\.dot ", text)), 9)  # one per tap
    # The table's rows per step (16 for 16 float32 channels), then an override: the x blocks.
    self.assertTrue("tensor<16x16xf32>" in text and "tensor<32x16xf32>" not in text)
    pinned = kernel_resources.triton_ir(16, 8, "float32", rows=32, k=2, batch=1)
    self.assertTrue("tensor<32x16xf32>" in pinned)

  def test_launch_table_is_the_rule_applied_to_the_recorded_sweep(self):
    from benchmarks import conv_grad  # noqa: PLC0415

    path = os.path.join(_ROOT, "docs", "performance", "cpu_2026-11-27",
                        "kernel_resources_sm90.jsonl")
    with open(path) as f:
      rows = [json.loads(line) for line in f]
    for (c, itemsize), config in conv_grad.LAUNCH.items():
      stage = {16: "16x32", 32: "32x16", 64: "64x8"}[c]
      dtype = {4: "float32", 2: "bfloat16"}[itemsize]
      best = kernel_resources.pick([r for r in rows
                                    if r["stage"] == stage and r["dtype"] == dtype])
      self.assertEqual((best["rows"], best["warps"], best["stages"]), config, (stage, dtype))
    self.assertIsNone(kernel_resources.pick([dict(rows[0], spill_bytes=8)]))

  @absltest.skipIf(importlib.util.find_spec("triton") is not None, "triton is installed")
  def test_without_triton_one_clear_line(self):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.kernel_resources"], cwd=_ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("needs the triton package (pip install triton)", proc.stderr)


if __name__ == "__main__":
  absltest.main()
