"""The README's Python quickstart runs as written, in a fresh interpreter on the CPU."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

from drt_jax import datasets

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def quickstart() -> str:
  """The first ```python block after the heading "## Python quickstart"."""
  text = README.read_text()
  _, heading, rest = text.partition("## Python quickstart")
  assert heading, "README.md has no '## Python quickstart' section"
  block = re.search(r"```python\n(.*?)```", rest, re.S)
  assert block, "the Python quickstart section has no ```python block"
  return block.group(1)


def test_quickstart_is_extracted():
  code = quickstart()
  compile(code, "README.md", "exec")
  assert "train_and_evaluate" in code and "topology.make" in code and "algorithms.make" in code


@pytest.mark.skipif(datasets.embedded_dir("mnist") is None,
                    reason="embedded MNIST not installed (python -m drt_jax.install_data)")
def test_quickstart_runs(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  # A reader's interpreter: one CPU device, not the test suite's virtual host devices.
  env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                            env.get("XLA_FLAGS", "")).strip()
  proc = subprocess.run([sys.executable, "-c", quickstart()], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  last = proc.stdout.strip().splitlines()[-1].split()
  acc, gen_gap, disagreement = (float(v) for v in last)  # the quickstart's last print
  assert 0.0 <= acc <= 1.0 and -1.0 <= gen_gap <= 1.0 and disagreement >= 0.0
