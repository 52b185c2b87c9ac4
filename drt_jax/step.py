"""The compiled programs of a run: the train step for all K agents, evaluation and metrics.

One train step, jitted once with the state donated:

  1. every agent draws its batch from its own index list (:func:`drt_jax.data.sample_indices`);
  2. per-agent loss and gradients at the algorithm's ``grad_point`` (the params unless it says
     otherwise, as CTA does), run over the agent axis by the back-end (:mod:`drt_jax.backends`);
  3. the algorithm's step: local optimizer update and combination (:mod:`drt_jax.algorithms`);
  4. BatchNorm statistics combined too when the spec shares them;
  5. per-agent finiteness of the new parameters and statistics, a ``[K]`` bool in the metrics.

With a fault spec (:mod:`drt_jax.faults`) a seeded fault pattern masks the step's combination
weights and local steps, and Byzantine agents' messages replace their copies where neighbours
fetch them; without one the program holds no fault code at all. With Byzantine agents the
evaluation's centroid, output disagreement and consensus distances are over the honest agents.

What shapes a program is said explicitly: a :class:`StepSpec` (agents, batch, back-end, faults,
...), the model and the algorithm. The topology, the data and the train state are arguments, so
new weights, a time-varying schedule, another dataset of the same shapes or other hyperparameters
kept in the state (the named optimizers' learning rate, DRT's strength) never recompile.
:func:`programs_for` keeps the programs of recent keys for the process (a sweep reuses them).
:func:`program_functions` gives the same functions unjitted and :func:`init_states` several runs'
initial states at once, for the vectorised sweeps of :mod:`drt_jax.vectorize`.
"""

import collections
import dataclasses
import functools
import inspect
from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from drt_jax import backends, models
from drt_jax import combine as combine_lib
from drt_jax import data as data_lib
from drt_jax import faults as faults_lib
from drt_jax import metrics as metrics_lib
from drt_jax import topology as topology_lib
from drt_jax.inputs import DeviceData, EvalSet
from drt_jax.types import PyTree


class TrainState(NamedTuple):
  """Everything that changes in training; all leaves but ``step`` and ``key`` are [K, ...]."""

  params: PyTree
  model_state: PyTree  # non-trained collections (BatchNorm statistics), {} if none
  alg_state: Any
  step: jax.Array  # int32 scalar
  key: jax.Array  # typed PRNG key for batch sampling


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """What, besides the model and the algorithm, shapes the compiled programs."""

  num_agents: int
  batch_size: int  # per agent
  augmentation: str = "none"  # one of data.AUGMENTATIONS
  backend: str = "vmap"  # one of backends.BACKENDS
  chunk_size: int | None = None  # agents per group for the 'chunked' back-end
  faults: faults_lib.Spec | None = None  # None: no fault code in the program
  combine_batch_stats: bool = False  # share BatchNorm statistics through the combine


def agents_finite(stacked_tree) -> jax.Array:
  """bool ``[K]``: whether every entry of agent k's slice of every leaf is finite.

  Computed as ``sum(x * 0) == 0``, which is exactly that (a finite entry gives ±0, an Inf or NaN
  gives NaN) and runs several times faster on XLA:CPU than a reduction of ``isfinite``.
  """
  leaves = jax.tree.leaves(stacked_tree)
  flags = [jnp.sum(x.reshape(x.shape[0], -1) * 0, axis=1) == 0 for x in leaves
           if jnp.issubdtype(x.dtype, jnp.inexact)]
  return functools.reduce(jnp.logical_and, flags)


