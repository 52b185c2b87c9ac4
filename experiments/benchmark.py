r"""Training throughput of K agents, per back-end, against one model and a Python loop, in one run.

For every model and K it times, on the same machine and in the same process:

* ``single``: the ceiling. ONE model (same network) on the total batch K*B, plain ``optax.sgd``,
  jitted with the state donated. Every other row is reported as a ratio to it (1.0 = as fast per
  image as one model doing the same arithmetic).
* ``loop``: how most research code simulates agents: a Python loop of K calls of a jitted
  single-agent SGD step (each agent its own params, batch B), then one jitted neighbour average
  over the K param trees (the library's sparse ``combine``, same topology). One "step" is the whole
  round.
* ``vmap``, ``chunked(C)``, ``map``, ``shard(N)``: the library's real compiled train step
  (``drt_jax.train.build_programs``) with ``--algorithm`` (ATC by default), per back-end of
  :mod:`drt_jax.backends`; ``shard(N)`` on the N devices that split K evenly, when N >= 2.
  With ``--conv auto`` each row uses the formulation the library would pick for it (the
  ``conv`` column): the single and loop rows are one agent (XLA's convolution), the back-ends
  may use taps (:func:`drt_jax.backends.best_conv`).
* ``<compare>:<best>``: the ``--compare`` algorithm (DRT by default) on the fastest back-end of
  that model/K; the summary gives its step time over the ``--algorithm`` one (drt/atc).

How: synthetic uint8 images shaped for the model, already on device; each step samples its batch
inside the compiled program (as training does). Compile time is ``lower(...).compile()`` wall time
(the persistent compilation cache is switched off); the compiled program then runs ``--warmup``
steps and ``--steps`` timed steps, each fed the state the previous one returned (it is donated) and
ended by ``block_until_ready``. Step time is the median over timed steps; images/s is
K*B*steps / (sum of timed step times). A case stops early once its timed steps exceed
``--case_budget_s`` (at least 2 timed steps); ``--prune_below R`` drops, at larger K, a back-end
that ran below R times the single model at a smaller K (lax.map-based back-ends on a CPU).
``peak_mb`` is the device's peak bytes in use after the case (a process-wide high-water mark; null
where ``memory_stats()`` is unsupported, as on CPU);
``xla_mb`` is XLA's estimate for the compiled program (arguments + outputs - aliased + temporaries).

``--profile_steps N`` runs N more steps of every row but the loop under ``jax.profiler`` and
adds the device time per step by kind of XLA op (convolutions, matmuls, reductions, transposes and
copies, ...; :mod:`op_profile`) to the row, with a table per model and K comparing the variants:
where a vmapped step loses against the single model.

Each case is appended to ``<out>.jsonl`` as soon as it finishes (a killed run keeps what it
measured); the full result goes to ``--out`` (JSON) and a markdown table to stdout.

Commands (from the repository root):

  python experiments/benchmark.py --host_devices 8                       # CPU: cnn, K=4,16,64
  python experiments/benchmark.py --host_devices 8 --models resnet20 --ks 4,16 --steps 5 \
      --warmup 1 --case_budget_s 15 --prune_below 0.1    # ~5 min on 2 cores
  python experiments/benchmark.py --smoke --host_devices 2 --out /tmp/smoke.json   # CI, < 60 s
  python experiments/benchmark.py --models resnet20 --ks 16,64,256       # one GPU

``--host_devices N`` makes N virtual CPU devices (``XLA_FLAGS``), so ``shard`` runs on a CPU; it
must take effect before JAX starts its backends, which ``main`` checks.
"""

import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from typing import Any, NamedTuple

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["cnn"], "Models to measure: cnn, mlp, resnet20.")
flags.DEFINE_list("ks", ["4", "16", "64"], "Numbers of agents K.")
flags.DEFINE_integer("batch", 32, "Images per agent per step (B).")
flags.DEFINE_integer("steps", 10, "Timed steps per case (after warm-up).")
flags.DEFINE_integer("warmup", 2, "Untimed steps per case after compilation.")
flags.DEFINE_list("baselines", ["single", "loop"], "Reference rows to time: 'single' (the "
                  "ceiling; ratios are to it) and 'loop' (K jitted single-agent steps).")
flags.DEFINE_list("backends", ["vmap", "chunked", "map", "shard"], "Library back-ends to time.")
flags.DEFINE_integer("chunk_size", 4, "Agents per group for 'chunked' (min(chunk_size, K)).")
flags.DEFINE_string("algorithm", "atc", "Algorithm of the back-end rows.")
flags.DEFINE_string("compare", "drt", "Algorithm timed on the best back-end against "
                    "--algorithm ('' to skip).")
flags.DEFINE_string("topology", "ring", "Communication graph (library rows and loop combine).")
flags.DEFINE_float("learning_rate", 0.05, "SGD step size (all variants).")
flags.DEFINE_float("case_budget_s", 120.0, "Stop timing a case after this many seconds of timed "
                   "steps (0 = always --steps).")
