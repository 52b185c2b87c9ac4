r"""What the Pallas kernel gradient costs an SM, without a GPU: registers, spills, shared memory.

``benchmarks.conv_grad`` lowers its kernel to Triton IR wherever JAX lowers for CUDA, GPU or not.
This compiles that IR with the ``triton`` package for one GPU architecture (default sm_90, the
H100 and H200), runs ``ptxas -v`` on the PTX and reports, per ResNet-20 stage and dtype: the
registers per thread, bytes spilled, shared memory per program, and how many programs and warps
an SM can then hold. It is how ``conv_grad.LAUNCH`` was chosen; it says nothing about time.

Needs the optional ``triton`` package (``pip install triton``; it brings ``ptxas``), which the
project does not depend on. Triton's version may differ from the one inside jaxlib's GPU plugin.

  python -m benchmarks.kernel_resources                           # conv_grad.LAUNCH as it is
  python -m benchmarks.kernel_resources --sweep --out /tmp/k.jsonl    # rows x warps x stages
"""

import contextlib
import glob
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

from absl import app, flags

FLAGS = flags.FLAGS


def _define_flags():
  """Flags only when run as a script, so tests can import this next to agent_conv's."""
  flags.DEFINE_list("stages", ["16x32", "32x16", "64x8"],
                    "Stages as <channels>x<height=width>.")
  flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes.")
  flags.DEFINE_integer("k", 64, "Agents (the grid's agent axis; no effect on an SM's resources).")
  flags.DEFINE_integer("batch", 32, "Images per agent.")
  flags.DEFINE_integer("arch", 90, "Compute capability to compile for.")
  flags.DEFINE_bool("sweep", False, "Every rows x warps x stages in {16,32,64} x {1,2,4,8} x "
                    "{1,2}, not only conv_grad.LAUNCH's choice.")
  flags.DEFINE_string("out", "", "If set, JSON lines are appended here.")


_SM_REGISTERS, _SM_SHARED, _SM_WARPS, _SM_PROGRAMS = 65536, 228 * 1024, 64, 32  # sm_90
MIN_WARPS_PER_SM = 14


def rows_in_flight(row: dict) -> int:
  """Rows of X an SM has in flight: programs x rows per step x stages where Triton stages X
  asynchronously (9 or more async copies per step; otherwise X's loads wait in registers)."""
  staged = row["async_copies"] >= 9
  return row["programs_per_sm"] * row["rows"] * (row["stages"] if staged else 1)


def pick(rows: list[dict]) -> dict | None:
  """conv_grad.LAUNCH's rule over one stage's compiled settings: no spills, at least
  MIN_WARPS_PER_SM warps per SM, then the most rows in flight; ties to more warps per SM, fewer
  registers, more rows."""
  fit = [r for r in rows if "error" not in r and r["spill_bytes"] == 0
         and r["warps_per_sm"] >= MIN_WARPS_PER_SM]
  return max(fit, default=None, key=lambda r: (rows_in_flight(r), r["warps_per_sm"],
                                               -r["registers"], r["rows"]))


@contextlib.contextmanager
def _captured_triton_modules():
  """Collects the Triton IR (text) of every Pallas kernel lowered inside the block."""
  from jax._src.pallas.triton import pallas_call_registration as registration  # noqa: PLC0415

  lower, modules = registration.lowering.lower_jaxpr_to_triton_module, []

  def capture(*args, **kwargs):
    result = lower(*args, **kwargs)
    modules.append(result.module.operation.get_asm())
    return result

  registration.lowering.lower_jaxpr_to_triton_module = capture
  try:
    yield modules
  finally:
    registration.lowering.lower_jaxpr_to_triton_module = lower


def triton_ir(channels: int, size: int, dtype: str, rows: int | None = None, k: int = 64,
              batch: int = 32) -> str:
  """The Triton IR of ``conv_grad.kernel_grad`` for K agents' 3x3 SAME convolution of
  ``[batch, size, size, channels]`` images (as many output channels), lowered for CUDA here;
  ``rows`` overrides the rows per step."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from jax import export  # noqa: PLC0415

  from benchmarks import conv_grad  # noqa: PLC0415

  x = jax.ShapeDtypeStruct((k, batch, size, size, channels), jnp.dtype(dtype))
  f = jax.vmap(lambda x, dy: conv_grad.kernel_grad(x, dy, (3, 3), ((1, 1), (1, 1)),
                                                   interpret=False))
  pin = None
  if rows is not None:  # the rows only shape the IR; warps and stages are compile options
    pin = (rows, *conv_grad.launch(9, channels, jnp.dtype(dtype).itemsize)[1:])
  # Pallas reads the GPU it lowers for from the abstract mesh (newer JAX needs one without a
  # GPU present): lowered as for an H100; --arch picks ptxas's target.
  gpu = jax.sharding.AbstractDevice("NVIDIA H100 80GB HBM3", None, "gpu")
  mesh = jax.sharding.AbstractMesh((1,), ("one",), abstract_device=gpu)
  with (conv_grad.pinned_launch(pin), _captured_triton_modules() as modules,
        jax.sharding.use_abstract_mesh(mesh)):
    export.export(jax.jit(f), platforms=["cuda"], disabled_checks=[
        export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(x, x)
  if len(modules) != 1:
    raise RuntimeError(f"expected one Triton kernel, lowered {len(modules)}")
  return modules[0]


def _ptxas(ptx: str, arch: int) -> str:
  """A ptxas bundled with triton that reads this PTX's version."""
  import triton  # noqa: PLC0415

  found = sorted(glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                        "bin", "ptxas*")), reverse=True)  # '-blackwell' first
  for path in found:
    probe = subprocess.run([path, f"-arch=sm_{arch}a", "-v", ptx, "-o", os.devnull],
                           capture_output=True, text=True, check=False)
    if probe.returncode == 0:
      return probe.stderr
  raise RuntimeError(f"no ptxas in {found} compiles {ptx}")


