"""Vectorised sweeps: S members of a sweep trained by one compiled program.

The design stacks the K agents of a run on a leading axis; a vectorised sweep stacks S runs (the
*members*, each a dict of dotted config overrides like a point of ``experiments/sweep.py``) on
another axis in front of it and vmaps the agents' train step, evaluation and metrics over
it (:func:`drt_jax.step.program_functions`, the functions the sequential trainer jits). The
members' values enter as data, never as constants of the program:

================================ ===============================================================
seed, same_init                  each member's initial state and sampling key (stacked on S), its
                                 partition (index lists stacked on S, padded to one width), its
                                 evaluation subsets (stacked when they differ); data the seed
                                 itself draws (``synthetic`` without ``data=``, a validation
                                 split) are stacked too
learning_rate, momentum,         the optimizer's hyperparameters, kept in its state by
weight_decay                     ``optax.inject_hyperparams`` (:func:`drt_jax.algorithms.
                                 local_optimizer`)
drt.strength                     rho, kept in DRT's state
topology_weights, lazy,          the topology's weights ``nbr_w`` (stacked on S); the neighbour
self_weight                      lists ``nbr_idx`` are shared, so members whose lists differ (a
                                 random graph drawn from the seed) are refused
partition, dirichlet_alpha,      the agents' index lists ``idx``/``counts`` (stacked on S; the
classes_per_agent, min_per_agent images are shared)
================================ ===============================================================

Everything else changes a shape or the program itself and is refused in one line that says to
sweep it sequentially: the model and its options, the algorithm and its options (``comm_every``,
``drt.floor``, ``drt.eps``, ... are Python constants of the algorithm's step; ``drt.floor`` would
be traced only if ``DRTState`` kept it, as it keeps the strength), the optimizer's kind, K, the
batch size, the topology's kind and options, the back-end, faults, precision, augmentation, the
evaluation sizes and the loop's own fields (``num_steps``, ``eval_every``, checkpoints).

Back-ends: ``vmap``, ``chunked`` and ``map`` lift the agents' step on one device; ``shard`` runs
``vmap`` around the sharded step with the member axis whole, so every device computes its agents
of every member (states ``[S, K, ...]`` split on K, :func:`drt_jax.step.runs_shardings`). Each
device then holds the union over the members of its agents' examples, so with ``shard`` the
members must train on the same examples (pass ``data=``). One process only: a run over several
processes is swept sequentially.

Each member's history and final state are those of its own sequential run
(:func:`drt_jax.train.train_and_evaluate` with the member's config, to float tolerance: the
batched matrix products may round differently): the same seeds and batches, the same rows
computed by the same code (``train._Evaluator``), written into its own workdir (``config.json``,
``metrics.jsonl``, checkpoints), so that plots, the study and resumption do not care how a member
ran. A block of members resumes from the newest checkpoint all of them hold.

A member whose loss or parameters become non-finite is frozen inside the program (its state kept
as it was before that step, with ``jnp.where`` on a member mask the program carries) and
recorded as diverged at that step with the message its sequential run raises; the others go on
untouched. Before running, the step's memory is estimated by XLA (``memory_analysis`` of the
compiled program) and a block that would not fit the device is split into smaller blocks (one
log line; skipped on CPU, whose limit JAX does not know).

Example::

  from drt_jax import vectorize
  members = [{"seed": s, "learning_rate": lr} for s in (0, 1) for lr in (0.05, 0.1)]
  histories = vectorize.train_and_evaluate_many(config, members)
  [h[-1]["test_acc_mean"] for h in histories], [h.status for h in histories]
"""

import collections
import contextlib
import functools
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from drt_jax import backends, build, inputs, train
from drt_jax import checkpoint as checkpoint_lib
from drt_jax import config as config_lib
from drt_jax import data as data_lib
from drt_jax import step as step_lib
from drt_jax import topology as topology_lib
from drt_jax import workdir as workdir_lib

