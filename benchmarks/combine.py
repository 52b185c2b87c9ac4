r"""The combine alone: the sparse neighbour-list path against the dense ``[K, K]`` product, and
the bytes a sharded combine moves between devices.

* ``combine``: per K (``--ks``), one leaf of ``--params`` floats per agent on a ring, both paths
  timed (median of ``--reps`` calls after one untimed) on one device and, where the ``shard``
  back-end would spread K agents over several devices, on that mesh too (``*_mesh_ms``: where a
  sharded train step combines).
* ``combine_bytes``: for ring, torus and the full graph at K = ``--bytes_k``, agents sharded over
  the local devices, the bytes each device receives per combine, read from the compiled
  program's collectives (0 skips; needs at least two devices that split K evenly).

Each case is appended to ``<out>.jsonl`` as it finishes; the full result goes to ``--out``
(JSON) and markdown to stdout. Commands (from the repository root):

  python -m benchmarks.combine --host_devices 8                            # K = 16 ... 1,024
  python -m benchmarks.combine --host_devices 8 --ks 16,64,256,1024 --reps 7 --bytes_k 0
  python -m benchmarks.combine --smoke --host_devices 2 --out /tmp/combine.json    # CI
"""

import re
import sys

import jax
import jax.numpy as jnp
from absl import app, flags, logging

from benchmarks import common
from drt_jax import backends
from drt_jax import combine as combine_lib
from drt_jax import topology as topology_lib

BYTES_TOPOLOGIES = ("ring", "torus", "full")


def combine_case(k_count: int, params: int, topology_name: str, reps: int) -> dict:
  """The combine alone: sparse neighbour-list path vs the dense ``[K, K]`` matmul, one leaf of
  ``params`` floats per agent (median of ``reps`` timed calls after one untimed), on one device
  and, where the ``shard`` back-end would spread K agents over several devices, on that mesh
  too (``*_mesh_ms``: as a sharded train step combines)."""

  topo = topology_lib.make(topology_name, k_count)
  x = jax.random.normal(jax.random.key(0), (k_count, params), jnp.float32)
  a = jnp.asarray(topo.dense())
  out = {"K": k_count, "params_per_agent": params, "topology": topology_name,
         "edges": topo.num_edges(), "mesh_devices": backends.mesh_size(k_count)}
  placements = {"": None}
  if out["mesh_devices"] > 1:
    placements["_mesh"] = backends.split("shard", k_count)
  for suffix, sharding in placements.items():
    xs = x if sharding is None else jax.device_put(x, sharding)
    for name, fn, arg in (("sparse", combine_lib.combine, topo),
                          ("dense", combine_lib.combine_dense, a)):
      step = jax.jit(fn, out_shardings=sharding)
      out[f"{name}{suffix}_ms"] = common.median_ms(lambda step=step, arg=arg: step(xs, arg), reps)
    out[f"dense_over_sparse{suffix}"] = out[f"dense{suffix}_ms"] / out[f"sparse{suffix}_ms"]
  return out


_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "f64": 8}


def collective_bytes(hlo: str) -> dict:
  """Bytes each device receives per call, by collective, from a compiled (partitioned) HLO text.

  A collective-permute receives its result; an all-gather receives its result minus the own
  shard (counted whole here: an upper bound, exact up to a factor (n-1)/n).
  """
  out = {}
  for op in ("collective-permute", "all-gather", "all-to-all", "all-reduce"):
    total = 0
    for dtype, dims in re.findall(r"= (\w+)\[([\d,]*)\][^=]*? " + op + r"(?:-start)?\(", hlo):
      n = 1
      for d in filter(None, dims.split(",")):
        n *= int(d)
      total += n * _DTYPE_BYTES.get(dtype, 4)
    out[op] = total
  return out


def combine_bytes(k_count: int, params: int, topology_name: str) -> dict:
  """Bytes moved per device by one combine of ``params`` floats per agent, agents sharded over
  the local devices (read from the compiled program's collectives)."""

  split = backends.split("shard", k_count)
  topo = topology_lib.make(topology_name, k_count)
  x = jax.device_put(jnp.zeros((k_count, params), jnp.float32), split)
  hlo = jax.jit(combine_lib.combine, out_shardings=split).lower(x, topo).compile().as_text()
  moved = collective_bytes(hlo)
  return {"topology": topology_name, "K": k_count, "devices": backends.mesh_size(k_count),
          "params_per_agent": params, "bytes_by_collective": moved,
          "bytes_per_device": sum(moved.values()), "edges": topo.num_edges()}


