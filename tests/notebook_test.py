"""The notebook runs top to bottom in smoke mode, on this interpreter's kernel, on the CPU.

``notebooks/drt_diffusion.ipynb`` is executed with nbclient in a fresh ipykernel started from
``sys.executable`` (the venv's Python, whatever Jupyter's own ``python3`` kernelspec points at),
with ``DRT_JAX_SMOKE=1`` (the first cell then forces ``SMOKE = True``) and ``JAX_PLATFORMS=cpu``.
Any cell that raises fails the test. The committed file must carry no outputs.
"""

import json
import os
import pathlib
import re
import sys

import nbclient
import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "drt_diffusion.ipynb"
CELL_TIMEOUT_S = 300


def _kernel_manager(folder: pathlib.Path) -> KernelManager:
  """A kernel manager whose ``python3`` kernel is ``sys.executable -m ipykernel_launcher``."""
  spec = folder / "kernels" / "python3"
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "Python 3 (drt_jax tests)", "language": "python"}))
  specs = KernelSpecManager(kernel_dirs=[str(folder / "kernels")])
  return KernelManager(kernel_name="python3", kernel_spec_manager=specs)


def _kernel_env() -> dict:
  """A notebook user's environment: one CPU device (no virtual host devices), smoke mode."""
  env = dict(os.environ, DRT_JAX_SMOKE="1", JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                            env.get("XLA_FLAGS", "")).strip()
  env.pop("MPLBACKEND", None)  # ipykernel's inline back-end, as in Jupyter and Colab
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ.get(
      "DRT_JAX_COMPILE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "drt_jax", "jax")))
  return env


def test_committed_notebook_has_no_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [cell for cell in nb.cells if cell.cell_type == "code"]
  assert code
  assert all(not cell.outputs and cell.execution_count is None for cell in code)
  assert "SMOKE" in code[0].source and "DRT_JAX_SMOKE" in code[0].source


def test_notebook_runs_in_smoke_mode(tmp_path):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  km = _kernel_manager(tmp_path)
  assert km.kernel_spec.argv[0] == sys.executable
  client = nbclient.NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S,
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute(env=_kernel_env())  # raises CellExecutionError naming the failing cell

  outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
  assert not [out for out in outputs if out.output_type == "error"]
  text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
  assert "SMOKE = True" in text
  assert "accelerator: CPU" in text
  images = [out for out in outputs if "image/png" in out.get("data", {})]
  assert len(images) >= 6, f"expected the notebook's figures, got {len(images)} images"
  assert (tmp_path / "drt_diffusion_figures" / "curves.png").is_file()
  bars = [out for out in outputs
          if "application/vnd.jupyter.widget-view+json" in out.get("data", {})]
  assert bars, "expected the training cells' progress bars (tqdm widgets)"