def draw_batch(key, step, d: DeviceData, batch_size: int, augmentation: str = "none",
               backend: str = "vmap"):
  """Every agent's training batch at ``step``, drawn on the device: ``(x [K, B, ...], y [K, B])``.

  Indices come from each agent's own list, without replacement within its local epochs
  (:func:`drt_jax.data.sample_indices`, keyed by the run's sampling key alone so that an epoch's
  order stays fixed across its steps); with the ``shard`` back-end each device reads its agents'
  examples from its own block of ``d`` (:func:`drt_jax.inputs.device_data`). Augmentation uses a
  key folded with the step; images are normalised last.
  """
  idx = data_lib.sample_indices(jax.random.fold_in(key, 0), step, d.idx, d.counts, batch_size)
  k_count = d.idx.shape[0]
  if backends.resolve(backend, k_count) == "shard":
    take = backends.per_agent(lambda images, labels, i: (images[i], labels[i]), backend, k_count,
                              blocks=(0, 1))
    x, y = take(d.images, d.labels, idx)
  else:
    x, y = d.images[idx], d.labels[idx]
  x = data_lib.augment(augmentation, jax.random.fold_in(jax.random.fold_in(key, 1), step), x)
  return data_lib.normalise(x, d.mean, d.std), y


def init_algorithm(alg, params, topology):
  """``alg.init(params, topology)``, or ``alg.init(params)`` for an algorithm whose state does
  not depend on the graph (a user's own may take the parameters alone)."""
  try:
    takes_topology = len(inspect.signature(alg.init).parameters) > 1
  except (TypeError, ValueError):  # no signature to read: pass what the library's take
    takes_topology = True
  return alg.init(params, topology) if takes_topology else alg.init(params)


def _init_state(spec: StepSpec, model: models.Model, alg, topology, seed: int,
                same_init: bool) -> TrainState:
  root = jax.random.key(seed)
  k_init, k_sample = jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)
  if same_init:
    one = model.init(k_init)
    variables = jax.tree.map(lambda x: jnp.tile(x[None], (spec.num_agents,) + (1,) * x.ndim), one)
  else:
    variables = jax.vmap(model.init)(jax.random.split(k_init, spec.num_agents))
  params = variables["params"]
  model_state = {k: v for k, v in variables.items() if k != "params"}
  return TrainState(params, model_state, init_algorithm(alg, params, topology),
                    jnp.zeros((), jnp.int32), k_sample)


def state_shardings(spec: StepSpec, model: models.Model, alg, topology):
  """Where each leaf of the train state lives (None without the ``shard`` back-end).

  Stacked leaves are split over the agents mesh, the step and the sampling key replicated; found
  from the state's shapes (``jax.eval_shape``), so nothing is computed.
  """
  if backends.resolve(spec.backend, spec.num_agents) != "shard":
    return None
  shapes = jax.eval_shape(functools.partial(_init_state, spec, model, alg, topology, 0, True))
  return backends.shardings(shapes, spec.backend, spec.num_agents)


def init_state(spec: StepSpec, model: models.Model, alg, topology, *, seed: int = 0,
               same_init: bool = True) -> TrainState:
  """Stacked variables (one shared initialisation unless ``same_init`` is off) and states.

  Built by one jitted program whose outputs land where the step wants them: with the ``shard``
  back-end every stacked leaf is created split over the agents mesh (its shape found with
  ``jax.eval_shape``), so the K copies are never materialised whole on one device, and over
  several processes each process computes only its own agents.
  """
  build = functools.partial(_init_state, spec, model, alg, topology, seed, same_init)
  return jax.jit(build, out_shardings=state_shardings(spec, model, alg, topology))()


def runs_shardings(spec: StepSpec, model: models.Model, alg, topology):
  """Where each leaf of several runs' states stacked on a leading run axis lives (None without
  the ``shard`` back-end): each leaf as in :func:`state_shardings`, the run axis whole in front
  of it, so that every device holds its agents of every run."""
  one = state_shardings(spec, model, alg, topology)
  if one is None:
    return None
  return jax.tree.map(lambda sh: NamedSharding(sh.mesh, PartitionSpec(None, *sh.spec)), one)