flags.DEFINE_float("prune_below", 0.0, "Skip a back-end at larger K once it ran below this ratio "
                   "to the single model at a smaller K of the same model (0 = never).")
flags.DEFINE_string("out", "benchmark.json", "JSON result; per-case lines go to <out>.jsonl.")
flags.DEFINE_bool("smoke", False, "Tiny run for CI: mlp, K=2,4, batch 4, 2 steps.")
flags.DEFINE_string("data_memory", "mnist", "Dataset whose device footprint for "
                    "--data_memory_k agents is reported ('' skips; 'synthetic' in --smoke).")
flags.DEFINE_integer("data_memory_k", 64, "K for the data-memory line.")
flags.DEFINE_enum("precision", "float32", ["float32", "bfloat16"], "Compute dtype of every "
                  "variant (parameters and the combination stay float32).")
flags.DEFINE_list("combine_ks", ["16", "64", "256", "1024"], "K values of the combine-alone "
                  "comparison, sparse vs dense, on a ring ('' skips).")
flags.DEFINE_integer("combine_params", 50_000, "Floats per agent in the combine comparison.")
flags.DEFINE_integer("combine_reps", 5, "Timed calls per combine case (median reported).")
flags.DEFINE_integer("bytes_k", 64, "K of the bytes-moved lines (ring, torus, full; agents "
                     "sharded over the local devices; 0 skips).")
# drt_jax.models.CONVS and 'auto', listed here: the flags are defined before JAX is imported
_CONVS = ["auto", "xla", "taps", "xla_dw_matmul", "xla_dw_taps", "xla_dw_pallas"]
flags.DEFINE_string("profile_dir", "", "With --profile_steps, keep each profiled case's trace "
                    "and HLO text in a numbered folder here (else they are deleted).")
flags.DEFINE_enum("conv", "auto", _CONVS, "Convolution formulation of the conv models "
                  "(drt_jax.models.CONVS; 'auto': backends.best_conv).")
flags.DEFINE_enum("baseline_conv", None, _CONVS, "Convolution formulation of the single and "
                  "loop rows, if not --conv's (e.g. 'xla', the fastest for one model).")
flags.DEFINE_integer("scan_steps", 0, "If > 1, also time the best back-end with this many "
                     "steps fused into one dispatch by lax.scan (row 'scanN:<best>').")
flags.DEFINE_integer("profile_steps", 0, "If > 0, trace this many more steps of the single model "
                     "and of each back-end and report device time per kind of XLA op "
                     "(experiments/op_profile.py).")
flags.DEFINE_integer("host_devices", 1, "If > 1, virtual CPU devices to create (for 'shard').")

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
_MIN_TIMED_STEPS = 2
_BACKENDS = ("vmap", "chunked", "map", "shard")  # backends.BACKENDS without 'auto'
_SHAPES = {"cnn": (28, 28, 1), "mlp": (28, 28, 1), "resnet20": (32, 32, 3)}


def _set_host_devices(n: int) -> None:
  """Asks XLA for n CPU devices; only works before JAX initialises its backends."""
  flags_now = re.sub(_DEVICE_COUNT_FLAG + r"=\S+", "", os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = f"{flags_now.strip()} {_DEVICE_COUNT_FLAG}={n}".strip()


# JAX and drt_jax read XLA_FLAGS only when the first backend starts (on first use, not on
# import), so importing them here is fine as long as nothing below touches a device at import.
import common  # noqa: E402  (experiments/common.py)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import op_profile  # noqa: E402  (experiments/, the script's own folder)
import optax  # noqa: E402

from drt_jax import (  # noqa: E402
  algorithms,
  backends,
  models,
  train,
)
from drt_jax import combine as combine_lib  # noqa: E402
from drt_jax import config as config_lib  # noqa: E402
from drt_jax import data as data_lib  # noqa: E402
from drt_jax import topology as topology_lib  # noqa: E402


class Measured(NamedTuple):
  compile_s: float
  step_s: list  # seconds per timed step
  xla_bytes: int | None
  loss: float | None  # mean loss of the last step (a sanity check, not a result)
  profile: dict | None = None  # op_profile.summarize of --profile_steps more steps


# --------------------------------------------------------------------------------------------
# Timing.


def _xla_bytes(compiled) -> int | None:
  try:
    m = compiled.memory_analysis()
  except Exception:  # not every platform implements it
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes)


def _peak_mb() -> float | None:
  stats = jax.local_devices()[0].memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return stats["peak_bytes_in_use"] / 2**20


