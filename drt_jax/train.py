"""``train_and_evaluate``: trains K agents and evaluates them, the library's Python entry point.

It maps the config to objects (:mod:`drt_jax.build`; objects given as arguments win), prepares the
data (:mod:`drt_jax.inputs`), runs the compiled step (:mod:`drt_jax.step`) and writes what a run
keeps (:mod:`drt_jax.workdir`, :mod:`drt_jax.checkpoint`). Per-step metrics stay on the device and
are pulled at evaluations, log lines and checkpoints, where they are checked for NaN/Inf: the run
stops with a one-line ``FloatingPointError`` naming the first bad step and its agents. With
``config.checkpoint_every`` it saves and resumes the whole state.
"""

import contextlib
import dataclasses
import functools
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from drt_jax import backends, build, distributed, faults, inputs, models
from drt_jax import checkpoint as checkpoint_lib
from drt_jax import config as config_lib
from drt_jax import data as data_lib
from drt_jax import metrics as metrics_lib
from drt_jax import step as step_lib
from drt_jax import workdir as workdir_lib

# Steps dispatched ahead of the one the host waits for. Enough to keep an accelerator busy; and
# bounded, because XLA:CPU with several virtual devices deadlocks when hundreds of steps with
# collectives queue up (each device's threads wait in a later step's rendezvous while an earlier
# step still needs them).
MAX_STEPS_IN_FLIGHT = 4
_HOST_METRICS = ("loss", "acc", "dropped_agents", "failed_links", "stragglers")


def check_finite(step_metrics: list[dict], first_step: int) -> None:
  """Raises FloatingPointError at the first step whose loss or parameters are not finite.

  ``step_metrics`` are the host copies of consecutive steps' metrics, the first of step
  ``first_step``; the message is one line naming the step and the agents.
  """
  for i, m in enumerate(step_metrics):
    bad_loss = np.flatnonzero(~np.isfinite(np.asarray(m["loss"])))
    bad_params = np.flatnonzero(~np.asarray(m["finite"], bool))
    if bad_loss.size or bad_params.size:
      what = []
      if bad_loss.size:
        what.append(f"training loss on agents {bad_loss.tolist()}")
      if bad_params.size:
        what.append(f"parameters on agents {bad_params.tolist()}")
      raise FloatingPointError(f"non-finite {' and '.join(what)} at step {first_step + i}; "
                               "lower learning_rate or check the data")


class _Run(NamedTuple):
  """A run set up on the devices: its data, programs, graph and first state."""

  prepared: inputs.Prepared
  dev: inputs.DeviceData
  eval_sets: dict
  objects: build.Objects
  programs: step_lib.Programs
  topology: Any  # placed where the step reads it
  state: step_lib.TrainState
  bytes_sent: float
  digest: Callable[[], str]  # names the data (hashed once, where it is compared or saved)


def _setup(c: ml_collections.ConfigDict, data, given: dict, *, on_device: bool = True) -> _Run:
  """Loads and splits the data, builds the objects and programs, and the initial state.

  Without ``on_device`` the training data and the state are left to the caller (``dev`` and
  ``state`` are None): the vectorised sweeps place them once for all their members.
  """
  d = data_lib.as_data(data) if data is not None else inputs.load_data(c)
  prepared = inputs.prepare_data(c, d)
  digest = functools.cache(functools.partial(inputs.data_digest, prepared))
  if jax.process_count() > 1:
    distributed.check_agreement({"data": digest()},
                                "give every process the same dataset (and agent_indices)")
  backends.check(c.backend, c.num_agents, c.chunk_size or None)
  objs = build.objects(c, prepared.data, **given)
  spec = build.step_spec(c)
  progs = step_lib.programs_for(spec, objs.model, objs.algorithm, model_key=objs.model_key,
                                algorithm_key=objs.algorithm_key)
  init = functools.partial(step_lib.init_state, spec, objs.model, objs.algorithm, objs.topology,
                           seed=c.seed, same_init=c.same_init)
  dev = state = None
  if on_device:
    dev = inputs.device_data(prepared.data, prepared.parts, c.backend)
    state = init()
    bad = np.flatnonzero(~backends.to_host(step_lib.agents_finite(state.params)))
    if bad.size:
      raise ValueError(f"the initial parameters are not finite on agents {bad.tolist()}; check "
                       "the model's initialisers")
  place = functools.partial(backends.place, backend=c.backend, num_agents=c.num_agents,
                            stacked=False)
  topo = objs.topology
  topo = dataclasses.replace(topo, **place({"nbr_idx": topo.nbr_idx, "nbr_w": topo.nbr_w}))
  shapes = state if on_device else jax.eval_shape(init)
  shared = (shapes.params, shapes.model_state) if c.combine_batch_stats else shapes.params
  message = getattr(objs.algorithm, "message_bytes", None)
  nbytes = metrics_lib.tree_bytes(shared)
  bytes_sent = metrics_lib.bytes_per_agent_step(
      objs.topology, message(nbytes) if message is not None else float(nbytes))
  return _Run(prepared, dev, place(inputs.eval_sets(c, prepared)), objs, progs, topo, state,
              bytes_sent, digest)