def init_states(spec: StepSpec, model: models.Model, runs) -> TrainState:
  """The initial states of several runs of one spec and model, stacked on a leading run axis.

  ``runs`` lists ``(alg, topology, seed, same_init)`` per run; each state is exactly that of
  :func:`init_state` (the same jnp computation), and all are built by one jitted program, so
  that the members of a vectorised sweep (:mod:`drt_jax.vectorize`) compile one initialisation
  rather than one each. With the ``shard`` back-end they land split over the agents mesh
  (:func:`runs_shardings`).
  """
  builds = [functools.partial(_init_state, spec, model, alg, topology, seed, same_init)
            for alg, topology, seed, same_init in runs]

  def init_all():
    return jax.tree.map(lambda *xs: jnp.stack(xs), *(build() for build in builds))

  alg, topology = runs[0][:2]
  return jax.jit(init_all, out_shardings=runs_shardings(spec, model, alg, topology))()


class Programs(NamedTuple):
  """The jitted train step and evaluation functions of one :class:`StepSpec`, model and
  algorithm."""

  train_step: Any  # (state, topology, data) -> (state, metrics)
  evaluate: Any  # (params, model_state, EvalSet, mean, std) -> per-agent sums
  param_metrics: Any  # (params, model_state, alg_state, topology) -> dict


def _placer(spec: StepSpec, state_sh):
  def placed(tree, shardings=None):
    """``tree`` where the next step and the host expect it (what jit's out_shardings would do):
    with the ``shard`` back-end, [K] leaves stay split with their agents, scalars replicated."""
    if state_sh is None:
      return tree
    if shardings is None:
      shardings = backends.shardings(tree, spec.backend, spec.num_agents)
    return jax.lax.with_sharding_constraint(tree, shardings)

  return placed