def _run(step, state, warmup: int, steps: int, budget_s: float, program=None):
  """Runs ``state, loss = step(state)`` warmup + timed times; returns (step seconds, loss, profile).

  ``program`` is ``(lowered, compiled, bind)`` with ``step = bind(compiled)``. With
  ``--profile_steps`` that many more steps run under the profiler (see :func:`_traced_program`)
  and ``profile`` is their per-op summary (else None).
  """
  loss = None
  for _ in range(warmup):
    state, loss = jax.block_until_ready(step(state))
  times = []
  while len(times) < steps:
    start = time.perf_counter()
    state, loss = jax.block_until_ready(step(state))
    times.append(time.perf_counter() - start)
    if budget_s and sum(times) > budget_s and len(times) >= _MIN_TIMED_STEPS:
      break
  loss, summary = float(jnp.mean(loss)), None
  if FLAGS.profile_steps > 0 and program is not None:
    keep_dir = None
    if FLAGS.profile_dir:  # numbered in the order the cases run (and are logged)
      os.makedirs(FLAGS.profile_dir, exist_ok=True)
      keep_dir = os.path.join(FLAGS.profile_dir, f"{len(os.listdir(FLAGS.profile_dir)):02d}")
      logging.info("  keeping its trace in %s", keep_dir)
    try:  # a profiler that fails (no CUPTI, say) must not cost the case its timings
      lowered, compiled, bind = program
      traced, note = _traced_program(lowered, compiled)
      _, summary = op_profile.profile(lambda sl: bind(traced)(sl[0]), (state, None),
                                      traced.as_text(), FLAGS.profile_steps, keep_dir)
      summary["program"] = note
    except Exception as e:
      logging.exception("profiling failed")
      summary = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
  return times, loss, summary


def _traced_program(lowered, compiled):
  """The program to trace, and a note on it: on a GPU the same program compiled without XLA's
  command buffers. Kernels launched from a command buffer (a CUDA graph) reach the trace under
  the graph's name (``command_buffer_N``), not their HLO op's, and may run concurrently; without
  them the kernels are the same and each is named by its op."""
  if jax.default_backend() != "gpu":
    return compiled, "as timed"
  try:
    return (lowered.compile(compiler_options={"xla_gpu_enable_command_buffer": ""}),
            "as timed, but without command buffers")
  except Exception as e:  # an XLA without the option: trace the timed program
    logging.warning("recompiling without command buffers failed (%s); tracing as timed", e)
    return compiled, "as timed (command buffers could not be turned off)"


class _Compiled(NamedTuple):
  lowered: Any
  compiled: Any
  seconds: float  # compile time
  xla_bytes: int | None  # XLA's memory estimate (:func:`_xla_bytes`)


def _compile(jitted, *args) -> _Compiled:
  """``jitted`` lowered and compiled at ``args``, timed, with XLA's memory estimate."""
  start = time.perf_counter()
  lowered = jitted.lower(*args)
  compiled = lowered.compile()
  seconds, xla_bytes = time.perf_counter() - start, _xla_bytes(compiled)
  # Logged now: a case cut short later (by its time limit, or out of memory) still says these.
  logging.info("  compiled in %.1f s; XLA's memory estimate %s MB", seconds,
               "–" if xla_bytes is None else f"{xla_bytes / 2**20:.0f}")
  return _Compiled(lowered, compiled, seconds, xla_bytes)


# --------------------------------------------------------------------------------------------
# The cases.


def _median_ms(call, reps: int) -> float:
  """Median wall ms of ``reps`` calls of ``call()`` (each waited for), after one untimed."""
  jax.block_until_ready(call())
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


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
      out[f"{name}{suffix}_ms"] = _median_ms(lambda step=step, arg=arg: step(xs, arg), reps)
    out[f"dense_over_sparse{suffix}"] = out[f"dense{suffix}_ms"] / out[f"sparse{suffix}_ms"]
  return out


_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "f64": 8}


def _collective_bytes(hlo: str) -> dict:
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
  moved = _collective_bytes(hlo)
  return {"topology": topology_name, "K": k_count, "devices": backends.mesh_size(k_count),
          "params_per_agent": params, "bytes_by_collective": moved,
          "bytes_per_device": sum(moved.values()), "edges": topo.num_edges()}


def _combine_table(rows: list) -> str:
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


def _device_data(d: data_lib.Data, k_count: int, backend: str = "vmap") -> train.DeviceData:
  """Placed as the step wants it (``shard``: on the mesh), so no step copies the data."""
  return train.device_data(d, data_lib.partition_iid(len(d.train_labels), k_count, seed=0),
                           backend)