def _log_setup(c, run: _Run) -> None:
  d, dev, counts = run.prepared.data, run.dev, [len(p) for p in run.prepared.parts]
  logging.info("data %s: %d training examples over %d agents (%s partition, %d-%d each), "
               "%.1f MiB on device", d.name, len(d.train_labels), c.num_agents, c.partition,
               min(counts), max(counts), inputs.device_bytes(dev) / 2**20)
  resolved = backends.resolve(c.backend, c.num_agents)
  used = backends.mesh_size(c.num_agents) if resolved == "shard" else 1
  logging.info("devices: %s; backend %s -> %s on %d of them", jax.devices(), c.backend, resolved,
               used)
  if hint := backends.host_memory_hint():
    logging.info(hint)
  if c.model in models.CONV_MODELS:  # 'auto' depends on the platform and the agents per device
    logging.info("convolutions: conv %s -> %s", c.conv, build.conv_formulation(c))
  mine = backends.local_agents(dev.idx)
  span = f"{mine[0]}-{mine[-1]}" if mine == list(range(mine[0], mine[-1] + 1)) else str(mine)
  logging.info("process %d of %d holds agents %s (their examples and index lists) on %d devices",
               jax.process_index(), jax.process_count(), span,
               len({s.device for s in dev.idx.addressable_shards}))
  topo = run.objects.topology
  logging.info("topology %s (slem %.4f); algorithm %s; K=%d", topo, topo.slem(), c.algorithm,
               c.num_agents)


class _Resumed(NamedTuple):
  state: step_lib.TrainState
  step: int  # the step the run starts from
  rows: list  # evaluation rows written before it
  host: dict  # what the checkpoint kept besides the state


def _resume(workdir, c, same_run: bool, run: _Run, config: dict):
  """``(checkpoints or None, resumed)``: a workdir's checkpoints, and the state and rows of the
  newest good one when it holds a run of the same config (damaged newer ones are skipped)."""

  def steps_on_main():
    steps = checkpoint_lib.steps(workdir) if same_run else []
    if workdir and not steps:  # check_workdir said: overwrite, or no checkpoint to keep
      checkpoint_lib.delete(workdir)  # a fresh start keeps no checkpoint of another run
    return steps[-100:]  # the newest are the ones worth trying; on_main hands on 2 KiB at most

  steps = distributed.on_main(steps_on_main)
  if not (workdir and (c.checkpoint_every or steps)):
    return None, _Resumed(run.state, 0, [], {})
  ckpt = checkpoint_lib.Checkpoints(workdir, c.keep_checkpoints, config=config)
  if not steps:
    if same_run:
      logging.warning("workdir %s holds a run of the same config without a checkpoint; "
                      "replacing it", workdir)
    return ckpt, _Resumed(run.state, 0, [], {})
  try:
    state, host, resume_step = ckpt.restore_newest(run.state, steps)
    if int(state.step) != resume_step:
      raise ValueError(f"checkpoint {resume_step} in {ckpt.path} holds step {int(state.step)}; "
                       "remove the checkpoints folder or use overwrite")
    if host.get("config", config) != config:  # config.json said the same: it was edited
      raise ValueError(f"checkpoint {resume_step} in {ckpt.path} was saved by a run of a "
                       "different config than config.json's; use another workdir or "
                       "overwrite=True (--overwrite) to start afresh")
    digest = run.digest()
    if host.get("data", digest) != digest:  # same config, other data: not the same run
      raise ValueError(f"checkpoint {resume_step} in {ckpt.path} was trained on other data "
                       f"({host['data'][:60]}...; now {digest[:60]}...); pass that data, or "
                       "overwrite=True (--overwrite) to start afresh")
  except BaseException:
    ckpt.close()
    raise
  rows = workdir_lib.resumed_rows(workdir, resume_step, host.get("rows"))
  logging.info("workdir %s: resuming from the checkpoint of step %d (%d metric rows kept)",
               workdir, resume_step, len(rows))
  return ckpt, _Resumed(state, resume_step, rows, host)