# The config fields members may differ in (dotted names): each is data of the compiled step.
VECTORIZED_FIELDS = (
    "seed", "same_init",
    "learning_rate", "momentum", "weight_decay",
    "drt.strength",
    "topology_weights", "lazy", "self_weight",
    "partition", "dirichlet_alpha", "classes_per_agent", "min_per_agent",
)
# Of the device's free memory, what one block's step may use (the rest: evaluation, fragments).
MEMORY_FRACTION = 0.9


class MemberHistory(list):
  """A member's evaluation rows (as :func:`drt_jax.train.train_and_evaluate` returns them) and
  how it ended: ``status`` ``'ok'`` or ``'diverged'``; a diverged member's ``diverged_step`` and
  ``error``, the one-line message its sequential run raises (``FloatingPointError``), with the
  rows it wrote before."""

  def __init__(self, rows=(), status: str = "ok", diverged_step: int | None = None,
               error: str | None = None):
    super().__init__(rows)
    self.status, self.diverged_step, self.error = status, diverged_step, error


def member_config(config, overrides: Mapping) -> ml_collections.ConfigDict:
  """The resolved config of one member: ``config`` with ``overrides`` (dotted names, or nested
  dicts) applied."""
  d = config_lib.resolve(config).to_dict()
  for field, value in workdir_lib.flatten(overrides).items():
    *parents, leaf = field.split(".")
    node = d
    for name in parents:
      node = node.setdefault(name, {})
      if not isinstance(node, dict):
        raise ValueError(f"config field {field!r} is not in a group; cannot set it")
    node[leaf] = value
  return config_lib.resolve(d)


def _configs(config, members) -> list[ml_collections.ConfigDict]:
  if isinstance(members, Mapping) or not isinstance(members, Sequence) or not members:
    raise ValueError(f"members is a non-empty list of dicts of config overrides, e.g. "
                     f"[{{'seed': 0}}, {{'seed': 1}}]; got {members!r:.80}")
  configs = []
  for i, overrides in enumerate(members):
    if not isinstance(overrides, Mapping):
      raise ValueError(f"member {i} is {overrides!r:.60}, not a dict of config overrides")
    try:
      configs.append(member_config(config, overrides))
    except ValueError as e:
      raise ValueError(f"member {i}: {str(e).splitlines()[0]}") from e
  return configs


def _check_configs(configs: list[ml_collections.ConfigDict]) -> None:
  first = workdir_lib.flatten(configs[0].to_dict())
  for i, c in enumerate(configs[1:], 1):
    flat = workdir_lib.flatten(c.to_dict())
    for field in sorted(set(first) | set(flat)):
      was, now = first.get(field, "<absent>"), flat.get(field, "<absent>")
      if was != now and field not in VECTORIZED_FIELDS:
        raise ValueError(
            f"member {i} changes {field} ({was!r} -> {now!r}), which shapes the compiled "
            f"program or the run's loop; vectorised members may differ only in "
            f"{', '.join(VECTORIZED_FIELDS)}: sweep {field} sequentially (experiments/sweep.py)")
  if jax.process_count() > 1:
    raise ValueError(f"vectorised sweeps run in one process ({jax.process_count()} here); run "
                     "the members sequentially")


def _check_topologies(topologies: list) -> None:
  """Refuses members whose neighbour lists differ: they are shared by the compiled step."""
  first = topologies[0]
  for i, t in enumerate(topologies[1:], 1):
    same = (np.shape(t.nbr_idx) == np.shape(first.nbr_idx)
            and np.array_equal(np.asarray(t.nbr_idx), np.asarray(first.nbr_idx))
            and t.shifts == first.shifts)
    if not same:
      raise ValueError(f"member {i}'s graph has other neighbour lists than member 0's ({t} vs "
                       f"{first}; a random graph drawn from the seed?); vectorised members share "
                       "one graph and differ only in its weights: sweep them sequentially")


def vectorizable(config, members: Sequence[Mapping]) -> None:
  """Raises ValueError (one line) if ``members`` cannot run as one vectorised program: a member
  is not a valid config or changes a field outside :data:`VECTORIZED_FIELDS`, the run spans
  several processes, or the members' graphs have other neighbour lists. Returns None when they
  can (what depends on the data -- with ``shard``, the same examples -- is checked by
  :func:`train_and_evaluate_many`)."""
  configs = _configs(config, members)
  _check_configs(configs)
  _check_topologies([build.topology(c) for c in configs])


