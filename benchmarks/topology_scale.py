r"""Graphs at scale: how long ``topology.make`` takes for K = 100,000 agents, and one compiled
combine step over the result.

Per kind (``--kinds``): ``make`` (median of ``--reps`` builds), ``slem()`` (circulant graphs
exactly from the DFT, others NaN at this size), and ``jax.jit(combine.combine)`` on a ``[K,
--width]`` float32 leaf: the first call (compile and run) and the median of ``--reps`` later calls.
One line per kind, with the machine. Commands (from the repository root):

  python -m benchmarks.topology_scale                       # K = 100,000: ring, torus, ...
  python -m benchmarks.topology_scale --k 20000 --kinds ring,erdos_renyi --reps 1
"""

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from drt_jax import combine, topology

DEFAULT_KINDS = ("ring", "torus", "exponential", "erdos_renyi")


def machine() -> str:
  """Processor, CPU count, jax version and back-end, as one short string."""
  processor = platform.processor() or platform.machine()
  return (f"{processor}, {os.cpu_count()} CPUs, jax {jax.__version__}, "
          f"{jax.default_backend()}")


def _seconds(fn, reps: int) -> tuple[float, object]:
  """Median wall-clock seconds of ``reps`` calls of ``fn`` and its last result."""
  times, out = [], None
  for _ in range(reps):
    start = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), out


def measure(kind: str, k_count: int, width: int, reps: int) -> dict:
  """Build, SLEM and combine timings of one kind of graph of ``k_count`` agents."""
  make_s, topo = _seconds(lambda: topology.make(kind, k_count), reps)
  slem_s, slem = _seconds(topo.slem, 1)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((k_count, width)), jnp.float32)
  topo_dev = jax.device_put(topo)  # the lists on the device once, as a train step holds them
  step = jax.jit(combine.combine)
  first_s, _ = _seconds(lambda: step(x, topo_dev).block_until_ready(), 1)
  step_s, _ = _seconds(lambda: step(x, topo_dev).block_until_ready(), reps)
  return {"kind": kind, "K": k_count, "max_degree": topo.max_degree, "make_s": make_s,
          "slem": slem, "slem_s": slem_s, "combine_first_s": first_s, "combine_step_s": step_s}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--k", type=int, default=100_000, help="number of agents K")
  parser.add_argument("--kinds", default=",".join(DEFAULT_KINDS),
                      help=f"comma-separated graphs, of {', '.join(topology.KINDS)}")
  parser.add_argument("--width", type=int, default=8, help="floats per agent in the leaf")
  parser.add_argument("--reps", type=int, default=3, help="timed repetitions (median)")
  args = parser.parse_args(argv)
  where = machine()
  for kind in args.kinds.split(","):
    r = measure(kind.strip(), args.k, args.width, args.reps)
    print(f"{r['kind']:<12} K={r['K']} D={r['max_degree'] + 1:<3} make {r['make_s']:7.3f} s | "
          f"slem {r['slem']:.6f} in {r['slem_s']:.3f} s | combine [K, {args.width}] f32: "
          f"first call {r['combine_first_s']:.3f} s, step {r['combine_step_s'] * 1e3:8.3f} ms "
          f"| {where}", flush=True)


if __name__ == "__main__":
  main()
