r"""Every algorithm's step time relative to ATC diffusion on the same back-end, in one run.

For one model, K and graph, and for each back-end, it times:

* ``step``: the library's whole compiled train step (``drt_jax.build.programs``: sampling, the
  per-agent forward and backward pass, the algorithm's step) with each algorithm;
* ``alg``: the algorithm's own step alone (``jax.jit(alg.step)`` from given gradients: local
  update, exchanges, corrections, DRT weights, compression), where what it adds to ATC shows
  without the model's cost around it.

Each time is reported as a ratio to ATC's on the same back-end in the same process (1.0 = as fast
as ATC). Algorithms take the options of :data:`OPTIONS` (CHOCO with top-k compression of 10 %,
say), so the row says what was timed. ``--topology`` must suit every algorithm timed: the default
ring (symmetric, doubly stochastic weights) does; exact diffusion refuses a directed graph, and
push-sum a graph whose senders' weights do not sum to one.

Each case is appended to ``<out>.jsonl`` as soon as it finishes; the full result goes to ``--out``
(JSON) and a markdown table to stdout.

Commands (from the repository root):

  python -m benchmarks.algorithms --host_devices 4                  # CPU: cnn, K=16, every back-end
  python -m benchmarks.algorithms --smoke --host_devices 2 --out /tmp/alg.json     # CI, < 2 min
  python -m benchmarks.algorithms --ks 16,64 --backends vmap,shard    # one GPU (shard needs >1)
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from benchmarks import common, train_step
from drt_jax import algorithms, build
from drt_jax import config as config_lib
from drt_jax import data as data_lib
from drt_jax import topology as topology_lib

# What each timed row runs: label -> (algorithm, its options). Rows whose algorithm does not take
# the options (an older library) are left out with a log line.
VARIANTS = {
    **{name: (name, {}) for name in algorithms.NAMES},
    "choco(top_k 10%)": ("choco", {"compressor": "top_k", "ratio": 0.1}),
    "choco(random_k 10%)": ("choco", {"compressor": "random_k", "ratio": 0.1}),
    "choco(quantize 4b)": ("choco", {"compressor": "quantize", "bits": 4}),
    "atc(clipped)": ("atc", {"aggregation": "clipped", "clip_radius": 1.0}),
    "atc(trimmed_mean)": ("atc", {"aggregation": "trimmed_mean", "trim": 1}),
    "atc(median)": ("atc", {"aggregation": "median"}),
}
BACKENDS = train_step.BACKENDS


def _usable(label: str) -> bool:
  name, options = VARIANTS[label]
  if name not in algorithms.NAMES or set(options) - set(algorithms.options(name)):
    logging.info("skipping %s: this library has no such algorithm or option", label)
    return False
  return True


def _config(case: train_step.Case, backend: str, label: str, opts: train_step.Options):
  name, options = VARIANTS[label]
  c = train_step.library_config(case, backend, opts.chunk_size, name, opts)
  return config_lib.resolve({**c.to_dict(), "algorithm_options": options})


def step_case(case, backend: str, label: str, opts: train_step.Options, reps: int) -> dict:
  """One variant on one back-end: the whole train step and the algorithm's step alone."""
  c = _config(case, backend, label, opts)
  model, alg = build.model(c, case.data), build.algorithm(c)
  topo = jax.device_put(build.topology(c))
  dev = train_step._device_data(case.data, case.k_count, backend)
  data_lib.check_batch(np.asarray(dev.counts), case.batch)
  state = build.init_state(c, model, alg, topo)
  p = common.compile_timed(build.programs(c, model, alg).train_step, state, topo, dev)

  def step(s):
    s, m = p.compiled(s, topo, dev)
    return s, m["loss"]

  times, loss, _ = common.time_steps(step, state, opts.warmup, opts.steps, opts.case_budget_s)
  state = build.init_state(c, model, alg, topo)
  grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), state.params)
  alg_step = jax.jit(alg.step)
  alg_ms = common.median_ms(lambda: alg_step(state.params, grads, state.alg_state, topo), reps)
  return {"variant": label, "algorithm": c.algorithm, "options": dict(VARIANTS[label][1]),
          "backend": backend, "K": case.k_count, "model": case.model_name,
          "compile_s": p.seconds, "step_ms": 1e3 * float(np.median(times)),
          "alg_ms": alg_ms, "loss": float(jnp.mean(loss)), "timed_steps": len(times)}