# --------------------------------------------------------------------------------------------
# The vectorised programs.


def _keep(keep, new: step_lib.TrainState, old: step_lib.TrainState) -> step_lib.TrainState:
  """Per member, ``new`` where ``keep`` else ``old`` (a frozen member does not move)."""

  def pick(n, o):
    return jnp.where(keep.reshape(keep.shape + (1,) * (n.ndim - 1)), n, o)

  return step_lib.TrainState(*(jax.tree.map(pick, n, o) for n, o in zip(new[:4], old[:4])),
                             old.key)


class _Programs(NamedTuple):
  """The member-stacked programs of one :class:`drt_jax.step.ProgramKey` and data layout.

  ``step(states, alive, topology, data) -> (states, alive, metrics)``: ``topology`` holds the
  shared neighbour lists and the members' weights ``nbr_w [S, T, K, D]``; ``alive`` (bool [S])
  says which members still train, and comes back without those whose loss or new parameters were
  not finite at this step (their state is kept as it was). ``compiled`` holds the step compiled
  ahead of time for each block's shapes (the executable that runs, and whose memory is measured).
  """

  step: Any
  evaluate: Any
  param_metrics: Any
  compiled: dict


PROGRAM_CACHE_SIZE = 8
_PROGRAMS: collections.OrderedDict = collections.OrderedDict()


def _programs(shared: "_Shared", data_axes: inputs.DeviceData) -> _Programs:
  """The programs of ``shared``'s key and ``data_axes``, built once per process (the last
  :data:`PROGRAM_CACHE_SIZE` kept), so that a rerun of a sweep compiles nothing new."""
  key = (shared.key, shared.shifts, data_axes)
  build_them = functools.partial(_build_programs, shared.fns, shared.shifts, data_axes,
                                 shared.state_sh)
  try:
    hash(key)
  except TypeError:  # objects that cannot be hashed: programs of their own
    return build_them()
  if key in _PROGRAMS:
    _PROGRAMS.move_to_end(key)
  else:
    _PROGRAMS[key] = build_them()
    while len(_PROGRAMS) > PROGRAM_CACHE_SIZE:
      _PROGRAMS.popitem(last=False)
  return _PROGRAMS[key]


def _build_programs(fns: step_lib.Programs, shifts, data_axes: inputs.DeviceData,
                    state_sh) -> _Programs:
  topo_axes = topology_lib.Topology(None, 0, shifts=shifts)

  def many_step(states, alive, topology, d):
    new, m = jax.vmap(fns.train_step, in_axes=(0, topo_axes, data_axes))(states, topology, d)
    ok = jnp.all(jnp.isfinite(m["loss"]), axis=-1) & jnp.all(m["finite"], axis=-1)
    keep = alive & ok
    new = _keep(keep, new, states)
    if state_sh is not None:  # where the next step's compiled program takes them
      new = jax.lax.with_sharding_constraint(new, state_sh)
    return new, keep, m

  def many_evaluate(params, model_state, ev, mean, std, *, ev_axis, stats_axis):
    return jax.vmap(fns.evaluate, in_axes=(0, 0, ev_axis, stats_axis, stats_axis))(
        params, model_state, ev, mean, std)

  def many_param_metrics(params, model_state, alg_state, topology):
    return jax.vmap(fns.param_metrics, in_axes=(0, 0, 0, topo_axes))(params, model_state,
                                                                     alg_state, topology)

  return _Programs(jax.jit(many_step, donate_argnums=(0,)),
                   jax.jit(many_evaluate, static_argnames=("ev_axis", "stats_axis")),
                   jax.jit(many_param_metrics), {})


def _free_device_memory() -> int | None:
  """Bytes free on the device the step runs on; None where the device does not say (CPU)."""
  stats = jax.local_devices()[0].memory_stats()
  if not stats or "bytes_limit" not in stats:
    return None
  return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def _needed_bytes(compiled) -> int:
  """What XLA's analysis says the compiled program holds at its peak on the device."""
  m = compiled.memory_analysis()
  if m is None:
    return 0
  return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes + m.generated_code_size_in_bytes)


