r"""Training throughput of K agents, per back-end, against one model and a Python loop, in one run.

For every model and K it times, on the same machine and in the same process:

* ``single``: the ceiling. ONE model (same network) on the total batch K*B, plain ``optax.sgd``,
  jitted with the state donated; its loss and gradients are the library's own
  (:func:`drt_jax.step.loss_and_grads`). Every other row is reported as a ratio to it (1.0 = as
  fast per image as one model doing the same arithmetic).
* ``loop``: how most research code simulates agents: a Python loop of K calls of a jitted
  single-agent SGD step (each agent its own params, batch B), then one jitted neighbour average
  over the K param trees (the library's sparse ``combine``, same topology). One "step" is the whole
  round.
* ``vmap``, ``chunked(C)``, ``map``, ``shard(N)``: the library's real compiled train step
  (``drt_jax.build.programs``) with ``--algorithm`` (ATC by default), per back-end of
  :mod:`drt_jax.backends`; ``shard(N)`` on the N devices that split K evenly, when N >= 2.
  With ``--conv auto`` each row uses the formulation the library would pick for it (the
  ``conv`` column): the single and loop rows are one agent (XLA's convolution), the back-ends
  may use taps (:func:`drt_jax.backends.best_conv`). ``--conv`` also takes the lab's
  kernel-gradient formulations (:mod:`benchmarks.conv_formulations`).
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
copies, ...; :mod:`benchmarks.op_profile`) to the row, with a table per model and K comparing the
variants: where a vmapped step loses against the single model.

Each case is appended to ``<out>.jsonl`` as soon as it finishes (a killed run keeps what it
measured); the full result goes to ``--out`` (JSON) and a markdown table to stdout. The combine
alone and the data's device memory, which the same command measured before the lab was split by
question, are ``benchmarks/combine.py`` and ``benchmarks/data_memory.py``.

Commands (from the repository root):

  python -m benchmarks.train_step --host_devices 8                       # CPU: cnn, K=4,16,64
  python -m benchmarks.train_step --host_devices 8 --models resnet20 --ks 4,16 --steps 5 \
      --warmup 1 --case_budget_s 15 --prune_below 0.1    # ~5 min on 2 cores
  python -m benchmarks.train_step --smoke --host_devices 2 --out /tmp/smoke.json   # CI, < 60 s
  python -m benchmarks.train_step --models resnet20 --ks 16,64,256       # one GPU

``--host_devices N`` makes N virtual CPU devices (``XLA_FLAGS``), so ``shard`` runs on a CPU; it
must take effect before JAX starts its backends, which ``main`` checks.
"""

import dataclasses
import os
import statistics
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging

from benchmarks import common, conv_formulations, op_profile
from drt_jax import algorithms, backends, build, inputs, models
from drt_jax import combine as combine_lib
from drt_jax import config as config_lib
from drt_jax import data as data_lib
from drt_jax import step as step_lib
from drt_jax import topology as topology_lib

BACKENDS = ("vmap", "chunked", "map", "shard")  # backends.BACKENDS without 'auto'
BASELINES = ("single", "loop")
SHAPES = {"cnn": (28, 28, 1), "mlp": (28, 28, 1), "resnet20": (32, 32, 3)}
CONVS = ("auto", *models.CONVS, *conv_formulations.NAMES)  # what --conv takes


@dataclasses.dataclass(frozen=True)
class Options:
  """What every case of one run shares (``main`` fills it from the flags)."""

  algorithm: str = "atc"  # of the back-end rows
  compare: str = "drt"  # timed on the best back-end against ``algorithm`` ('' skips)
  topology: str = "ring"  # library rows and the loop's combine
  learning_rate: float = 0.05  # SGD step size, every variant
  precision: str = "float32"  # compute dtype of every variant
  conv: str = "auto"  # one of CONVS: the conv models' formulation
  baseline_conv: str | None = None  # the single and loop rows', if not ``conv``
  chunk_size: int = 4  # agents per group for 'chunked' (min(chunk_size, K))
  baselines: tuple[str, ...] = BASELINES
  backends: tuple[str, ...] = BACKENDS
  scan_steps: int = 0  # > 1: also the best back-end with this many steps per dispatch
  prune_below: float = 0.0  # see the module docstring (0 = never)
  warmup: int = 2  # untimed steps per case after compilation
  steps: int = 10  # timed steps per case
  case_budget_s: float = 120.0  # stop timing a case after this many seconds (0 = never)
  profile_steps: int = 0  # > 0: that many more steps traced per row but the loop's
  profile_dir: str = ""  # keep each profiled case's trace and HLO in a numbered folder here