def compile_stats(ir_text: str, warps: int, stages: int, arch: int = 90) -> dict:
  """Triton-compiles ``ir_text`` for sm_<arch> and reads ptxas's resource report."""
  import triton  # noqa: PLC0415
  from triton.backends.compiler import GPUTarget  # noqa: PLC0415

  with tempfile.TemporaryDirectory() as tmp:
    src = os.path.join(tmp, "kernel.ttir")
    with open(src, "w") as f:
      f.write(ir_text)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": warps, "num_stages": stages})
    ptx = os.path.join(tmp, "kernel.ptx")
    with open(ptx, "w") as f:
      f.write(kernel.asm["ptx"])
    report = _ptxas(ptx, arch)
  regs = int(re.search(r"Used (\d+) registers", report).group(1))
  spills = int(re.search(r"(\d+) bytes spill stores", report).group(1))
  shared = kernel.metadata.shared
  programs = min(_SM_REGISTERS // (regs * 32 * warps), _SM_SHARED // max(shared, 1),
                 _SM_WARPS // warps, _SM_PROGRAMS)
  ttgir = kernel.asm["ttgir"]
  return {"registers": regs, "spill_bytes": spills, "shared_bytes": shared,
          "programs_per_sm": programs, "warps_per_sm": programs * warps,
          "mma": "wgmma" if "versionMajor = 3" in ttgir else "mma.sync",
          "async_copies": ttgir.count("async_copy_global_to_local")}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    import triton  # noqa: PLC0415
  except ImportError:
    sys.exit("kernel_resources: needs the triton package (pip install triton); the project "
             "itself does not")
  os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
  from benchmarks import conv_grad  # noqa: PLC0415

  for stage in FLAGS.stages:
    if int(stage.split("x")[0]) not in (16, 32, 64):
      raise app.UsageError(f"--stages: {stage!r}: conv_grad takes 16, 32 or 64 input channels")
  for dtype in FLAGS.dtypes:
    if dtype not in ("float32", "bfloat16"):
      raise app.UsageError(f"--dtypes: {dtype!r}: expected float32 or bfloat16")
  print(f"triton {triton.__version__}, sm_{FLAGS.arch}")
  print("| stage (C×H) | dtype | rows | warps | stages | registers | spilled B | shared KiB | "
        "programs/SM | warps/SM | MMA | chosen |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  picks = []
  for stage, dtype in itertools.product(FLAGS.stages, FLAGS.dtypes):
    measured = []
    c, size = (int(v) for v in stage.split("x"))
    chosen = conv_grad.launch(9, c, 4 if dtype == "float32" else 2)
    configs = ([chosen] if not FLAGS.sweep else
               list(itertools.product((16, 32, 64), (1, 2, 4, 8), (1, 2))))
    for rows, warps, stages in configs:
      ir_text = triton_ir(c, size, dtype, rows, FLAGS.k, FLAGS.batch)
      try:
        row = compile_stats(ir_text, warps, stages, FLAGS.arch)
      except Exception as e:  # noqa: BLE001 - record it, go on
        row = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
      row.update(stage=stage, dtype=dtype, rows=rows, warps=warps, stages=stages,
                 chosen=(rows, warps, stages) == chosen, triton=triton.__version__,
                 arch=FLAGS.arch)
      measured.append(row)
      if FLAGS.out:
        with open(FLAGS.out, "a") as f:
          f.write(json.dumps(row) + "\n")
      if "error" in row:
        print(f"| {stage} | {dtype} | {rows} | {warps} | {stages} | {row['error']} |")
        continue
      print(f"| {stage} | {dtype} | {rows} | {warps} | {stages} | {row['registers']} | "
            f"{row['spill_bytes']} | {row['shared_bytes'] / 1024:.0f} | "
            f"{row['programs_per_sm']} | {row['warps_per_sm']} | {row['mma']} | "
            f"{'yes' if row['chosen'] else ''} |", flush=True)
    best = pick(measured) if FLAGS.sweep else None
    if best is not None:
      picks.append(f"{stage} {dtype}: ({best['rows']}, {best['warps']}, {best['stages']})")
  if picks:
    print("\nThe rule's picks (rows, warps, stages), conv_grad.LAUNCH's candidates:\n  "
          + "\n  ".join(picks))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