# --------------------------------------------------------------------------------------------
# Members, the shared data and the blocks.


class _Member(NamedTuple):
  index: int
  c: ml_collections.ConfigDict
  run: Any  # train._Run without device data and state
  workdir: str | None
  same_run: bool  # the workdir holds a run of the same config


class _Shared(NamedTuple):
  """What every block reads: the programs, the graph and the data the members share."""

  key: step_lib.ProgramKey
  fns: step_lib.Programs
  spec: step_lib.StepSpec
  shifts: Any
  nbr_idx: jax.Array  # [T, K, D], where the step reads it
  state_shapes: Any  # one member's TrainState as ShapeDtypeStructs
  state_sh: Any  # where the leaves of member-stacked states live (None: the default device)
  whole: Any  # the sharding of values every device holds (None: the default device)
  split: Any  # the sharding of [S, K, ...] values, split over the agents (None: default)
  examples: Any  # (images, labels, mean, std) when the members share them, else None
  held: list | None  # shard: the examples each device holds for every member, sorted
  width: int  # the index lists' common padded width


def _same(arrays) -> bool:
  first = arrays[0]
  return all(a is first or (np.shape(a) == np.shape(first)
                            and np.array_equal(np.asarray(a), np.asarray(first)))
             for a in arrays[1:])


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _put(x, sharding):
  return jnp.asarray(x) if sharding is None else jax.device_put(x, sharding)


def _sds(shape, dtype, sharding):
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def _shared(members: list[_Member]) -> _Shared:
  runs, c = [m.run for m in members], members[0].c
  keys = {step_lib.ProgramKey(build.step_spec(m.c), m.run.objects.model_key,
                              m.run.objects.algorithm_key) for m in members}
  if len(keys) > 1:  # the field check keeps this from happening; a guard for new fields
    raise ValueError("the members build different programs; sweep them sequentially")
  first, spec = runs[0], build.step_spec(c)
  _check_topologies([r.objects.topology for r in runs])
  datas = [r.prepared.data for r in runs]
  for i, d in enumerate(datas[1:], 1):
    if d.train_images.shape != datas[0].train_images.shape:
      raise ValueError(f"member {i}'s training split has shape {d.train_images.shape}, member "
                       f"0's {datas[0].train_images.shape}; sweep them sequentially")
  shard = backends.resolve(c.backend, c.num_agents) == "shard"
  split = backends.split(c.backend, c.num_agents)
  if split is not None:
    split = NamedSharding(split.mesh, PartitionSpec(None, backends.AGENTS))
  whole = backends.replicated(c.backend, c.num_agents)
  examples, held = None, None
  if _same([d.train_images for d in datas]) and _same([d.train_labels for d in datas]):
    d = datas[0]
    labels = np.asarray(d.train_labels, np.int32)
    mean, std = data_lib.normalisation(d.train_images)  # of the whole split, as sequentially
    if shard:  # each device holds the examples of its agents in any member
      groups = backends.agent_blocks(c.backend, c.num_agents)
      held = [np.unique(np.concatenate([np.asarray(p) for r in runs
                                        for p in r.prepared.parts[a:b]])) for a, b in groups]
      rows = max(len(h) for h in held)

      def blocks(array):
        def one(j):
          pad = np.zeros((rows - len(held[j]), *array.shape[1:]), array.dtype)
          return np.concatenate([array[held[j]], pad])

        return backends.device_blocks(one, (rows, *array.shape[1:]), c.backend, c.num_agents)

      examples = (blocks(d.train_images), blocks(labels), _put(mean, whole), _put(std, whole))
    else:
      examples = (jnp.asarray(d.train_images), jnp.asarray(labels), jnp.asarray(mean),
                  jnp.asarray(std))
  elif shard:
    raise ValueError("the members train on other examples (data drawn from the seed: the "
                     "synthetic dataset without data=, or a validation split); with the shard "
                     "back-end they must share them: pass data=, or sweep them sequentially")
  n = len(datas[0].train_labels)
  width = max(data_lib.padded_width(r.prepared.parts, n)[0] for r in runs)
  alg, topology = first.objects.algorithm, first.objects.topology
  state_shapes = jax.eval_shape(functools.partial(
      step_lib.init_state, spec, first.objects.model, alg, topology, seed=c.seed,
      same_init=c.same_init))
  fns = step_lib.program_functions(spec, first.objects.model, alg)
  return _Shared(keys.pop(), fns, spec, first.topology.shifts, first.topology.nbr_idx,
                 state_shapes, step_lib.runs_shardings(spec, first.objects.model, alg, topology),
                 whole, split, examples, held, width)