def data_memory(name: str, k_count: int) -> dict:
  """Device bytes of a dataset set up for K agents as training does (back-end ``auto``): one copy
  plus indices on one device; with ``shard``, each device its agents' examples."""
  c = config_lib.resolve({"dataset": name, "num_agents": k_count, "batch_size": 1})
  d = train.load_data(c)
  backend = backends.resolve(c.backend, k_count)
  dev = train.device_data(d, train.prepare_data(c, d).parts, backend)
  parts = {field: train.device_bytes(getattr(dev, field)) for field in dev._fields}
  per_device = train.bytes_per_device(dev)
  split_bytes = d.train_images.nbytes + 4 * len(d.train_labels)  # the split once, labels int32
  return {"dataset": d.name, "K": k_count, "train_examples": len(d.train_labels),
          "backend": backend, "device_bytes": sum(parts.values()), "bytes_by_field": parts,
          "max_device_bytes": max(per_device.values()), "split_bytes": split_bytes,
          "k_copies_bytes": k_count * split_bytes,
          "devices": backends.mesh_size(k_count) if backend == "shard" else 1}


def _data_memory_line(m: dict) -> str:
  mib = lambda n: f"{n / 2**20:,.1f} MiB"  # noqa: E731
  spread = (f", at most {mib(m['max_device_bytes'])} on one of {m['devices']} devices "
            f"(the split once: {mib(m['split_bytes'])})" if m["backend"] == "shard" else "")
  return (f"data on device, {m['dataset']} ({m['train_examples']:,} training examples), "
          f"K = {m['K']}: {mib(m['device_bytes'])} = images {mib(m['bytes_by_field']['images'])}"
          f" + labels {mib(m['bytes_by_field']['labels'])} + index lists "
          f"{mib(m['bytes_by_field']['idx'] + m['bytes_by_field']['counts'])}{spread}; K copies "
          f"would be {mib(m['k_copies_bytes'])}")


class Case(NamedTuple):
  """One model at one K: the unit every variant is measured on."""

  model_name: str
  model: models.Model
  data: data_lib.Data
  k_count: int
  batch: int


def _library_config(case: Case, backend: str, chunk_size: int, algorithm: str):
  """The config the library's rows run: this case, back-end and algorithm, the flags' rest."""
  return config_lib.resolve({
      "num_agents": case.k_count, "batch_size": case.batch, "backend": backend,
      "model": case.model_name, "chunk_size": chunk_size if backend == "chunked" else 0,
      "algorithm": algorithm, "topology": FLAGS.topology, "learning_rate": FLAGS.learning_rate,
      "precision": FLAGS.precision, "conv": FLAGS.conv})


def library_case(case: Case, backend: str, chunk_size: int, algorithm: str, run_kw: dict,
                 scan_steps: int = 1):
  """The library's train step; with ``scan_steps`` > 1, that many steps per call under
  ``lax.scan`` (one dispatch), timed per step."""
  c = _library_config(case, backend, chunk_size, algorithm)
  model, alg = train.make_model(c, case.data), train.make_algorithm(c)
  topo = jax.device_put(train.make_topology(c))
  dev = _device_data(case.data, case.k_count, backend)
  data_lib.check_batch(np.asarray(dev.counts), case.batch)
  state = train.init_state(c, model, alg, topo)
  train_step = train.build_programs(c, model, alg).train_step
  if scan_steps > 1:
    one_step = train_step

    def fused(s, topo, dev):
      def body(s, _):
        s, m = one_step(s, topo, dev)
        return s, m["loss"]

      s, losses = jax.lax.scan(body, s, None, length=scan_steps)
      return s, {"loss": losses[-1]}

    train_step = jax.jit(fused, donate_argnums=(0,))
  p = _compile(train_step, state, topo, dev)

  def bind(c):
    def step(s):
      s, m = c(s, topo, dev)
      return s, m["loss"]
    return step

  times, loss, summary = _run(bind(p.compiled), state, **run_kw,
                              program=(p.lowered, p.compiled, bind))
  if summary and "error" not in summary:
    summary = op_profile.per_step(summary, scan_steps)
  return Measured(p.seconds, [t / scan_steps for t in times], p.xla_bytes, loss, summary)


def algorithm_case(case: Case, backend: str, chunk_size: int, algorithm: str, reps: int) -> float:
  """Median ms of the algorithm's own step alone: the local optimizer update from given
  gradients and the combination (DRT: its weights too), without the model's forward and
  backward pass. Whole train steps compiled apart can differ by more than DRT's cost (the
  convolutions' algorithms are tuned per program); this isolates what the algorithm adds."""
  c = _library_config(case, backend, chunk_size, algorithm)
  model, alg = train.make_model(c, case.data), train.make_algorithm(c)
  topo = jax.device_put(train.make_topology(c))
  state = train.init_state(c, model, alg, topo)
  grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), state.params)
  fn = jax.jit(alg.step)
  return _median_ms(lambda: fn(state.params, grads, state.alg_state, topo), reps)


class _SingleState(NamedTuple):
  params: Any
  model_state: Any
  opt_state: Any
  step: jax.Array
  key: jax.Array