class _Progress:
  """A progress bar over the steps with rate and ETA, in a terminal or a notebook (tqdm), that
  shows the last evaluation; nothing when not ``enabled``, nor where no one watches it (output
  to a file or a CI log, which keeps the evaluation log lines alone)."""

  def __init__(self, total: int, enabled: bool):
    self.total, self.enabled, self.bar = total, enabled, None

  def start(self, step: int) -> None:
    """Starts the bar at ``step``, once the first step has compiled: the rate is the steps'."""
    if self.enabled and self.bar is None:
      from tqdm.auto import tqdm  # noqa: PLC0415 -- picks the notebook widget where it can
      from tqdm.autonotebook import tqdm as chosen  # noqa: PLC0415 -- what tqdm.auto built on

      if chosen.__module__ == "tqdm.notebook" or sys.stderr.isatty():
        self.bar = tqdm(total=self.total, initial=step, unit="step", dynamic_ncols=True)

  def advance(self) -> None:
    if self.bar is not None:
      self.bar.update()

  def show(self, row: dict) -> None:
    if self.bar is not None:
      self.bar.set_postfix(test_acc=f"{row['test_acc_mean']:.4f}",
                           consensus=f"{row['consensus_distance']:.3g}", refresh=False)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


class _Evaluator:
  """Makes the evaluation rows: the programs' sums and metrics, the host's per-step buffers and
  the rate of the steps since the last row."""

  def __init__(self, c, run: _Run, resumed: _Resumed):
    self.c, self.run = c, run
    self.faults = faults.spec_from_config(c)
    # Accuracies are averaged over the honest agents: a Byzantine agent's own model says nothing.
    honest = faults.honest_agents(self.faults, c.num_agents)
    self.honest = slice(None) if honest is None else honest
    self.sizes = {k: int(np.sum(np.asarray(v.mask))) for k, v in run.eval_sets.items()}
    self.mean_count = float(np.mean([len(p) for p in run.prepared.parts]))
    self.buf = workdir_lib.buffer_from_json(resumed.host.get("metrics", {}))
    now = time.perf_counter()
    self.start = now - float(resumed.host.get("wall_time", 0.0))  # runs on across a resume
    self.mark = (resumed.step, now)  # the rate counts this process's steps and time alone

  def add(self, m: dict) -> None:
    for k in _HOST_METRICS:
      if k in m:
        v = np.asarray(m[k])
        self.buf.setdefault(k, []).append(v[self.honest] if v.ndim else v)  # [K]: honest ones

  def restart_clock(self, step: int) -> None:
    """Times from ``step`` on (after the compiling first step)."""
    self.mark = (step, time.perf_counter())

  def _mean(self, name):
    return float(np.mean(self.buf[name])) if self.buf.get(name) else None

  def row(self, state: step_lib.TrainState, step: int) -> dict:
    run = self.run
    sums = {name: backends.to_host(run.programs.evaluate(state.params, state.model_state,
                                                         run.eval_sets[name], run.dev.mean,
                                                         run.dev.std))
            for name in inputs.sets_at(self.c, step, run.eval_sets)}
    pm = backends.to_host(run.programs.param_metrics(state.params, state.model_state,
                                                     state.alg_state, run.topology))
    return self.make_row(sums, pm, step)

  def make_row(self, sums: dict, pm: dict, step: int) -> dict:
    """The row of ``step`` from the host copies of the evaluation sums (per set) and the
    parameter metrics, and the host's buffers since the last row (which it empties)."""
    c, run, n, h = self.c, self.run, self.sizes, self.honest
    test, test_acc = sums["test"], sums["test"]["correct"] / n["test"]
    train_acc = sums["train"]["correct"] / n["train"]
    now = time.perf_counter()
    timed_from, since = self.mark  # None below: no step was timed since (only the compiling one)
    row = {
        "step": step,
        "epoch": step * c.batch_size / self.mean_count,
        "train_loss": self._mean("loss"),
        "train_batch_acc": self._mean("acc"),
        "test_acc_mean": float(np.mean(test_acc[h])),
        "test_acc_min": float(np.min(test_acc[h])),
        "test_acc_max": float(np.max(test_acc[h])),
        "test_acc_per_agent": [round(float(a), 6) for a in test_acc],  # Byzantine ones too
        "test_loss_mean": float(np.mean(test["loss"][h]) / n["test"]),
        "centroid_test_acc": float(test["centroid_correct"] / n["test"]),
        "train_acc_mean": float(np.mean(train_acc[h])),
        "gen_gap": float(np.mean(train_acc[h]) - np.mean(test_acc[h])),
        "output_disagreement": float(test["disagreement"] / n["test"]),
        **({"val_acc_mean": float(np.mean(sums["val"]["correct"][h]) / n["val"]),
            "val_loss_mean": float(np.mean(sums["val"]["loss"][h]) / n["val"]),
            "centroid_val_acc": float(sums["val"]["centroid_correct"] / n["val"])}
           if "val" in sums else {}),
        **({"final_test_acc_mean": float(np.mean(full["correct"][h]) / n["test_full"]),
            "final_test_loss_mean": float(np.mean(full["loss"][h]) / n["test_full"]),
            "final_centroid_test_acc": float(full["centroid_correct"] / n["test_full"]),
            "final_output_disagreement": float(full["disagreement"] / n["test_full"])}
           if (full := sums.get("test_full")) is not None else {}),
        **({**{k: self._mean(k) for k in ("dropped_agents", "failed_links", "stragglers")},
            "byzantine": self.faults.byzantine} if self.faults is not None else {}),
        "bytes_per_agent_step": run.bytes_sent,
        "steps_per_sec": (step - timed_from) / max(now - since, 1e-9) if step > timed_from
                         else None,
        "wall_time": now - self.start,
        **{k: float(v) for k, v in pm.items()},
    }
    self.mark, self.buf = (step, now), {}
    return row