def combine_table(rows: list) -> str:
  """Markdown: both paths per K, on one device and on the agents' mesh."""
  lines = ["| topology | K | edges | params/agent | sparse ms | dense ms | dense / sparse | "
           "devices | sparse ms | dense ms | dense / sparse |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    mesh = "| 1 | – | – | –"
    if "sparse_mesh_ms" in r:
      mesh = (f"| {r['mesh_devices']} | {r['sparse_mesh_ms']:.2f} | {r['dense_mesh_ms']:.2f} | "
              f"{r['dense_over_sparse_mesh']:.1f}")
    lines.append(f"| {r['topology']} | {r['K']} | {r['edges']} | {r['params_per_agent']:,} | "
                 f"{r['sparse_ms']:.2f} | {r['dense_ms']:.2f} | {r['dense_over_sparse']:.1f} "
                 f"{mesh} |")
  return "\n".join(lines)


def bytes_line(m: dict) -> str:
  """One line of :func:`combine_bytes`'s record."""
  by_op = ", ".join(f"{k} {v / 2**20:,.2f}" for k, v in m["bytes_by_collective"].items() if v)
  return (f"bytes received per device by one combine, {m['topology']}, K = {m['K']} on "
          f"{m['devices']} devices, {m['params_per_agent']:,} floats per agent: "
          f"{m['bytes_per_device'] / 2**20:,.2f} MiB ({by_op})")


def run(ks, params: int, reps: int, bytes_k: int, sink: common.Sink) -> dict:
  """Every combine case and the bytes lines, each written to ``sink`` as it finishes; returns
  ``{"combine": [...], "combine_bytes": [...], "table": markdown}``."""
  rows, moved = [], []
  for k_count in ks:
    rows.append(combine_case(k_count, params, "ring", reps))
    sink.write({"combine": rows[-1]})
  table = ""
  if rows:
    table += ("\nThe combine alone (ring), on one device and on the agents' mesh:\n\n"
              + combine_table(rows) + "\n")
  if bytes_k and backends.mesh_size(bytes_k) > 1:
    for name in BYTES_TOPOLOGIES:
      moved.append(combine_bytes(bytes_k, params, name))
      sink.write({"combine_bytes": moved[-1]})
    table += "\n" + "\n".join(bytes_line(m) for m in moved) + "\n"
  elif bytes_k:
    logging.info("no bytes lines: no two of %d local devices split K=%d evenly",
                 jax.local_device_count(), bytes_k)
  return {"combine": rows, "combine_bytes": moved, "table": table}


def define_flags() -> None:
  """The command line's flags (defined by the binary only, so importing this module is free)."""
  flags.DEFINE_list("ks", ["16", "64", "256", "1024"], "K values of the combine comparison, "
                    "sparse vs dense, on a ring ('' skips).")
  flags.DEFINE_integer("params", 50_000, "Floats per agent.")
  flags.DEFINE_integer("reps", 5, "Timed calls per combine case (median reported).")
  flags.DEFINE_integer("bytes_k", 64, "K of the bytes-moved lines (ring, torus, full; agents "
                       "sharded over the local devices; 0 skips).")
  flags.DEFINE_string("out", "combine.json", "JSON result; per-case lines go to <out>.jsonl.")
  flags.DEFINE_bool("smoke", False, "Tiny run for CI: K = 8, 16, 256 floats, 2 reps, bytes at "
                    "K = 8.")
  flags.DEFINE_integer("host_devices", 1, "If > 1, virtual CPU devices to create (the mesh).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  s = {"ks": common.ints("ks", f.ks), "params": f.params, "reps": f.reps, "bytes_k": f.bytes_k}
  if f.smoke:
    s.update(ks=[8, 16], params=256, reps=2, bytes_k=8)
  if min(s["ks"], default=1) < 1 or s["params"] < 1 or s["reps"] < 1 or s["bytes_k"] < 0:
    raise app.UsageError("--ks, --params and --reps must be >= 1 and --bytes_k >= 0")
  common.check_out(f.out)
  machine = common.start(f.host_devices)
  sink = common.Sink(f.out)
  sink.write({"machine": machine, "settings": s})
  result = run(s["ks"], s["params"], s["reps"], s["bytes_k"], sink)
  print(result["table"])
  common.write_result(f.out, {"machine": machine, "settings": s, "argv": sys.argv, **result})
  logging.info("wrote %s and %s", f.out, sink.path)


if __name__ == "__main__":
  define_flags()
  common.run(main)
