"""experiments/kernel_resources.py: the Pallas kernel's Triton IR, lowered for CUDA on a CPU."""

import importlib.util
import os
import re
import subprocess
import sys

from absl.testing import absltest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "experiments"))
import kernel_resources  # noqa: E402


class TritonIrTest(absltest.TestCase):

  def test_one_kernel_nine_products_rows_as_asked(self):
    text = kernel_resources.triton_ir(16, 8, "float32", k=2, batch=1)
    self.assertEqual(len(re.findall(r"= tt\.dot ", text)), 9)  # one per tap
    # The default rows per step (32 for 16 float32 channels), then an override: the x blocks.
    self.assertIn("tensor<32x16xf32>", text)
    self.assertIn("tensor<16x16xf32>", kernel_resources.triton_ir(16, 8, "float32", rows=16,
                                                                  k=2, batch=1))

  @absltest.skipIf(importlib.util.find_spec("triton") is not None, "triton is installed")
  def test_without_triton_one_clear_line(self):
    script = os.path.join(os.path.dirname(kernel_resources.__file__), "kernel_resources.py")
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=60,
                          check=False)
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("needs the triton package (pip install triton)", proc.stderr)


if __name__ == "__main__":
  absltest.main()