def _agent_loss(model: models.Model):
  def agent_grads(params, model_state, x, y):
    def loss_fn(p):
      logits, new_state = model.apply({"params": p, **model_state}, x, True)
      loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
      return loss, (jnp.mean(jnp.argmax(logits, -1) == y), new_state)

    (loss, (acc, new_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, acc, new_state, grads

  return agent_grads


def loss_and_grads(model: models.Model):
  """One agent's ``(params, model_state, x, y) -> (loss, acc, new_state, grads)``: the mean
  softmax cross-entropy of its training-mode logits and its gradients, as the train step computes
  them (the lab's single-model baseline runs the same)."""
  return _agent_loss(model)


def _train_step_fn(spec: StepSpec, model: models.Model, alg, lift, placed, state_sh):
  lifted_grads = lift(_agent_loss(model))
  grad_point = getattr(alg, "grad_point", None)
  combine_stats = getattr(alg, "combine_stats", None)

  def train_step(state: TrainState, topology, d: DeviceData):
    x, y = draw_batch(state.key, state.step, d, spec.batch_size, spec.augmentation, spec.backend)
    fault_metrics, step_kw, f = {}, {}, None
    if spec.faults is not None:  # a Python branch: no fault code in a fault-free program
      base = combine_lib.as_mixing(topology, state.step)
      f = faults_lib.sample(faults_lib.stream_key(spec.faults.seed), state.step, base, spec.faults)
      topology, step_kw = f.mixing, {"active": f.active}
      fault_metrics = faults_lib.counts(f, base)
    point = state.params
    if grad_point is not None:
      point = grad_point(state.params, state.alg_state, topology)
    loss, acc, model_state, grads = lifted_grads(point, state.model_state, x, y)
    params, alg_state = alg.step(state.params, grads, state.alg_state, topology, **step_kw)
    if f is not None:  # agents without a local step keep their statistics too
      model_state = faults_lib.select(f.active, model_state, state.model_state)
    if spec.combine_batch_stats and jax.tree.leaves(model_state):
      model_state = combine_stats(model_state, alg_state, topology)
    if f is not None:  # a dropped agent's column is the identity; this makes it exact
      params = faults_lib.select(f.alive, params, state.params)
      model_state = faults_lib.select(f.alive, model_state, state.model_state)
      # and its whole state stays as it was: what it would have sent (CHOCO's public copy, a
      # tracker) must not move while nobody hears it
      alg_state = faults_lib.select_stacked(f.alive, alg_state, state.alg_state)
    new = TrainState(params, model_state, alg_state, state.step + 1, state.key)
    return placed(new, state_sh), placed({"loss": loss, "acc": acc,
                                          "finite": agents_finite((params, model_state)),
                                          **fault_metrics})

  return train_step


def _honest_only(spec: StepSpec):
  """``tree -> tree`` keeping the honest agents' rows of every leaf; the identity (no code) when
  no agent is Byzantine."""
  honest = faults_lib.honest_agents(spec.faults, spec.num_agents)
  if honest is None:
    return lambda tree: tree
  return lambda tree: jax.tree.map(lambda x: x[honest], tree)


def _evaluate_fn(spec: StepSpec, model: models.Model, lift, placed):
  def agent_logits(params, model_state, x):
    return model.apply({"params": params, **model_state}, x, False)[0]

  lifted_logits = lift(agent_logits, shared=(2,))
  honest = _honest_only(spec)

  def evaluate(params, model_state, ev: EvalSet, mean, std):
    mean_params = metrics_lib.centroid(honest(params))
    mean_state = metrics_lib.centroid(honest(model_state))

    def body(carry, batch):
      x, y, mask = batch
      x = data_lib.normalise(x, mean, std)
      logits = lifted_logits(params, model_state, x)  # [K, B, C]
      probs = jax.nn.softmax(logits)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y[None])
      correct = jnp.argmax(logits, -1) == y[None]
      c_logits = agent_logits(mean_params, mean_state, x)
      sums = {
          "correct": jnp.sum(jnp.where(mask[None], correct, False), axis=1),
          "loss": jnp.sum(jnp.where(mask[None], loss, 0.0), axis=1),
          "centroid_correct": jnp.sum(jnp.where(mask, jnp.argmax(c_logits, -1) == y, False)),
          "disagreement": metrics_lib.output_disagreement(honest(probs), mask),
      }
      return jax.tree.map(jnp.add, carry, sums), None

    zero = {"correct": jnp.zeros(spec.num_agents), "loss": jnp.zeros(spec.num_agents),
            "centroid_correct": jnp.zeros(()), "disagreement": jnp.zeros(())}
    sums, _ = jax.lax.scan(body, zero, (ev.images, ev.labels, ev.mask))
    return placed(sums)

  return evaluate


def _param_metrics_fn(spec: StepSpec, alg):
  alg_metrics = getattr(alg, "metrics", None)
  honest = _honest_only(spec)

  def param_metrics(params, model_state, alg_state, topology):
    names = combine_lib.layer_names(params, "module")
    total, per_layer = metrics_lib.consensus_distance(honest(params), names)
    out = {"consensus_distance": total,
           **{f"consensus/{p}": v for p, v in per_layer.items()}}
    if jax.tree.leaves(model_state):
      stats_names = combine_lib.layer_names(model_state, "module")
      out["stats_consensus_distance"] = metrics_lib.consensus_distance(honest(model_state),
                                                                       stats_names)[0]
    if spec.num_agents > 1 and alg_metrics is not None:  # the algorithm's own diagnostics
      out.update(alg_metrics(params, alg_state, topology))
    return out

  return param_metrics


def program_functions(spec: StepSpec, model: models.Model, alg) -> Programs:
  """The unjitted functions :func:`build_programs` jits: the train step, the evaluation and the
  metrics of ``spec``, ``model`` and ``alg``, for callers that transform them further (the
  vectorised sweeps of :mod:`drt_jax.vectorize` vmap them over the members of a sweep)."""
  return _functions(spec, model, alg)[0]


def _functions(spec: StepSpec, model: models.Model, alg):
  if spec.combine_batch_stats and getattr(alg, "combine_stats", None) is None:
    raise ValueError("combine_batch_stats is on but the algorithm has no combine_stats; give it "
                     "one or set combine_batch_stats=False")
  if spec.faults is not None and "active" not in inspect.signature(alg.step).parameters:
    raise ValueError("simulated faults need an algorithm whose step takes active=...; give its "
                     "step that argument or set every config.faults probability and "
                     "faults.byzantine to 0")
  lift = functools.partial(backends.per_agent, backend=spec.backend, num_agents=spec.num_agents,
                           chunk_size=spec.chunk_size)
  # Which leaves are split with their agents depends on the state's shapes alone, not on the
  # graph's width, so any graph of K agents finds them: the identity's weights as a bare Mixing,
  # which an algorithm's checks of a topology (a trimmed mean's neighbourhood sizes, say) pass.
  state_sh = state_shardings(spec, model, alg, topology_lib.identity(spec.num_agents).mixing())
  placed = _placer(spec, state_sh)
  fns = Programs(_train_step_fn(spec, model, alg, lift, placed, state_sh),
                 _evaluate_fn(spec, model, lift, placed), _param_metrics_fn(spec, alg))
  return fns, state_sh


def build_programs(spec: StepSpec, model: models.Model, alg) -> Programs:
  """Jits the train step and the evaluation functions of ``spec``, ``model`` and ``alg`` (any
  object with the ``init``/``step`` shape of :class:`drt_jax.algorithms.Algorithm`)."""
  fns, state_sh = _functions(spec, model, alg)
  evaluate = jax.jit(fns.evaluate)
  param_metrics = jax.jit(fns.param_metrics)
  if state_sh is None:  # one device: placement is JAX's default
    return Programs(jax.jit(fns.train_step, donate_argnums=(0,)), evaluate, param_metrics)
  # On the agents mesh the inputs must already be where the step computes: stacked leaves and
  # the devices' blocks of examples split over it, the graph and the normalisation whole on every
  # device (the outputs are placed).
  split = backends.split(spec.backend, spec.num_agents)
  whole = backends.replicated(spec.backend, spec.num_agents)
  data_sh = DeviceData(images=split, labels=split, idx=split, counts=split, mean=whole, std=whole)
  step = jax.jit(fns.train_step, donate_argnums=(0,), in_shardings=(state_sh, whole, data_sh))
  return Programs(step, evaluate, param_metrics)


class ProgramKey(NamedTuple):
  """What the programs are built from: the spec, and the model and algorithm themselves (held,
  so their identity cannot be reused while cached) or the recipe they were built from (a tuple
  of the config fields that shape them, so that rebuilt objects share programs)."""

  spec: StepSpec
  model: Hashable
  algorithm: Hashable


PROGRAM_CACHE_SIZE = 16
_PROGRAMS: collections.OrderedDict = collections.OrderedDict()


def programs_for(spec: StepSpec, model: models.Model, alg, *, model_key: Hashable = None,
                 algorithm_key: Hashable = None) -> Programs:
  """The programs of ``spec``, ``model`` and ``alg``, built once per process for each
  :class:`ProgramKey` (the last :data:`PROGRAM_CACHE_SIZE` kept). Objects that cannot be hashed
  get programs of their own at every call."""
  key = ProgramKey(spec, model if model_key is None else model_key,
                   alg if algorithm_key is None else algorithm_key)
  try:
    hash(key)
  except TypeError:
    return build_programs(spec, model, alg)
  if key in _PROGRAMS:
    _PROGRAMS.move_to_end(key)
  else:
    _PROGRAMS[key] = build_programs(spec, model, alg)
    while len(_PROGRAMS) > PROGRAM_CACHE_SIZE:
      _PROGRAMS.popitem(last=False)
  return _PROGRAMS[key]