def _lab_conv(conv: str | None) -> str | None:
  """``conv`` if it is one of the lab's formulations, else None (the library's own)."""
  return conv if conv in conv_formulations.NAMES else None


class Measured(NamedTuple):
  compile_s: float
  step_s: list  # seconds per timed step
  xla_bytes: int | None
  loss: float | None  # mean loss of the last step (a sanity check, not a result)
  profile: dict | None = None  # op_profile.summarize of --profile_steps more steps


class Case(NamedTuple):
  """One model at one K: the unit every variant is measured on."""

  model_name: str
  model: models.Model  # the single and loop rows' (one agent)
  data: data_lib.Data
  k_count: int
  batch: int


# --------------------------------------------------------------------------------------------
# Timing and profiling.


def _run(step, state, opts: Options, program=None):
  """Times ``state, loss = step(state)`` (:func:`common.time_steps`); returns (step seconds,
  loss, profile).

  ``program`` is ``(lowered, compiled, bind)`` with ``step = bind(compiled)``. With
  ``opts.profile_steps`` that many more steps run under the profiler (see
  :func:`_traced_program`) and ``profile`` is their per-op summary (else None).
  """
  times, loss, state = common.time_steps(step, state, opts.warmup, opts.steps,
                                         opts.case_budget_s)
  loss, summary = float(jnp.mean(loss)), None
  if opts.profile_steps > 0 and program is not None:
    keep_dir = None
    if opts.profile_dir:  # numbered in the order the cases run (and are logged)
      os.makedirs(opts.profile_dir, exist_ok=True)
      keep_dir = os.path.join(opts.profile_dir, f"{len(os.listdir(opts.profile_dir)):02d}")
      logging.info("  keeping its trace in %s", keep_dir)
    try:  # a profiler that fails (no CUPTI, say) must not cost the case its timings
      lowered, compiled, bind = program
      traced, note = _traced_program(lowered, compiled)
      _, summary = op_profile.profile(lambda sl: bind(traced)(sl[0]), (state, None),
                                      traced.as_text(), opts.profile_steps, keep_dir)
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


# --------------------------------------------------------------------------------------------
# The library's train step.


def _device_data(d: data_lib.Data, k_count: int, backend: str = "vmap") -> inputs.DeviceData:
  """Placed as the step wants it (``shard``: on the mesh), so no step copies the data."""
  return inputs.device_data(d, data_lib.partition_iid(len(d.train_labels), k_count, seed=0),
                           backend)


def library_config(case: Case, backend: str, chunk_size: int, algorithm: str, opts: Options):
  """The config the library's rows run: this case, back-end and algorithm, the options' rest (a
  lab formulation is built beside the config: :func:`conv_formulations.build_model`)."""
  return config_lib.resolve({
      "num_agents": case.k_count, "batch_size": case.batch, "backend": backend,
      "model": case.model_name, "chunk_size": chunk_size if backend == "chunked" else 0,
      "algorithm": algorithm, "topology": opts.topology, "learning_rate": opts.learning_rate,
      "precision": opts.precision, "conv": "xla" if _lab_conv(opts.conv) else opts.conv})


def _library_objects(case: Case, backend: str, chunk_size: int, algorithm: str, opts: Options):
  c = library_config(case, backend, chunk_size, algorithm, opts)
  model = conv_formulations.build_model(c, case.data, _lab_conv(opts.conv))
  return c, model, build.algorithm(c), jax.device_put(build.topology(c))