def _index_lists(shared: _Shared, members: list[_Member]):
  """The members' padded index lists ``idx [S, K, W]`` and ``counts [S, K]``, where the step
  reads them (with ``shard``: positions in the blocks of examples their devices hold)."""
  size, k_count = len(members), shared.spec.num_agents
  idx = np.zeros((size, k_count, shared.width), np.int32)
  counts = np.zeros((size, k_count), np.int32)
  per = -(-k_count // len(shared.held)) if shared.held else k_count
  for s, m in enumerate(members):
    parts = m.run.prepared.parts
    if shared.held is not None:
      parts = [np.searchsorted(shared.held[k // per], p) for k, p in enumerate(parts)]
    idx[s], counts[s] = data_lib.pad_partition(parts, 0, width=shared.width)
  return _put(idx, shared.split), _put(counts, shared.split)


def _block_data(shared: _Shared, members: list[_Member]):
  """``(data, axes)``: the block's DeviceData (index lists stacked on its members, examples
  shared or stacked) and which of its fields are stacked (0) or shared (None)."""
  idx, counts = _index_lists(shared, members)
  if shared.examples is not None:
    images, labels, mean, std = shared.examples
    axes = inputs.DeviceData(None, None, 0, 0, None, None)
  else:
    devs = [inputs.device_data(m.run.prepared.data, m.run.prepared.parts, m.c.backend)
            for m in members]
    images, labels, mean, std = (_stack([getattr(d, f) for d in devs])
                                 for f in ("images", "labels", "mean", "std"))
    axes = inputs.DeviceData(0, 0, 0, 0, 0, 0)
  return inputs.DeviceData(images, labels, idx, counts, mean, std), axes


def _block_topology(shared: _Shared, members: list[_Member]) -> topology_lib.Topology:
  """The shared neighbour lists with the members' weights ``nbr_w [S, T, K, D]``."""
  nbr_w = np.stack([np.asarray(m.run.objects.topology.nbr_w, np.float32) for m in members])
  return topology_lib.Topology(shared.nbr_idx, _put(nbr_w, shared.whole), shifts=shared.shifts)


def _compile_step(shared: _Shared, size: int, members: list[_Member]):
  """The block step of ``size`` members, compiled for their shapes and placements (abstractly:
  no member's state is built) or taken from the programs' cache."""
  d, axes = _block_data(shared, members[:1])
  progs = _programs(shared, axes)
  if shared.state_sh is None:
    states = jax.tree.map(lambda x: _sds((size, *x.shape), x.dtype, None), shared.state_shapes)
  else:
    states = jax.tree.map(lambda x, sh: _sds((size, *x.shape), x.dtype, sh), shared.state_shapes,
                          shared.state_sh)
  nbr_w = _block_topology(shared, members[:1]).nbr_w
  topo = topology_lib.Topology(shared.nbr_idx, _sds((size, *nbr_w.shape[1:]), nbr_w.dtype,
                                                    shared.whole), shifts=shared.shifts)
  d = inputs.DeviceData(*(_sds((size, *x.shape[1:]), x.dtype, shared.split) if a == 0 else x
                          for x, a in zip(d, axes)))
  args = (states, _sds((size,), jnp.bool_, shared.whole), topo, d)
  signature = tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(args))
  if signature not in progs.compiled:
    progs.compiled[signature] = progs.step.lower(*args).compile()
  return progs.compiled[signature]


def _plan_blocks(shared: _Shared, members: list[_Member]) -> tuple[list[list[_Member]], dict]:
  """The members in blocks that fit the device, and the compiled step of each block size."""
  free, size, compiled = _free_device_memory(), len(members), {}
  # The shared examples are on the device already, counted as free's use and as arguments.
  resident = max(inputs.bytes_per_device(shared.examples or ()).values(), default=0)
  while True:
    compiled[size] = _compile_step(shared, size, members)
    need = _needed_bytes(compiled[size]) - resident
    if free is None or need <= MEMORY_FRACTION * free or size == 1:
      break
    smaller = -(-size // 2)
    logging.info("vectorised step of %d members needs %.2f GiB, %.2f GiB free on %s: splitting "
                 "into blocks of %d", size, need / 2**30, free / 2**30,
                 jax.local_devices()[0].device_kind, smaller)
    del compiled[size]
    size = smaller
  if free is not None and need > MEMORY_FRACTION * free:
    logging.warning("one member's step needs %.2f GiB, %.2f GiB free: it may not fit",
                    need / 2**30, free / 2**30)
  blocks = [members[i:i + size] for i in range(0, len(members), size)]
  return blocks, compiled


# --------------------------------------------------------------------------------------------
# Running a block.


def _resume_together(block: list[_Member], runs: list) -> tuple[list, list]:
  """Each member's checkpoints and resumed state, from the newest step all of them hold: a
  member further on drops its newer checkpoints (they are recomputed, the same) and resumes
  again."""
  ckpts, resumed = [None] * len(block), [None] * len(block)

  def resume(i):
    m = block[i]
    ckpts[i], resumed[i] = train._resume(m.workdir, m.c, m.same_run, runs[i],
                                         json.loads(m.c.to_json()))

  try:
    for i in range(len(block)):
      resume(i)
    while len({r.step for r in resumed}) > 1:  # resume every member at the earliest step
      first = min(r.step for r in resumed)
      for i, r in enumerate(resumed):
        if r.step > first:
          ckpts[i].close()
          ckpts[i] = None
          folder = checkpoint_lib.directory(block[i].workdir)
          for step in checkpoint_lib.steps(block[i].workdir):
            if step > first:
              shutil.rmtree(os.path.join(folder, str(step)))
          logging.info("member %d resumes at step %d with its block (its checkpoints after it "
                       "are dropped)", block[i].index, first)
          resume(i)
  except BaseException:
    for ckpt in ckpts:
      if ckpt is not None:
        ckpt.close()
    raise
  return ckpts, resumed


def _member_slice(tree, s: int):
  return jax.tree.map(lambda x: x[s], tree)


def _run_block(shared: _Shared, block: list[_Member], compiled, verbose: bool,
               stack: contextlib.ExitStack) -> list[MemberHistory]:
  c, size = block[0].c, len(block)
  initial = step_lib.init_states(shared.spec, block[0].run.objects.model,
                                 [(m.run.objects.algorithm, m.run.objects.topology, m.c.seed,
                                   m.c.same_init) for m in block])
  finite = backends.to_host(jax.vmap(step_lib.agents_finite)(initial.params))
  for m, ok in zip(block, finite):
    if not ok.all():
      raise ValueError(f"member {m.index}: the initial parameters are not finite on agents "
                       f"{np.flatnonzero(~ok).tolist()}; check the model's initialisers")
  # A member's own initial state is the template its checkpoints restore into (only they need it)
  runs = [m.run._replace(state=_member_slice(initial, s) if m.workdir and m.same_run else None)
          for s, m in enumerate(block)]
  ckpts, resumed = _resume_together(block, runs)
  for ckpt in ckpts:
    if ckpt is not None:
      stack.callback(ckpt.close)
  writers = []
  for m, r in zip(block, resumed):
    writers.append(workdir_lib.Writer(m.workdir, m.c, m.run.prepared, r.rows))
    stack.callback(writers[-1].close)
  d, axes = _block_data(shared, block)
  progs = _programs(shared, axes)
  evaluate_prog, metrics_prog = progs.evaluate, progs.param_metrics
  step_prog = compiled.get(size) or _compile_step(shared, size, block)
  compiled[size] = step_prog
  topo = _block_topology(shared, block)
  eval_sets = {}
  for name in runs[0].eval_sets:
    sets = [r.eval_sets[name] for r in runs]
    same = all(_same([getattr(e, f) for e in sets]) for f in inputs.EvalSet._fields)
    eval_sets[name] = (sets[0], None) if same else (_stack(sets), 0)

  restored = any(r.state is not run.state for r, run in zip(resumed, runs))
  states = initial
  if restored:
    states = _stack([r.state if r.state is not None else _member_slice(initial, s)
                     for s, r in enumerate(resumed)])
    if shared.state_sh is not None:
      states = jax.device_put(states, shared.state_sh)
  del initial, runs  # the members' own copies of their initial states
  resumed = [r._replace(state=None) for r in resumed]
  alive = jnp.ones((size,), bool)
  first, num_steps = resumed[0].step, c.num_steps
  histories = [list(r.rows) for r in resumed]
  evaluators = [train._Evaluator(m.c, m.run, r) for m, r in zip(block, resumed)]
  diverged: list = [None] * size  # (step, message) of a member found diverged
  pending, pending_from = [], first + 1
  progress = train._Progress(num_steps, verbose)

  def pull():
    # One batched copy of the pending steps (stacking them on the device would compile a
    # program per count of pending steps); the members' first bad step found with numpy.
    nonlocal pending, pending_from
    got = jax.tree.map(lambda *steps: np.stack(steps), *jax.device_get(pending))
    ok = np.isfinite(got["loss"]).all(axis=-1) & got["finite"].all(axis=-1)  # [steps, S]
    for s in range(size):
      if diverged[s] is not None:
        continue
      bad = np.flatnonzero(~ok[:, s])
      for i in range(bad[0] + 1 if bad.size else len(pending)):
        m = jax.tree.map(lambda x, i=i, s=s: x[i, s], got)
        try:
          train.check_finite([m], pending_from + i)  # raises at the bad step, as it would
        except FloatingPointError as e:
          diverged[s] = (pending_from + i, str(e))
          logging.warning("member %d diverged: %s", block[s].index, e)
          break
        evaluators[s].add(m)
    pending_from, pending = pending_from + len(pending), []

  def evaluate(step, who):
    sums = {name: backends.to_host(evaluate_prog(states.params, states.model_state, ev, d.mean,
                                                 d.std, ev_axis=ev_axis, stats_axis=axes.mean))
            for name, (ev, ev_axis) in eval_sets.items()
            if name in inputs.sets_at(c, step, eval_sets)}
    pm = backends.to_host(metrics_prog(states.params, states.model_state, states.alg_state,
                                       topo))
    for s in who:
      row = evaluators[s].make_row(_member_slice(sums, s), _member_slice(pm, s), step)
      histories[s].append(row)
      writers[s].write(row)
      train._log_row(block[s].c, row)
    if who:
      progress.show(histories[who[0]][-1])

  def live():
    return [s for s in range(size) if diverged[s] is None]

  need_first = [s for s in range(size)
                if train.is_eval_step(c, first) and not any(r["step"] == first
                                                            for r in histories[s])]
  if need_first:
    evaluate(first, need_first)
  try:
    for step in range(first + 1, num_steps + 1):
      states, alive, m = step_prog(states, alive, topo, d)
      pending.append(m)
      if step == first + 1:  # compiled: time the steps from here on
        jax.block_until_ready(m)
        for ev in evaluators:
          ev.restart_clock(step)
        progress.start(step - 1)
      progress.advance()
      if len(pending) > train.MAX_STEPS_IN_FLIGHT:
        jax.block_until_ready(pending[-train.MAX_STEPS_IN_FLIGHT - 1])
      logs = bool(c.log_every and step % c.log_every == 0)
      saves = bool(c.checkpoint_every) and (step % c.checkpoint_every == 0
                                            or step == num_steps)
      evals = train.is_eval_step(c, step)
      if logs or saves or evals:
        pull()
      if logs:
        logging.info("step %d/%d | train loss %s", step, num_steps,
                     ", ".join(f"{float(np.mean(evaluators[s].buf['loss'][-1])):.4f}"
                               for s in live()))
      if evals:
        evaluate(step, live())
      if saves:
        for s in live():
          if ckpts[s] is None:
            continue
          ev, hist = evaluators[s], histories[s]
          ckpts[s].save(step, _member_slice(states, s),
                        {"step": step, "metrics": workdir_lib.buffer_to_json(ev.buf),
                         "wall_time": time.perf_counter() - ev.start,
                         "data": block[s].run.digest(),
                         "rows": [workdir_lib.json_safe(r) for r in hist]})
      if not live():
        break  # every member diverged: nothing left to train
  finally:
    progress.close()
  out = []
  for s in range(size):
    if diverged[s] is None:
      out.append(MemberHistory(histories[s]))
    else:
      out.append(MemberHistory(histories[s], "diverged", *diverged[s]))
  return out


# --------------------------------------------------------------------------------------------
# The entry point.


def train_and_evaluate_many(config, members: Sequence[Mapping], *,
                            workdirs: Sequence[str | None] | None = None, data=None,
                            verbose: bool = True, overwrite: bool = False) -> list[MemberHistory]:
  """Trains the sweep's ``members`` as vectorised blocks; returns one history per member.

  Args:
    config: the base config (a ConfigDict or dict overriding the defaults).
    members: one dict of config overrides per member (dotted names such as ``drt.strength``, or
      nested dicts), differing only in :data:`VECTORIZED_FIELDS`.
    workdirs: one workdir (or None) per member: each gets what its sequential run writes there
      (``config.json``, ``metrics.jsonl``, the partition, checkpoints) and resumes like it.
    data: in-memory data for every member (as for ``train_and_evaluate``); without it each
      member's ``config.dataset`` is loaded (once per distinct dataset).
    verbose: show a progress bar over the steps of each block.
    overwrite: replace a run of a different config in a member's workdir.

  Returns:
    One :class:`MemberHistory` per member, in order: its rows, ``status`` and, for a diverged
    member, ``diverged_step`` and ``error``.

  Raises:
    ValueError: the members cannot be vectorised (:func:`vectorizable`, one line), or a member's
      config, data or workdir is refused as by ``train_and_evaluate``.
  """
  configs = _configs(config, members)
  _check_configs(configs)
  workdirs = [None] * len(configs) if workdirs is None else list(workdirs)
  if len(workdirs) != len(configs):
    raise ValueError(f"{len(workdirs)} workdirs for {len(configs)} members; give one per member "
                     "(None for none)")
  named = [w for w in workdirs if w]
  if len(set(named)) != len(named):
    raise ValueError("two members share a workdir; give each its own")
  start = time.perf_counter()
  with contextlib.ExitStack() as stack:
    same_run = []
    for c, w in zip(configs, workdirs):
      workdir_lib.check_writable(w)
      stack.enter_context(workdir_lib.lock(w))
      same_run.append(workdir_lib.check_workdir(w, c, overwrite))
    loaded = {}

    def data_of(c):
      if data is not None:
        return data
      key = (c.dataset, c.seed if c.dataset == "synthetic" else None)
      if key not in loaded:
        loaded[key] = inputs.load_data(c)
      return loaded[key]

    all_members = [_Member(i, c, train._setup(c, data_of(c), {}, on_device=False), w, same)
                   for i, (c, w, same) in enumerate(zip(configs, workdirs, same_run))]
    shared = _shared(all_members)
    blocks, compiled = _plan_blocks(shared, all_members)
    logging.info("vectorised sweep: %d members in %d block(s) of up to %d; K=%d, algorithm %s, "
                 "backend %s", len(all_members), len(blocks), len(blocks[0]), configs[0].num_agents,
                 configs[0].algorithm, configs[0].backend)
    histories = []
    for block in blocks:
      with contextlib.ExitStack() as block_stack:
        histories += _run_block(shared, block, compiled, verbose, block_stack)
  logging.info("vectorised sweep: %d members trained in %.1f s", len(histories),
               time.perf_counter() - start)
  return histories


__all__ = ["VECTORIZED_FIELDS", "MemberHistory", "member_config", "train_and_evaluate_many",
           "vectorizable"]