def _log_row(c, row: dict) -> None:
  rate = row["steps_per_sec"]
  eta = f"{(c.num_steps - row['step']) / max(rate, 1e-9):.0f}s" if rate else "-"
  logging.info("step %d/%d | test acc %.4f (centroid %.4f) | gap %.4f | consensus %.3g | "
               "disagreement %.3g | %s steps/s, ETA %s", row["step"], c.num_steps,
               row["test_acc_mean"], row["centroid_test_acc"], row["gen_gap"],
               row["consensus_distance"], row["output_disagreement"],
               "-" if rate is None else f"{rate:.1f}", eta)


def train_and_evaluate(config=None, workdir: str | None = None, data=None, *,
                       model: models.Model | None = None, optimizer=None, topology=None,
                       algorithm=None, callbacks: Sequence[Callable[[dict], Any]] = (),
                       verbose: bool = True, overwrite: bool = False) -> list[dict]:
  """Trains K agents and returns the history: one dict of metrics per evaluation.

  Args:
    config: a ConfigDict or dict overriding :func:`drt_jax.config.default_config`.
    workdir: if given, ``config.json``, ``metrics.jsonl`` and TensorBoard event files are written
      there, and checkpoints into ``checkpoints/`` every ``config.checkpoint_every`` steps. A
      workdir holding a checkpoint of the same config resumes from its newest good checkpoint
      (the history then includes the rows written before it); see :mod:`drt_jax.checkpoint`.
      One run at a time: a workdir in use by a live run (``<workdir>/.lock``) is refused.
    data: in-memory data (:class:`drt_jax.data.Data` or a mapping with its fields: train/test
      images and labels and, optionally, ``agent_indices``, one index array per agent). Without it
      ``config.dataset`` is loaded.
    model: a :class:`drt_jax.models.Model` (e.g. ``models.from_flax(module, shape, classes)``)
      instead of ``config.model``.
    optimizer: any optax ``GradientTransformation`` (a schedule, ``optax.chain``, clipping) as
      every agent's local optimizer, instead of ``config.optimizer`` and its hyperparameters.
    topology: a :class:`drt_jax.topology.Topology` (``topology.make``, ``from_matrices``, static
      or time-varying) instead of ``config.topology``.
    algorithm: an algorithm object with ``init``/``step`` (:func:`drt_jax.algorithms.make`, or
      one's own) instead of ``config.algorithm``; it brings its local optimizer.
    callbacks: functions called with each evaluation row (a dict), in order, on process 0.
    verbose: show a progress bar with rate, ETA and the last evaluation.
    overwrite: replace a run of a different config in ``workdir`` (otherwise refused); starts
      afresh and deletes the old checkpoints.

  An object given wins over its config field; the config written to the workdir then says
  ``'custom'`` for that field, with a short description in ``config.custom``.

  Raises:
    FloatingPointError: a training loss or an agent's parameters became NaN or Inf (one line
      naming the first such step and the agents); no checkpoint of that state is written.

  Example::

    history = train_and_evaluate({"algorithm": "drt", "num_agents": 8, "num_steps": 100},
                                 optimizer=optax.sgd(optax.cosine_decay_schedule(0.1, 100)))
    history[-1]["test_acc_mean"]
  """
  c = config_lib.resolve(config)
  given = {"model": model, "optimizer": optimizer, "topology": topology, "algorithm": algorithm}
  recorded = build.record(c, **given)
  distributed.check_agreement({"config": config_lib.shared_json(recorded)},
                              "start every process with the same config and overrides")

  with contextlib.ExitStack() as stack:  # on any exit: files closed, then the lock released

    def check_on_main():  # process 0 reads and writes the workdir; the others learn its answer
      workdir_lib.check_writable(workdir)
      stack.enter_context(workdir_lib.lock(workdir))  # one run per workdir, before any write
      return workdir_lib.check_workdir(workdir, recorded, overwrite)

    same_run = distributed.on_main(check_on_main)
    run = _setup(c, data, given)
    ckpt, resumed = _resume(workdir, c, same_run, run, json.loads(recorded.to_json()))
    if ckpt is not None:
      stack.callback(ckpt.close)
    main = distributed.is_main()
    # Process 0 alone writes config, partition and metrics (it rewrites metrics.jsonl with the
    # same rows the others have read, atomically, so no process reads a half-written file).
    writer = workdir_lib.Writer(workdir if main else None, recorded, run.prepared, resumed.rows)
    stack.callback(writer.close)
    _log_setup(c, run)
    return _loop(c, run, ckpt, resumed, writer, callbacks if main else (),
                 _Progress(c.num_steps, verbose and main))