def library_case(case: Case, backend: str, chunk_size: int, algorithm: str, opts: Options,
                 scan_steps: int = 1) -> Measured:
  """The library's train step; with ``scan_steps`` > 1, that many steps per call under
  ``lax.scan`` (one dispatch), timed per step."""
  c, model, alg, topo = _library_objects(case, backend, chunk_size, algorithm, opts)
  dev = _device_data(case.data, case.k_count, backend)
  data_lib.check_batch(np.asarray(dev.counts), case.batch)
  state = build.init_state(c, model, alg, topo)
  train_step = build.programs(c, model, alg).train_step
  if scan_steps > 1:
    one_step = train_step

    def fused(s, topo, dev):
      def body(s, _):
        s, m = one_step(s, topo, dev)
        return s, m["loss"]

      s, losses = jax.lax.scan(body, s, None, length=scan_steps)
      return s, {"loss": losses[-1]}

    train_step = jax.jit(fused, donate_argnums=(0,))
  p = common.compile_timed(train_step, state, topo, dev)

  def bind(c):
    def step(s):
      s, m = c(s, topo, dev)
      return s, m["loss"]
    return step

  times, loss, summary = _run(bind(p.compiled), state, opts,
                              program=(p.lowered, p.compiled, bind))
  if summary and "error" not in summary:
    summary = op_profile.per_step(summary, scan_steps)
  return Measured(p.seconds, [t / scan_steps for t in times], p.xla_bytes, loss, summary)


def algorithm_case(case: Case, backend: str, chunk_size: int, algorithm: str, reps: int,
                   opts: Options) -> float:
  """Median ms of the algorithm's own step alone: the local optimizer update from given
  gradients and the combination (DRT: its weights too), without the model's forward and
  backward pass. Whole train steps compiled apart can differ by more than DRT's cost (the
  convolutions' algorithms are tuned per program); this isolates what the algorithm adds."""
  c, model, alg, topo = _library_objects(case, backend, chunk_size, algorithm, opts)
  state = build.init_state(c, model, alg, topo)
  grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), state.params)
  fn = jax.jit(alg.step)
  return common.median_ms(lambda: fn(state.params, grads, state.alg_state, topo), reps)


# --------------------------------------------------------------------------------------------
# The baselines: one model, and a loop over K of them.


class _SingleState(NamedTuple):
  params: Any
  model_state: Any
  opt_state: Any
  step: jax.Array
  key: jax.Array


def _single_program(model: models.Model, batch: int, opt: optax.GradientTransformation):
  """One model's SGD step on ``batch`` images it samples from the device dataset (donated),
  with the library's per-agent loss and gradients."""
  loss_and_grads = step_lib.loss_and_grads(model)

  def step(s: _SingleState, dev: inputs.DeviceData):
    idx = jax.random.randint(jax.random.fold_in(s.key, s.step), (batch,), 0,
                             dev.labels.shape[0])
    x = data_lib.normalise(dev.images[idx], dev.mean, dev.std)
    loss, _, new_state, grads = loss_and_grads(s.params, s.model_state, x, dev.labels[idx])
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


def single_case(case: Case, opts: Options) -> Measured:
  opt = optax.sgd(opts.learning_rate)
  dev = _device_data(case.data, 1)
  state = _single_state(case.model, opt, jax.random.key(0))
  program = _single_program(case.model, case.k_count * case.batch, opt)
  p = common.compile_timed(program, state, dev)

  def bind(c):
    return lambda s: c(s, dev)

  times, loss, summary = _run(bind(p.compiled), state, opts,
                              program=(p.lowered, p.compiled, bind))
  return Measured(p.seconds, times, p.xla_bytes, loss, summary)


def loop_case(case: Case, opts: Options) -> Measured:
  model, k_count = case.model, case.k_count
  opt = optax.sgd(opts.learning_rate)
  dev = _device_data(case.data, 1)
  mixing = combine_lib.as_mixing(jax.device_put(
      build.topology(config_lib.resolve({"num_agents": k_count, "topology": opts.topology}))))

  def combine_all(params_list, mixing):
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *params_list)
    mixed = combine_lib.combine(stacked, mixing)
    return [jax.tree.map(lambda x, k=k: x[k], mixed) for k in range(k_count)]

  states = [_single_state(model, opt, jax.random.key(k)) for k in range(k_count)]
  step = common.compile_timed(_single_program(model, case.batch, opt), states[0], dev)
  params = [s.params for s in states]
  combine = common.compile_timed(jax.jit(combine_all, donate_argnums=(0,)), params, mixing)

  def round_(states):
    out = [step.compiled(s, dev) for s in states]
    mixed = combine.compiled([s.params for s, _ in out], mixing)
    return ([s._replace(params=p) for (s, _), p in zip(out, mixed, strict=True)],
            jnp.stack([loss for _, loss in out]))

  times, loss, _ = _run(round_, states, opts)  # no program: not profiled
  return Measured(step.seconds + combine.seconds, times, step.xla_bytes, loss)