def run(model_name: str, k_count: int, batch: int, labels, backends, opts, sink, reps: int):
  d = data_lib.synthetic(num_train=max(1024, 4 * k_count * batch), num_test=16,
                         shape=train_step.SHAPES[model_name], seed=0)
  case = train_step.Case(model_name, None, d, k_count, batch)
  rows = []
  for backend in backends:
    for label in labels:
      logging.info("%s K=%d %s on %s", model_name, k_count, label, backend)
      row = step_case(case, backend, label, opts, reps)
      sink.write(row)
      rows.append(row)
    atc = next(r for r in rows if r["backend"] == backend and r["variant"] == "atc")
    for r in rows:
      if r["backend"] == backend:
        r["step_vs_atc"] = r["step_ms"] / atc["step_ms"]
        r["alg_vs_atc"] = r["alg_ms"] / atc["alg_ms"]
  return rows


def table(machine: dict, rows: list) -> str:
  lines = [f"Step time relative to ATC on the same back-end ({machine['platform']}, "
           f"{machine['device_kind']}, {machine['local_device_count']} device(s), "
           f"{machine['cpu_count']} CPUs, jax {machine['jax']})", "",
           "| back-end | variant | step ms | step / ATC | alg ms | alg / ATC | compile s |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['backend']} | {r['variant']} | {r['step_ms']:.2f} | "
                 f"{r['step_vs_atc']:.2f} | {r['alg_ms']:.3f} | {r['alg_vs_atc']:.2f} | "
                 f"{r['compile_s']:.1f} |")
  return "\n".join(lines)


def define_flags() -> None:
  flags.DEFINE_string("model", "cnn", "Model: cnn, mlp or resnet20.")
  flags.DEFINE_integer("k", 16, "Number of agents K.")
  flags.DEFINE_integer("batch", 32, "Images per agent per step (B).")
  flags.DEFINE_integer("steps", 10, "Timed train steps per case (after warm-up).")
  flags.DEFINE_integer("warmup", 2, "Untimed train steps per case after compilation.")
  flags.DEFINE_integer("reps", 20, "Timed calls of the algorithm's step alone.")
  flags.DEFINE_list("backends", ["vmap", "chunked", "map", "shard"], "Back-ends to time.")
  flags.DEFINE_list("variants", list(VARIANTS), "Rows to time (ATC is always timed).")
  flags.DEFINE_integer("chunk_size", 4, "Agents per group for 'chunked'.")
  flags.DEFINE_string("topology", "ring", "Communication graph (must suit every variant).")
  flags.DEFINE_float("case_budget_s", 60.0, "Stop timing a case after this many seconds.")
  flags.DEFINE_string("out", "algorithms.json", "JSON result; per-case lines go to <out>.jsonl.")
  flags.DEFINE_bool("smoke", False, "Tiny run for CI: mlp, K=4, batch 4, vmap, 2 steps.")
  flags.DEFINE_integer("host_devices", 1, "If > 1, virtual CPU devices to create (for 'shard').")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  s = {"model": f.model, "k": f.k, "batch": f.batch, "steps": f.steps, "warmup": f.warmup,
       "reps": f.reps, "backends": list(f.backends), "topology": f.topology}
  if f.smoke:
    s.update(model="mlp", k=4, batch=4, steps=2, warmup=1, reps=2, backends=["vmap"])
  if s["model"] not in train_step.SHAPES:
    raise app.UsageError(f"--model: unknown {s['model']!r}; expected one of "
                         f"{', '.join(train_step.SHAPES)}")
  bad = sorted(set(s["backends"]) - set(BACKENDS)) + sorted(set(f.variants) - set(VARIANTS))
  if bad:
    raise app.UsageError(f"unknown back-end or variant {bad[0]!r}; back-ends: "
                         f"{', '.join(BACKENDS)}; variants: {', '.join(VARIANTS)}")
  if s["topology"] not in topology_lib.KINDS:
    raise app.UsageError(f"--topology: unknown {s['topology']!r}; expected one of "
                         f"{', '.join(topology_lib.KINDS)}")
  common.check_out(f.out)
  machine = common.start(f.host_devices)
  if "shard" in s["backends"] and jax.device_count() < 2:
    s["backends"].remove("shard")
    logging.info("one device: the shard back-end is not timed")
  labels = ["atc", *(v for v in f.variants if v != "atc" and _usable(v))]
  opts = train_step.Options(topology=s["topology"], chunk_size=f.chunk_size, warmup=s["warmup"],
                            steps=s["steps"], case_budget_s=f.case_budget_s)
  sink = common.Sink(f.out)
  sink.write({"machine": machine, "settings": s})
  rows = run(s["model"], s["k"], s["batch"], labels, s["backends"], opts, sink, s["reps"])
  text = table(machine, rows)
  print(text)
  common.write_result(f.out, {"machine": machine, "settings": s, "argv": sys.argv,
                              "rows": rows, "table": text})
  logging.info("wrote %s and %s", f.out, sink.path)


if __name__ == "__main__":
  define_flags()
  common.run(main)