def is_eval_step(c: ml_collections.ConfigDict, step: int) -> bool:
  """Whether a run of config ``c`` evaluates (writes a row) at ``step``."""
  return step in (0, c.num_steps) or bool(c.eval_every and step % c.eval_every == 0)


def _loop(c, run: _Run, ckpt, resumed: _Resumed, writer, callbacks, progress) -> list[dict]:
  """Steps from the resumed step to ``c.num_steps``, evaluating, logging and saving on the way."""
  state, first, history = resumed.state, resumed.step, list(resumed.rows)
  evaluator = _Evaluator(c, run, resumed)
  pending, pending_from = [], first + 1

  def pull():  # one gather per metric for all pending steps ([K] metrics stay with their agents)
    nonlocal pending, pending_from
    stacked = backends.to_host(jax.tree.map(lambda *steps: jnp.stack(steps), *pending))
    got = [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(len(pending))]
    check_finite(got, pending_from)
    for m in got:
      evaluator.add(m)
    pending_from, pending = pending_from + len(pending), []

  def evaluate(step):
    row = evaluator.row(state, step)
    history.append(row)
    writer.write(row)
    _log_row(c, row)
    progress.show(row)
    for callback in callbacks:
      callback(row)

  def is_eval(step):
    return is_eval_step(c, step)

  # Step 0, or a checkpoint whose row did not reach the disk. Process 0's metrics decide: an
  # evaluation is collective, and another host may not see the same metrics file.
  if distributed.on_main(lambda: is_eval(first) and not any(r["step"] == first
                                                            for r in history)):
    evaluate(first)
  try:
    for step in range(first + 1, c.num_steps + 1):
      state, m = run.programs.train_step(state, run.topology, run.dev)
      pending.append(m)
      if step == first + 1:  # compiled: time and show the steps from here on
        jax.block_until_ready(m)
        evaluator.restart_clock(step)
        progress.start(step - 1)
      progress.advance()
      if len(pending) > MAX_STEPS_IN_FLIGHT:
        jax.block_until_ready(pending[-MAX_STEPS_IN_FLIGHT - 1])
      logs = bool(c.log_every and step % c.log_every == 0)
      saves = ckpt is not None and bool(c.checkpoint_every) and (
          step % c.checkpoint_every == 0 or step == c.num_steps)
      if logs or saves or is_eval(step):
        pull()
      if logs:
        logging.info("step %d/%d | train loss %.4f", step, c.num_steps,
                     float(np.mean(evaluator.buf["loss"][-1])))
      if is_eval(step):
        evaluate(step)
      if saves:  # after the row of this step, so a checkpoint never runs ahead of the metrics
        ckpt.save(step, state, {"step": step, "metrics": workdir_lib.buffer_to_json(evaluator.buf),
                                "wall_time": time.perf_counter() - evaluator.start,
                                "data": run.digest(),  # with the config: whose run this is
                                "rows": [workdir_lib.json_safe(r) for r in history]})
  finally:
    progress.close()
  return history
