r"""One per-agent 3×3 convolution, forward and backward, in several formulations, side by side.

K agents each apply their own kernel ``w[k]`` to their own images ``x[k]``. Vmapping a convolution
over such stacked kernels becomes a grouped convolution, which is what makes K small networks
slower than one network on the same arithmetic. This probe times the ways of writing that layer
against the ceiling, one convolution over all K·B images with one kernel (``single``):

* ``grouped``: ``jax.vmap`` of ``lax.conv_general_dilated`` (what the library's back-ends run).
* ``padded<P>``: the same, with input and output channels zero-padded to P (a multiple that tensor
  cores like); the result is sliced back, so it is the same function.
* ``taps``: nine shifted batched matmuls, ``einsum('kbhwc,kcd->kbhwd')`` per kernel tap.
* ``dw_patches``, ``dw_taps``, ``dw_pallas``: the lab's ``conv_formulations.matmul_grad_conv``,
  vmapped: XLA's convolution forward and for the input gradient, the kernel gradient as one matmul
  of image patches, one matmul per tap, or one Pallas kernel (:mod:`benchmarks.conv_grad`);
  ``dw_pallas@<rows>:<warps>:<stages>`` pins the kernel's launch settings (instead of
  ``conv_grad.LAUNCH``'s), to time the alternatives on a GPU.

Each cell is the median time of one value-and-gradient call (gradients with respect to images and
kernels) over ``--reps`` calls after one warm-up, at the ResNet-20 stages (16 channels at 32×32,
32 at 16×16, 64 at 8×8), and the largest difference of its gradients from ``grouped``'s,
relative to their largest magnitude (``grad_err``: a check of the formulation on the machine at
hand, Pallas's compiled kernel included). JSON lines go to ``--out`` and a markdown table to
stdout.

  python -m benchmarks.agent_conv --k 64 --batch 32 --out /tmp/agent_conv.jsonl     # one GPU
  python -m benchmarks.agent_conv --smoke                                            # seconds
"""

import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks import conv_formulations, conv_grad

FLAGS = flags.FLAGS
flags.DEFINE_integer("k", 64, "Agents K.")
flags.DEFINE_integer("batch", 32, "Images per agent.")
flags.DEFINE_list("stages", ["16x32", "32x16", "64x8"], "Stages as <channels>x<height=width>.")
flags.DEFINE_list("formulations", ["single", "grouped", "padded32", "padded64", "taps",
                                   "dw_patches", "dw_taps", "dw_pallas"],
                  "What to time (paddings narrower than a stage's channels are skipped).")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes.")
flags.DEFINE_integer("reps", 20, "Timed calls per cell (median reported).")
flags.DEFINE_string("out", "", "If set, JSON lines are appended here.")
flags.DEFINE_bool("smoke", False, "Tiny shapes, two reps (CI).")

_DIMS = ("NHWC", "HWIO", "NHWC")


def conv(x, w):
  """One agent's 3×3 convolution, stride 1, SAME padding: [B, H, W, C] × [3, 3, C, D]."""
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_DIMS)


def grouped(x, w):
  """K agents' convolutions, [K, B, H, W, C] × [K, 3, 3, C, D], by vmap (a grouped conv)."""
  return jax.vmap(conv)(x, w)


def padded(width: int):
  """``grouped`` with C and D zero-padded to ``width``; the same function."""

  def fn(x, w):
    c, d = x.shape[-1], w.shape[-1]
    x = jnp.pad(x, [(0, 0)] * 4 + [(0, width - c)])
    w = jnp.pad(w, [(0, 0)] * 3 + [(0, width - c), (0, width - d)])
    return grouped(x, w)[..., :d]

  return fn


def taps(x, w):
  """``grouped`` as nine shifted batched matmuls over the agent axis."""
  h, wd = x.shape[2], x.shape[3]
  xp = jnp.pad(x, [(0, 0), (0, 0), (1, 1), (1, 1), (0, 0)])
  out = 0
  for dy in range(3):
    for dx in range(3):
      out = out + jnp.einsum("kbhwc,kcd->kbhwd", xp[:, :, dy:dy + h, dx:dx + wd], w[:, dy, dx])
  return out


def dw(kernel_grad: str):
  """``grouped`` with the lab's kernel-gradient formulation ``kernel_grad``."""
  conv = functools.partial(conv_formulations.matmul_grad_conv, window_strides=(1, 1),
                           padding="SAME", dimension_numbers=_DIMS, kernel_grad=kernel_grad)
  return jax.vmap(conv)


def single(x, w):
  """The ceiling: ONE kernel (agent 0's) over all K·B images."""
  k, b = x.shape[:2]
  return conv(x.reshape((k * b,) + x.shape[2:]), w[0]).reshape(x.shape[:-1] + (w.shape[-1],))