# --------------------------------------------------------------------------------------------
# One model at one K, every variant.


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
      "steps_timed": len(m.step_s), "compile_s": m.compile_s, "peak_mb": common.peak_mb(),
      "xla_mb": None if m.xla_bytes is None else m.xla_bytes / 2**20, "loss": m.loss,
      # Other processes on the machine skew CPU timings; this makes that visible.
      "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
      **({"profile": m.profile} if m.profile else {}),
  }


def measure(case: Case, opts: Options, sink: common.Sink, pruned: dict) -> tuple[list, dict | None]:
  """Every variant of one model at one K, in order: single, loop, back-ends, comparison.

  ``pruned`` maps back-ends too slow at a smaller K to the reason; slow ones are added to it.
  """
  rows, single_img_s, n_dev = [], None, backends.mesh_size(case.k_count)
  chunk = min(opts.chunk_size, case.k_count)

  def conv_of(backend):  # the formulation a row's convolutions use ('auto' resolved)
    if case.model_name not in models.CONV_MODELS:
      return None
    if backend is None:  # single and loop rows: one agent
      return backends.best_conv(opts.baseline_conv or opts.conv, opts.precision, 1)
    if _lab_conv(opts.conv):
      return opts.conv
    return build.conv_formulation(library_config(case, backend, chunk, opts.algorithm, opts))

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

  if "single" in opts.baselines:
    record("single", lambda: single_case(case, opts))
  if "loop" in opts.baselines:
    record("loop", lambda: loop_case(case, opts))
  timed = []
  for backend in opts.backends:
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
    row = record(variant, lambda b=backend: library_case(case, b, chunk, opts.algorithm, opts),
                 backend=backend, algorithm=opts.algorithm)
    if row["status"] == "ok":
      timed.append(row)
      if row["ratio_vs_single"] is not None and row["ratio_vs_single"] < opts.prune_below:
        pruned[backend] = f"x{row['ratio_vs_single']:.2f} of single at K={case.k_count}"

  if not timed:
    return rows, None
  best = max(timed, key=lambda r: r["img_s"])
  if opts.scan_steps > 1:
    record(f"scan{opts.scan_steps}:{best['variant']}",
           lambda: library_case(case, best["backend"], chunk, opts.algorithm, opts,
                                opts.scan_steps),
           backend=best["backend"], algorithm=opts.algorithm)
  if not opts.compare:
    return rows, None
  row = record(f"{opts.compare}:{best['variant']}",
               lambda: library_case(case, best["backend"], chunk, opts.compare, opts),
               backend=best["backend"], algorithm=opts.compare)
  if row["status"] != "ok":
    return rows, None
  comparison = {"model": case.model_name, "K": case.k_count, "backend": best["variant"],
                "algorithm": opts.algorithm, "algorithm_ms": best["step_ms"],
                "compare": opts.compare, "compare_ms": row["step_ms"],
                "ratio": row["step_ms"] / best["step_ms"]}
  try:
    reps = max(5, opts.steps)
    for key, name in (("algorithm_alone_ms", opts.algorithm), ("compare_alone_ms", opts.compare)):
      comparison[key] = algorithm_case(case, best["backend"], chunk, name, reps, opts)
    logging.info("  algorithm steps alone: %s %.2f ms, %s %.2f ms", opts.algorithm,
                 comparison["algorithm_alone_ms"], opts.compare, comparison["compare_alone_ms"])
  except Exception:  # the whole-step comparison stands without it
    logging.exception("%s K=%d: timing the algorithm steps alone failed", case.model_name,
                      case.k_count)
  sink.write({"comparison": comparison})
  return rows, comparison


def run(model_names, ks, batch: int, opts: Options, sink: common.Sink) -> tuple[list, list]:
  """Every model at every K (ascending, so that ``prune_below`` sees the smaller K first):
  ``(rows, comparisons)``."""
  rows, comparisons = [], []
  for model_name in model_names:
    shape = SHAPES[model_name]
    d = data_lib.synthetic(num_train=max(1024, 4 * max(ks) * batch), num_test=16, shape=shape,
                           seed=0)
    # The single and loop rows' model: one agent, built as the library builds it.
    conv = opts.baseline_conv or opts.conv
    c = config_lib.resolve({"model": model_name, "precision": opts.precision, "num_agents": 1,
                            "backend": "vmap", "conv": "xla" if _lab_conv(conv) else conv})
    model = conv_formulations.build_model(c, d, _lab_conv(conv))
    pruned = {}
    for k_count in sorted(ks):
      group_rows, comparison = measure(Case(model_name, model, d, k_count, batch), opts, sink,
                                       pruned)
      rows += group_rows
      comparisons += [comparison] if comparison else []
  return rows, comparisons