def _single_program(model: models.Model, batch: int, opt: optax.GradientTransformation):
  """One model's SGD step on ``batch`` images it samples from the device dataset (donated)."""

  def step(s: _SingleState, dev: train.DeviceData):
    idx = jax.random.randint(jax.random.fold_in(s.key, s.step), (batch,), 0,
                             dev.labels.shape[0])
    x = (dev.images[idx].astype(jnp.float32) - dev.mean) / dev.std
    y = dev.labels[idx]

    def loss_fn(params):
      logits, new_state = model.apply({"params": params, **s.model_state}, x, True)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y)), new_state

    (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(s.params)
    updates, opt_state = opt.update(grads, s.opt_state, s.params)
    params = optax.apply_updates(s.params, updates)
    return _SingleState(params, new_state, opt_state, s.step + 1, s.key), loss

  return jax.jit(step, donate_argnums=(0,))


def _single_state(model, opt, key) -> _SingleState:
  variables = model.init(jax.random.fold_in(key, 0))
  params = variables["params"]
  model_state = {k: v for k, v in variables.items() if k != "params"}
  return _SingleState(params, model_state, opt.init(params), jnp.zeros((), jnp.int32),
                      jax.random.fold_in(key, 1))


def single_case(case: Case, run_kw: dict):
  opt = optax.sgd(FLAGS.learning_rate)
  dev = _device_data(case.data, 1)
  state = _single_state(case.model, opt, jax.random.key(0))
  program = _single_program(case.model, case.k_count * case.batch, opt)
  p = _compile(program, state, dev)

  def bind(c):
    return lambda s: c(s, dev)

  times, loss, summary = _run(bind(p.compiled), state, **run_kw,
                              program=(p.lowered, p.compiled, bind))
  return Measured(p.seconds, times, p.xla_bytes, loss, summary)


def loop_case(case: Case, run_kw: dict):
  model, k_count = case.model, case.k_count
  opt = optax.sgd(FLAGS.learning_rate)
  dev = _device_data(case.data, 1)
  mixing = combine_lib.as_mixing(jax.device_put(
      train.make_topology(config_lib.resolve({"num_agents": k_count,
                                              "topology": FLAGS.topology}))))

  def combine_all(params_list, mixing):
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *params_list)
    mixed = combine_lib.combine(stacked, mixing)
    return [jax.tree.map(lambda x, k=k: x[k], mixed) for k in range(k_count)]

  states = [_single_state(model, opt, jax.random.key(k)) for k in range(k_count)]
  step = _compile(_single_program(model, case.batch, opt), states[0], dev)
  params = [s.params for s in states]
  combine = _compile(jax.jit(combine_all, donate_argnums=(0,)), params, mixing)

  def round_(states):
    out = [step.compiled(s, dev) for s in states]
    mixed = combine.compiled([s.params for s, _ in out], mixing)
    return ([s._replace(params=p) for (s, _), p in zip(out, mixed, strict=True)],
            jnp.stack([loss for _, loss in out]))

  times, loss, _ = _run(round_, states, **run_kw)
  return Measured(step.seconds + combine.seconds, times, step.xla_bytes, loss)


# --------------------------------------------------------------------------------------------
# Reporting.