def launch_pin(name: str) -> tuple[int, int, int] | None:
  """``(rows, warps, stages)`` of ``dw_pallas@<rows>:<warps>:<stages>``; None for any other."""
  if not name.startswith("dw_pallas@"):
    return None
  try:
    rows, warps, stages = (int(v) for v in name[len("dw_pallas@"):].split(":"))
  except ValueError:
    raise app.UsageError(f"--formulations: {name!r} should be "
                         "dw_pallas@<rows>:<warps>:<stages>, e.g. dw_pallas@32:2:2") from None
  return rows, warps, stages


def formulation(name: str):
  if launch_pin(name) is not None:
    return dw("pallas")
  if name.startswith("padded"):
    return padded(int(name[len("padded"):]))
  if name.startswith("dw_") and name[len("dw_"):] in conv_formulations.KERNEL_GRADS:
    return dw(name[len("dw_"):])
  try:
    return {"single": single, "grouped": grouped, "taps": taps}[name]
  except KeyError:
    raise app.UsageError(f"--formulations: unknown {name!r}; expected single, grouped, "
                         "taps, padded<P>, dw_<patches|taps|pallas> or "
                         "dw_pallas@<rows>:<warps>:<stages>") from None


def value_and_grads(fn):
  """(x, w, g) -> (<fn(x, w), g>, d/dx, d/dw), jitted: one training step's worth of the layer."""
  return jax.jit(jax.value_and_grad(lambda x, w, g: jnp.vdot(fn(x, w), g).real, argnums=(0, 1)))


def time_cell(fn, x, w, g, reps: int, want=None) -> tuple[float, float | None, tuple]:
  """Median seconds per call, the gradients' relative error against ``want`` (None without),
  and the gradients."""
  f = value_and_grads(fn)
  _, grads = jax.block_until_ready(f(x, w, g))
  err = None
  if want is not None:
    err = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                    / jnp.max(jnp.abs(b.astype(jnp.float32)))) for a, b in zip(grads, want))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(f(x, w, g))
    times.append(time.perf_counter() - start)
  return statistics.median(times), err, grads


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  for name in FLAGS.formulations:  # a misspelt one stops the run before anything is timed
    formulation(name)
  k, b, reps, stages = FLAGS.k, FLAGS.batch, FLAGS.reps, FLAGS.stages
  if FLAGS.smoke:
    k, b, reps, stages = 4, 2, 2, ["16x8"]
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"K={k}, B={b}")
  rows = []
  for dtype in FLAGS.dtypes:
    for stage in stages:
      c, h = (int(v) for v in stage.split("x"))
      keys = jax.random.split(jax.random.key(0), 3)
      x = jax.random.normal(keys[0], (k, b, h, h, c), dtype)
      w = (jax.random.normal(keys[1], (k, 3, 3, c, c)) / (3 * c ** 0.5)).astype(dtype)
      g = jax.random.normal(keys[2], (k, b, h, h, c), dtype)
      base = want = None
      for name in FLAGS.formulations:
        if name.startswith("padded") and int(name[len("padded"):]) <= c:
          continue
        try:
          # The kernel's backward pass is traced at the first call: inside the pin.
          with conv_grad.pinned_launch(launch_pin(name)):
            seconds, err, grads = time_cell(formulation(name), x, w, g, reps,
                                            None if name == "single" else want)
        except Exception as e:  # e.g. out of memory: record it, go on
          row = {"dtype": dtype, "stage": stage, "formulation": name,
                 "status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:160]}"}
        else:
          ms = 1e3 * seconds
          base = ms if name == "single" else base
          want = grads if name == "grouped" else want
          row = {"dtype": dtype, "stage": stage, "formulation": name, "status": "ok", "ms": ms,
                 "over_single": ms / base if base else None,
                 "images_per_s": k * b / (ms / 1e3), "grad_err": err}
        row.update(K=k, batch=b, device=dev.device_kind)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if FLAGS.out:
          with open(FLAGS.out, "a") as f:
            f.write(json.dumps(row) + "\n")
  print("\n| dtype | stage (C×H) | formulation | ms (fwd+bwd) | × single's time | grad err |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    ms = f"{r['ms']:.3f}" if r["status"] == "ok" else r["status"]
    ratio = f"{r['over_single']:.2f}" if r.get("over_single") else "–"
    err = f"{r['grad_err']:.1e}" if r.get("grad_err") is not None else "–"
    print(f"| {r['dtype']} | {r['stage']} | {r['formulation']} | {ms} | {ratio} | {err} |")


if __name__ == "__main__":
  app.run(main)