# --------------------------------------------------------------------------------------------
# Reporting.


def table(machine: dict, rows: list, comparisons: list, opts: Options) -> str:
  """Markdown: a row per variant, the profiles by kind of op, the algorithms compared."""
  fmt = common.fmt
  lines = [
      f"### drt_jax training throughput on {machine['host']} ({machine['platform']}, "
      f"{machine['local_device_count']}× {machine['device_kind']}, {machine['cpu_count']} CPUs, "
      f"jax {machine['jax']}, {machine['date']}), {opts.precision} compute, "
      f"conv {opts.conv}" + (f" (single and loop rows: {opts.baseline_conv})"
                             if opts.baseline_conv else ""), "",
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
        f"{fmt(r['ratio_vs_single'], '.2f')} | {r['step_ms']:.1f} | {r['compile_s']:.1f} | "
        f"{fmt(r['peak_mb'], '.0f')} | {fmt(r['xla_mb'], '.0f')} |")
  groups = {}
  for r in rows:
    if r.get("profile") and "error" not in r["profile"]:
      groups.setdefault((r["model"], r["K"]), {})[r["variant"]] = r["profile"]
  for (model, k_count), profiles in groups.items():
    lines += ["", f"Device time per step by kind of XLA op, {model}, K = {k_count} "
              f"(benchmarks/op_profile.py):", "", op_profile.category_table(profiles)]
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
                   f"{fmt(alone_a, '.2f')} | {fmt(alone_c, '.2f')} | {fmt(diff, '.2f')} |")
  return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line.


def define_flags() -> None:
  """The command line's flags (defined by the binary only, so importing this module is free)."""
  flags.DEFINE_list("models", ["cnn"], "Models to measure: cnn, mlp, resnet20.")
  flags.DEFINE_list("ks", ["4", "16", "64"], "Numbers of agents K.")
  flags.DEFINE_integer("batch", 32, "Images per agent per step (B).")
  flags.DEFINE_integer("steps", 10, "Timed steps per case (after warm-up).")
  flags.DEFINE_integer("warmup", 2, "Untimed steps per case after compilation.")
  flags.DEFINE_list("baselines", list(BASELINES), "Reference rows to time: 'single' (the "
                    "ceiling; ratios are to it) and 'loop' (K jitted single-agent steps).")
  flags.DEFINE_list("backends", list(BACKENDS), "Library back-ends to time.")
  flags.DEFINE_integer("chunk_size", 4, "Agents per group for 'chunked' (min(chunk_size, K)).")
  flags.DEFINE_string("algorithm", "atc", "Algorithm of the back-end rows.")
  flags.DEFINE_string("compare", "drt", "Algorithm timed on the best back-end against "
                      "--algorithm ('' to skip).")
  flags.DEFINE_string("topology", "ring", "Communication graph (library rows and loop combine).")
  flags.DEFINE_float("learning_rate", 0.05, "SGD step size (all variants).")
  flags.DEFINE_float("case_budget_s", 120.0, "Stop timing a case after this many seconds of "
                     "timed steps (0 = always --steps).")
  flags.DEFINE_float("prune_below", 0.0, "Skip a back-end at larger K once it ran below this "
                     "ratio to the single model at a smaller K of the same model (0 = never).")
  flags.DEFINE_string("out", "benchmark.json", "JSON result; per-case lines go to <out>.jsonl.")
  flags.DEFINE_bool("smoke", False, "Tiny run for CI: mlp, K=2,4, batch 4, 2 steps.")
  flags.DEFINE_enum("precision", "float32", ["float32", "bfloat16"], "Compute dtype of every "
                    "variant (parameters and the combination stay float32).")
  flags.DEFINE_enum("conv", "auto", list(CONVS), "Convolution formulation of the conv models "
                    "(drt_jax.models.CONVS, the lab's benchmarks.conv_formulations.NAMES; "
                    "'auto': backends.best_conv).")
  flags.DEFINE_enum("baseline_conv", None, list(CONVS), "Convolution formulation of the single "
                    "and loop rows, if not --conv's (e.g. 'xla', the fastest for one model).")
  flags.DEFINE_string("profile_dir", "", "With --profile_steps, keep each profiled case's trace "
                      "and HLO text in a numbered folder here (else they are deleted).")
  flags.DEFINE_integer("scan_steps", 0, "If > 1, also time the best back-end with this many "
                       "steps fused into one dispatch by lax.scan (row 'scanN:<best>').")
  flags.DEFINE_integer("profile_steps", 0, "If > 0, trace this many more steps of the single "
                       "model and of each back-end and report device time per kind of XLA op "
                       "(benchmarks/op_profile.py).")
  flags.DEFINE_integer("host_devices", 1, "If > 1, virtual CPU devices to create (for 'shard').")