def _machine() -> dict:
  dev = jax.devices()[0]
  return {
      "host": platform.node(), "platform": jax.default_backend(), "device_kind": dev.device_kind,
      "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
      "cpu_count": os.cpu_count(), "jax": jax.__version__,
      "jaxlib": getattr(jax.lib, "__version__", None), "optax": optax.__version__,
      "python": platform.python_version(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def _row(case: Case, variant: str, backend, algorithm, m: Measured | None, *, single_img_s=None,
         error: Exception | None = None) -> dict:
  row = {"model": case.model_name, "K": case.k_count, "batch": case.batch, "variant": variant,
         "backend": backend, "algorithm": algorithm}
  if error is not None:
    return {**row, "status": f"error: {type(error).__name__}: {str(error).splitlines()[0][:200]}"}
  img_s = case.k_count * case.batch * len(m.step_s) / sum(m.step_s)
  return {
      **row, "status": "ok", "img_s": img_s,
      "ratio_vs_single": img_s / single_img_s if single_img_s else None,
      "step_ms": 1e3 * statistics.median(m.step_s), "step_ms_min": 1e3 * min(m.step_s),
      "steps_timed": len(m.step_s), "compile_s": m.compile_s, "peak_mb": _peak_mb(),
      "xla_mb": None if m.xla_bytes is None else m.xla_bytes / 2**20, "loss": m.loss,
      # Other processes on the machine skew CPU timings; this makes that visible.
      "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
      **({"profile": m.profile} if m.profile else {}),
  }


def _fmt(x, spec):
  return "–" if x is None else format(x, spec)


def _table(machine: dict, rows: list, comparisons: list) -> str:
  lines = [
      f"### drt_jax training throughput on {machine['host']} ({machine['platform']}, "
      f"{machine['local_device_count']}× {machine['device_kind']}, {machine['cpu_count']} CPUs, "
      f"jax {machine['jax']}, {machine['date']}), {FLAGS.precision} compute, "
      f"conv {FLAGS.conv}" + (f" (single and loop rows: {FLAGS.baseline_conv})"
                              if FLAGS.baseline_conv else ""), "",
      "| model | K | variant | conv | img/s | × single | step ms | compile s | peak MB | XLA MB |",
      "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if r["status"] != "ok":
      lines.append(f"| {r['model']} | {r['K']} | {r['variant']} | {r.get('conv') or '–'} | "
                   f"{r['status']} | | | | | |")
      continue
    lines.append(
        f"| {r['model']} | {r['K']} | {r['variant']} | {r.get('conv') or '–'} | "
        f"{r['img_s']:,.0f} | "
        f"{_fmt(r['ratio_vs_single'], '.2f')} | {r['step_ms']:.1f} | {r['compile_s']:.1f} | "
        f"{_fmt(r['peak_mb'], '.0f')} | {_fmt(r['xla_mb'], '.0f')} |")
  groups = {}
  for r in rows:
    if r.get("profile") and "error" not in r["profile"]:
      groups.setdefault((r["model"], r["K"]), {})[r["variant"]] = r["profile"]
  for (model, k_count), profiles in groups.items():
    lines += ["", f"Device time per step by kind of XLA op, {model}, K = {k_count} "
              f"(experiments/op_profile.py):", "", op_profile.category_table(profiles)]
    for variant, summary in profiles.items():
      lines += ["", f"Costliest ops, {model}, K = {k_count}, {variant}:", "",
                op_profile.top_table(summary, 10)]
  if comparisons:
    lines += ["", "Whole train steps, and the algorithms' own steps alone (local update from given "
              "gradients + combination, no forward/backward):", "",
              "| model | K | back-end | algorithm ms | compare ms | ratio | alone: algorithm ms | "
              "compare ms | difference ms |", "|---|---|---|---|---|---|---|---|---|"]
    for cmp in comparisons:
      alone_a, alone_c = cmp.get("algorithm_alone_ms"), cmp.get("compare_alone_ms")
      diff = None if alone_a is None or alone_c is None else alone_c - alone_a
      lines.append(f"| {cmp['model']} | {cmp['K']} | {cmp['backend']} | "
                   f"{cmp['algorithm']} {cmp['algorithm_ms']:.1f} | "
                   f"{cmp['compare']} {cmp['compare_ms']:.1f} | {cmp['ratio']:.2f} | "
                   f"{_fmt(alone_a, '.2f')} | {_fmt(alone_c, '.2f')} | {_fmt(diff, '.2f')} |")
  return "\n".join(lines)


class _Sink:
  """Appends one JSON line per finished case to ``<out>.jsonl`` and flushes it to disk."""

  def __init__(self, out: str):
    self.path = os.path.splitext(out)[0] + ".jsonl"
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    open(self.path, "w").close()

  def write(self, record: dict):
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
      f.flush()
      os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------


def _ints(name: str) -> list[int]:
  """A list flag of integers, or one line naming the flag."""
  values = getattr(FLAGS, name)
  try:
    return [int(v) for v in values]
  except ValueError:
    raise app.UsageError(f"--{name}={','.join(values)}: expected integers, e.g. "
                         f"--{name}=16,64") from None


def _settings() -> dict:
  s = {"models": FLAGS.models, "ks": _ints("ks"), "batch": FLAGS.batch,
       "steps": FLAGS.steps, "warmup": FLAGS.warmup, "precision": FLAGS.precision,
       "conv": FLAGS.conv, "baseline_conv": FLAGS.baseline_conv or FLAGS.conv,
       "data_memory": FLAGS.data_memory,
       "data_memory_k": FLAGS.data_memory_k,
       "combine_ks": _ints("combine_ks"), "combine_params": FLAGS.combine_params,
       "combine_reps": FLAGS.combine_reps, "bytes_k": FLAGS.bytes_k}
  if FLAGS.smoke:
    s.update(models=["mlp"], ks=[2, 4], batch=4, steps=2, warmup=1, combine_ks=[8, 16],
             combine_params=256, combine_reps=2, bytes_k=8,
             data_memory=FLAGS.data_memory and "synthetic")
  if not s["ks"]:
    raise app.UsageError("--ks is empty; give the numbers of agents, e.g. --ks=16,64")
  if s["steps"] < 1 or s["warmup"] < 0 or s["batch"] < 1 or min(s["ks"]) < 1:
    raise app.UsageError("--steps, --batch and --ks must be >= 1 and --warmup >= 0")
  for flag, value, names in (("algorithm", FLAGS.algorithm, algorithms.NAMES),
                             ("compare", FLAGS.compare or "atc", algorithms.NAMES),
                             ("topology", FLAGS.topology, topology_lib.KINDS)):
    if value not in names:
      raise app.UsageError(f"--{flag}: unknown {value!r}; expected one of {', '.join(names)}")
  if os.path.isdir(FLAGS.out):
    raise app.UsageError(f"--out={FLAGS.out} is a folder; give the JSON file to write")
  unknown = sorted(set(s["models"]) - set(_SHAPES))
  if unknown:
    raise app.UsageError(f"--models: unknown {unknown[0]!r}; expected some of "
                         f"{', '.join(_SHAPES)}")
  bad = sorted(set(FLAGS.baselines) - {"single", "loop"})
  if bad:
    raise app.UsageError(f"--baselines: unknown {bad[0]!r}; expected some of single, loop")
  bad = sorted(set(FLAGS.backends) - set(_BACKENDS))
  if bad:
    raise app.UsageError(f"--backends: unknown {bad[0]!r}; expected some of "
                         f"{', '.join(_BACKENDS)}")
  return s


def measure(case: Case, run_kw: dict, sink: _Sink, pruned: dict) -> tuple[list, dict | None]:
  """Every variant of one model at one K, in order: single, loop, back-ends, comparison.

  ``pruned`` maps back-ends too slow at a smaller K to the reason; slow ones are added to it.
  """
  rows, single_img_s, n_dev = [], None, backends.mesh_size(case.k_count)
  chunk = min(FLAGS.chunk_size, case.k_count)

  def conv_of(backend):  # the formulation a row's convolutions use ('auto' resolved)
    if case.model_name not in models.CONV_MODELS:
      return None
    if backend is None:  # single and loop rows: one agent
      return backends.best_conv(FLAGS.baseline_conv or FLAGS.conv, FLAGS.precision, 1)
    return train.conv_formulation(_library_config(case, backend, chunk, FLAGS.algorithm))

  def record(variant, fn, *, backend=None, algorithm=None):
    nonlocal single_img_s
    logging.info("%s K=%d %s ...", case.model_name, case.k_count, variant)
    try:
      m = fn()
    except Exception as e:  # one failing case (e.g. out of memory) must not end the run
      logging.exception("%s K=%d %s failed", case.model_name, case.k_count, variant)
      row = _row(case, variant, backend, algorithm, None, error=e)
    else:
      row = _row(case, variant, backend, algorithm, m, single_img_s=single_img_s)
      if variant == "single":
        single_img_s, row["ratio_vs_single"] = row["img_s"], 1.0
      logging.info("  %.0f img/s (x%.2f), step %.1f ms, compile %.1f s", row["img_s"],
                   row["ratio_vs_single"] or 0.0, row["step_ms"], row["compile_s"])
    row["conv"] = conv_of(backend)
    rows.append(row)
    sink.write(row)
    return row

  if "single" in FLAGS.baselines:
    record("single", lambda: single_case(case, run_kw))
  if "loop" in FLAGS.baselines:
    record("loop", lambda: loop_case(case, run_kw))
  timed = []
  for backend in FLAGS.backends:
    if backend in pruned:
      logging.info("skipping %s at K=%d: %s", backend, case.k_count, pruned[backend])
      continue
    if backend == "shard" and n_dev < 2:
      logging.info("skipping shard: no two of %d local devices split K=%d evenly",
                   jax.local_device_count(), case.k_count)
      continue
    if backend == "chunked" and case.k_count % chunk:
      logging.info("skipping chunked: chunk_size %d does not divide K=%d", chunk, case.k_count)
      continue
    variant = {"chunked": f"chunked({chunk})", "shard": f"shard({n_dev})"}.get(backend, backend)
    row = record(variant, lambda b=backend: library_case(case, b, chunk, FLAGS.algorithm, run_kw),
                 backend=backend, algorithm=FLAGS.algorithm)
    if row["status"] == "ok":
      timed.append(row)
      if row["ratio_vs_single"] is not None and row["ratio_vs_single"] < FLAGS.prune_below:
        pruned[backend] = f"x{row['ratio_vs_single']:.2f} of single at K={case.k_count}"

  if not timed:
    return rows, None
  best = max(timed, key=lambda r: r["img_s"])
  if FLAGS.scan_steps > 1:
    record(f"scan{FLAGS.scan_steps}:{best['variant']}",
           lambda: library_case(case, best["backend"], chunk, FLAGS.algorithm, run_kw,
                                FLAGS.scan_steps),
           backend=best["backend"], algorithm=FLAGS.algorithm)
  if not FLAGS.compare:
    return rows, None
  row = record(f"{FLAGS.compare}:{best['variant']}",
               lambda: library_case(case, best["backend"], chunk, FLAGS.compare, run_kw),
               backend=best["backend"], algorithm=FLAGS.compare)
  if row["status"] != "ok":
    return rows, None
  comparison = {"model": case.model_name, "K": case.k_count, "backend": best["variant"],
                "algorithm": FLAGS.algorithm, "algorithm_ms": best["step_ms"],
                "compare": FLAGS.compare, "compare_ms": row["step_ms"],
                "ratio": row["step_ms"] / best["step_ms"]}
  try:
    reps = max(5, FLAGS.steps)
    for key, name in (("algorithm_alone_ms", FLAGS.algorithm), ("compare_alone_ms", FLAGS.compare)):
      comparison[key] = algorithm_case(case, best["backend"], chunk, name, reps)
    logging.info("  algorithm steps alone: %s %.2f ms, %s %.2f ms", FLAGS.algorithm,
                 comparison["algorithm_alone_ms"], FLAGS.compare, comparison["compare_alone_ms"])
  except Exception:  # the whole-step comparison stands without it
    logging.exception("%s K=%d: timing the algorithm steps alone failed", case.model_name,
                      case.k_count)
  sink.write({"comparison": comparison})
  return rows, comparison


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.host_devices > 1:
    _set_host_devices(FLAGS.host_devices)
    backends.patient_cpu_collectives()
  jax.config.update("jax_enable_compilation_cache", False)  # compile time is a measurement
  s = _settings()
  if (FLAGS.host_devices > 1 and jax.default_backend() == "cpu"
      and jax.local_device_count() != FLAGS.host_devices):
    raise RuntimeError(f"--host_devices={FLAGS.host_devices} did not take effect (JAX sees "
                       f"{jax.local_device_count()} devices): a backend started before main")
  machine = _machine()
  logging.info("machine: %s", machine)
  if hint := backends.host_memory_hint():
    logging.info(hint)
  sink = _Sink(FLAGS.out)
  sink.write({"machine": machine, "settings": s})
  run_kw = {"warmup": s["warmup"], "steps": s["steps"], "budget_s": FLAGS.case_budget_s}
  rows, comparisons = [], []

  for model_name in s["models"]:
    shape = _SHAPES[model_name]
    d = data_lib.synthetic(num_train=max(1024, 4 * max(s["ks"]) * s["batch"]), num_test=16,
                           shape=shape, seed=0)
    # The single and loop rows' model: one agent, built as the library builds it.
    model = train.make_model(config_lib.resolve(
        {"model": model_name, "precision": FLAGS.precision, "num_agents": 1, "backend": "vmap",
         "conv": FLAGS.baseline_conv or FLAGS.conv}), d)
    pruned = {}
    for k_count in sorted(s["ks"]):
      case = Case(model_name, model, d, k_count, s["batch"])
      group_rows, comparison = measure(case, run_kw, sink, pruned)
      rows += group_rows
      comparisons += [comparison] if comparison else []

  table = _table(machine, rows, comparisons)
  combine_rows = []
  for k_count in s["combine_ks"]:
    combine_rows.append(combine_case(k_count, s["combine_params"], "ring", s["combine_reps"]))
    sink.write({"combine": combine_rows[-1]})
  if combine_rows:
    table += ("\nThe combine alone (ring), on one device and on the agents' mesh:\n\n"
              + _combine_table(combine_rows) + "\n")
  moved = []
  if s["bytes_k"] and backends.mesh_size(s["bytes_k"]) > 1:
    for name in ("ring", "torus", "full"):
      moved.append(combine_bytes(s["bytes_k"], s["combine_params"], name))
      sink.write({"combine_bytes": moved[-1]})
    table += "\n" + "\n".join(
        f"bytes received per device by one combine, {m['topology']}, K = {m['K']} on "
        f"{m['devices']} devices, {m['params_per_agent']:,} floats per agent: "
        f"{m['bytes_per_device'] / 2**20:,.2f} MiB "
        f"({', '.join(f'{k} {v / 2**20:,.2f}' for k, v in m['bytes_by_collective'].items() if v)})"
        for m in moved) + "\n"
  memory = None
  if s["data_memory"]:
    memory = data_memory(s["data_memory"], s["data_memory_k"])
    sink.write({"data_memory": memory})
    table += "\n" + _data_memory_line(memory) + "\n"
  print(table)
  result = {"machine": machine, "settings": s, "flags": {
      "baselines": FLAGS.baselines, "backends": FLAGS.backends, "chunk_size": FLAGS.chunk_size,
      "algorithm": FLAGS.algorithm, "compare": FLAGS.compare, "scan_steps": FLAGS.scan_steps,
      "topology": FLAGS.topology, "host_devices": FLAGS.host_devices,
      "prune_below": FLAGS.prune_below, "case_budget_s": FLAGS.case_budget_s,
      "profile_steps": FLAGS.profile_steps, "argv": sys.argv},
      "rows": rows, "comparisons": comparisons, "combine": combine_rows, "combine_bytes": moved,
      "data_memory": memory,
      "table": table}
  with open(FLAGS.out, "w") as f:
    json.dump(result, f, indent=2)
  logging.info("wrote %s and %s", FLAGS.out, sink.path)


if __name__ == "__main__":
  common.run(main)