def _settings(f) -> dict:
  """The run's sizes from the flags (``--smoke`` shrinks them), checked."""
  s = {"models": f.models, "ks": common.ints("ks", f.ks), "batch": f.batch, "steps": f.steps,
       "warmup": f.warmup, "precision": f.precision, "conv": f.conv,
       "baseline_conv": f.baseline_conv or f.conv}
  if f.smoke:
    s.update(models=["mlp"], ks=[2, 4], batch=4, steps=2, warmup=1)
  if not s["ks"]:
    raise app.UsageError("--ks is empty; give the numbers of agents, e.g. --ks=16,64")
  if s["steps"] < 1 or s["warmup"] < 0 or s["batch"] < 1 or min(s["ks"]) < 1:
    raise app.UsageError("--steps, --batch and --ks must be >= 1 and --warmup >= 0")
  for flag, value, names in (("algorithm", f.algorithm, algorithms.NAMES),
                             ("compare", f.compare or "atc", algorithms.NAMES),
                             ("topology", f.topology, topology_lib.KINDS)):
    if value not in names:
      raise app.UsageError(f"--{flag}: unknown {value!r}; expected one of {', '.join(names)}")
  common.check_out(f.out)
  unknown = sorted(set(s["models"]) - set(SHAPES))
  if unknown:
    raise app.UsageError(f"--models: unknown {unknown[0]!r}; expected some of "
                         f"{', '.join(SHAPES)}")
  bad = sorted(set(f.baselines) - set(BASELINES))
  if bad:
    raise app.UsageError(f"--baselines: unknown {bad[0]!r}; expected some of single, loop")
  bad = sorted(set(f.backends) - set(BACKENDS))
  if bad:
    raise app.UsageError(f"--backends: unknown {bad[0]!r}; expected some of "
                         f"{', '.join(BACKENDS)}")
  return s


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  s = _settings(f)
  opts = Options(
      algorithm=f.algorithm, compare=f.compare, topology=f.topology,
      learning_rate=f.learning_rate, precision=f.precision, conv=f.conv,
      baseline_conv=f.baseline_conv, chunk_size=f.chunk_size, baselines=tuple(f.baselines),
      backends=tuple(f.backends), scan_steps=f.scan_steps, prune_below=f.prune_below,
      warmup=s["warmup"], steps=s["steps"], case_budget_s=f.case_budget_s,
      profile_steps=f.profile_steps, profile_dir=f.profile_dir)
  machine = common.start(f.host_devices)
  sink = common.Sink(f.out)
  sink.write({"machine": machine, "settings": s})
  rows, comparisons = run(s["models"], s["ks"], s["batch"], opts, sink)
  text = table(machine, rows, comparisons, opts)
  print(text)
  result = {"machine": machine, "settings": s, "flags": {
      "baselines": f.baselines, "backends": f.backends, "chunk_size": f.chunk_size,
      "algorithm": f.algorithm, "compare": f.compare, "scan_steps": f.scan_steps,
      "topology": f.topology, "host_devices": f.host_devices,
      "prune_below": f.prune_below, "case_budget_s": f.case_budget_s,
      "profile_steps": f.profile_steps, "argv": sys.argv},
      "rows": rows, "comparisons": comparisons, "table": text}
  common.write_result(f.out, result)
  logging.info("wrote %s and %s", f.out, sink.path)


if __name__ == "__main__":
  define_flags()
  common.run(main)
